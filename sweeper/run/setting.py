"""One setting, the unit a user or a sweep trial asks for: one training run (``sweeper.run.task.run_once``),
or with ``train.replicates=K`` (or an A/A ``sweep.label``) runs on seeds derived from ``train.seed`` and
their aggregate (``sweeper.run.replicates``). Above both, so neither imports the other's caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omegaconf import DictConfig

from sweeper.run.replicates import replicate_seeds, run_replicates
from sweeper.run.task import RunResult, run_once

if TYPE_CHECKING:  # the sweep's pruner hook; sweeper.search imports Optuna, which a single run does not need
    from sweeper.search.trial import EvalReporter


def run(
    cfg: DictConfig,
    *,
    overrides: list[str] | None = None,
    report: EvalReporter | None = None,
    show_progress: bool = True,
    extra_tags: dict[str, str] | None = None,
) -> RunResult:
    """One setting: one training run, or with ``train.replicates=K`` K runs on derived seeds and
    their aggregate (``sweeper.run.replicates``)."""
    if cfg.train.replicates > 1 or cfg.sweep.label is not None:
        if cfg.train.replicates == 1:  # an A/A label: this copy of the setting trains on a seed of its own
            cfg.train.seed = replicate_seeds(cfg.train.seed, 1, cfg.sweep.label)[0]
            return run_once(cfg, overrides=overrides, report=report, show_progress=show_progress, extra_tags=extra_tags)

        return run_replicates(cfg, overrides=overrides, report=report, show_progress=show_progress)
    return run_once(cfg, overrides=overrides, report=report, show_progress=show_progress, extra_tags=extra_tags)
