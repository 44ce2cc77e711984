"""A thin Hydra Sweeper that hands multirun (``-m``) to lora-sweeper's Optuna search.

Hydra imports every module under ``hydra_plugins`` at start-up, so this file imports nothing
heavy: the implementation is loaded only when a sweep actually runs.
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from sweeper.search.settings import OptunaSweeperConf

ConfigStore.instance().store(group="hydra/sweeper", name="lora_optuna", node=OptunaSweeperConf, provider="lora-sweeper")


class LoraOptunaSweeper(Sweeper):
    def __init__(self, **options: Any) -> None:
        from sweeper.search.optuna_sweep import OptunaSweep

        self._sweep = OptunaSweep(OptunaSweeperConf(**options))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self._sweep.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from sweeper.search.optuna_sweep import run_reporting_errors

        return run_reporting_errors(self._sweep, arguments)
