"""A kohya sd-scripts / LoRA_Easy training config as a Hydra experiment (``python -m sweeper.import_kohya``).

Reads a kohya sd-scripts training TOML (flat, or sectioned like ``[model_arguments]``; an inline or
referenced ``dataset_config`` too), a LoRA_Easy_Training_Scripts TOML (its sections
``[general_args.args]``, ``[network_args.args]``, ``[optimizer_args.args]``, ... and
``[[subsets]]``) or JSON (its own option names, e.g. ``net_dim``, are renamed to sd-scripts' first,
as LoRA_Easy itself does), maps every option it knows onto our keys (the table in PARAMETERS.md)
and writes ``conf/experiment/<name>.yaml``:

    # @package _global_
    defaults:
      - override /optimizer: adamw     # group choices go through the defaults list
    network:
      dim: 32                          # network_dim

The report lists every option mapped (old -> new), every option not mapped with the reason, and
what cannot apply on this machine with the override that makes the experiment run here; only an
unreadable input fails (exit 2).

Modules: ``reading`` (file -> options and subsets), ``subsets`` (folders, repeats, captions),
``rules`` + ``mapper`` (options -> our keys), ``machine`` (checks on this machine), ``result``
(report and YAML), ``cli`` (the command).
"""

from sweeper.kohya_import.cli import experiment_name as experiment_name
from sweeper.kohya_import.cli import import_config, main, write_experiment
from sweeper.kohya_import.reading import UnreadableConfig
from sweeper.kohya_import.result import ImportResult, yaml_value

__all__ = ["ImportResult", "UnreadableConfig", "experiment_name", "import_config", "main", "write_experiment"]
__all__ += ["yaml_value"]
