"""Building the study: storage, sampler, pruner, name. Shared by the sweeper and by trials."""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from sweeper.search.settings import DIRECTIONS, PRUNERS, SAMPLERS
from sweeper.search.space import SearchSpace
from sweeper.search.storage_url import is_journal, journal_path, missing_driver, sqlite_path
from sweeper.tracking.credentials import with_credentials

HEARTBEAT_SECONDS = 60  # a worker that stops beating for GRACE is taken as dead; its trial becomes FAIL
GRACE_SECONDS = 300


class SweepConfigError(ValueError):
    """An impossible sweeper setting; the message names the ``hydra.sweeper`` key."""


def default_storage_url(outputs: Any) -> str:
    return f"sqlite:///{(outputs / 'optuna.db').resolve()}"


def open_storage(
    url: str,
    heartbeat_seconds: int = HEARTBEAT_SECONDS,
    grace_seconds: int = GRACE_SECONDS,
) -> BaseStorage:
    """An RDB URL (sqlite, postgresql, mysql) with heartbeats, or an Optuna journal file (``*.log``)."""
    problem = missing_driver(url)
    if problem:
        raise SweepConfigError(f"hydra.sweeper.storage: {problem}")
    if is_journal(url):
        path = journal_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if sqlite_path(url) is not None:
        sqlite_path(url).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and exactly what we need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            with_credentials(url),
            engine_kwargs=engine,
            heartbeat_interval=heartbeat_seconds,
            grace_period=grace_seconds,
        )


def as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def objectives_and_directions(options: Any) -> tuple[list[str], list[str]]:
    objectives, directions = as_list(options.objective), as_list(options.direction)
    if len(directions) == 1 and len(objectives) > 1:
        directions = directions * len(objectives)
    if len(directions) != len(objectives):
        raise SweepConfigError(
            f"hydra.sweeper.direction has {len(directions)} entries for {len(objectives)} objectives; give one each"
        )
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise SweepConfigError(f"hydra.sweeper.direction: {bad} must be one of {', '.join(DIRECTIONS)}")
    return objectives, directions


def derive_study_name(experiment: str, space: SearchSpace, objectives: list[str], directions: list[str]) -> str:
    """The same sweep command gives the same name, so running it again resumes the study."""
    identity = {
        "space": {key: repr(dist) for key, dist in sorted(space.distributions.items())},
        "fixed": sorted(space.fixed),
        "objectives": objectives,
        "directions": directions,
    }
    if space.conditional:
        identity["conditional"] = {
            key: [parent, {str(v): repr(d) for v, d in table.items()}]
            for key, (parent, table) in space.conditional.items()
        }
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{experiment}-{digest}"


def resolve_sampler_name(options: Any, space: SearchSpace) -> str:
    name = options.sampler
    if name not in SAMPLERS:
        raise SweepConfigError(f"hydra.sweeper.sampler: unknown '{name}'; use one of {', '.join(SAMPLERS)}")
    if name == "auto":
        return "grid" if space.is_finite else "tpe"
    if name == "grid" and not space.is_finite:
        infinite = sorted(set(space.distributions) - set(space.grid_values))
        raise SweepConfigError(
            f"hydra.sweeper.sampler=grid needs finite lists, but {', '.join(infinite)} are intervals; "
            "use a list (a,b,c) or range(), or another sampler"
        )
    return name


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for ask/tell loops: ours stops when the grid is covered.

    Optuna's GridSampler calls ``study.stop()`` after the last grid point, which is only legal
    inside ``study.optimize``.
    """

    def after_trial(self, study: optuna.Study, trial: Any, state: Any, values: Any) -> None:
        return None


def build_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    if name == "grid":
        return AskTellGridSampler(space.grid_values, seed=seed)
    if name == "tpe":  # the constant liar keeps parallel workers from sampling next to each other's running trials
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed)


def proposal_seed(study_seed: int, proposal: int) -> int:
    """The sampler seed of a study's Nth proposal: the study seed itself for the first, a seed derived
    from both for the others. Seeding each proposal (not each worker process) makes a sweep that was
    stopped and resumed, or shared by several workers, propose what one uninterrupted worker would."""
    if proposal == 0:
        return study_seed
    digest = hashlib.sha256(f"{study_seed}:{proposal}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def proposals_made(trials: list[Any]) -> int:
    """How many trials the sampler proposed: enqueued ones (grid points, racing) carry Optuna's
    ``fixed_params`` and re-runs its retry callback's ``failed_trial``; neither was proposed."""
    return sum("fixed_params" not in t.system_attrs and "failed_trial" not in t.system_attrs for t in trials)


WILCOXON_STARTUP_IMAGES = 6  # paired images needed before the test may prune


def build_pruner(options: Any) -> optuna.pruners.BasePruner:
    name = options.pruner
    if name not in PRUNERS:
        raise SweepConfigError(f"hydra.sweeper.pruner: unknown '{name}'; use one of {', '.join(PRUNERS)}")
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=options.pruner_startup_trials, n_warmup_steps=options.pruner_warmup_steps
        )
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "wilcoxon":
        # Paired signed-rank test of this trial's per-image values against the best trial's on the
        # same images (sweeper.search.trial numbers them); it stops a trial once it is worse at p < 0.1.
        with warnings.catch_warnings():  # "experimental" in Optuna, and exactly the test we want
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=WILCOXON_STARTUP_IMAGES)
    return optuna.pruners.NopPruner()
