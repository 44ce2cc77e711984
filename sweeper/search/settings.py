"""The Optuna sweeper's options (``hydra.sweeper.*``); imported at Hydra start-up, so kept light."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SAMPLERS = ("auto", "grid", "tpe", "random", "cmaes", "nsgaii")
PRUNERS = ("none", "median", "successive_halving", "hyperband", "wilcoxon")
DIRECTIONS = ("maximize", "minimize")


@dataclass
class OptunaSweeperConf:
    """``auto`` sampling is a full grid when every swept key is a finite list, else seeded TPE."""

    _target_: str = "hydra_plugins.lora_sweeper.optuna_sweeper.LoraOptunaSweeper"
    sampler: str = "auto"
    seed: int = 0  # sampler seed: the same seed proposes the same trials
    n_trials: int = 10  # total finished trials wanted in the study (grids run their full product)
    objective: Any = "clip_score"  # a metric the task returns, or a list of them
    direction: Any = "maximize"  # one per objective
    storage: str | None = None  # None = sqlite under outputs/; any Optuna RDB URL or a *.log journal file
    study_name: str | None = None  # None = derived from the experiment, search space and fixed overrides
    pruner: str = "none"
    pruner_startup_trials: int = 1  # trials that finish before the pruner may prune (median)
    pruner_warmup_steps: int = 0  # steps of each trial before it may be pruned
    max_failure_rate: float = 0.5  # stop when more than this share of finished trials failed (>= 2 finished)
    max_retries: int = 2  # re-runs of a trial that was killed, interrupted or ran out of memory (same params)
    heartbeat_seconds: int = 60  # each running trial's worker writes a heartbeat this often ...
    grace_seconds: int = 300  # ... and a trial whose heartbeat is older is taken as dead, failed and re-run
    n_workers: Any = 1  # worker processes on this machine (one per GPU), or "auto": one per visible GPU
    replicates: int = 1  # training seeds per setting (the same K seeds for every setting); 1 = no verdicts
    racing: bool = (
        False  # grid sweeps: start every setting with 2 seeds, add seeds only to contenders, up to replicates
    )
    params: dict[str, str] = field(default_factory=dict)  # search space entries, e.g. from +search=...
    # ranges that depend on another swept key's value: {parent key: {key: {parent value: sweep}}}
    conditional: dict[str, Any] = field(default_factory=dict)
