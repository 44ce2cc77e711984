"""``python -m sweeper [overrides]``: one LoRA run on the configured model and data."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sweeper.config.versions import check_versions_or_exit
from sweeper.tracking.credentials import move_passwords_to_env

# Before Hydra sees the command line: a URL's password moves into the environment, so that no
# .hydra file, multirun.yaml, MLflow param or artifact, log or terminal line can show it.
sys.argv[:] = move_passwords_to_env(sys.argv)

# Only light modules are imported until a run starts: --help, a misspelt key and a refused override
# answer in about a second, without torch, diffusers, transformers or mlflow (the task imports those).
check_versions_or_exit()  # before the libraries it checks are imported

from sweeper.config.schema import PROJECT_ROOT, register_configs, register_resolvers  # noqa: E402

register_resolvers()
register_configs()


def quiet_libraries() -> None:
    """Our own progress bar and summary are the output; the libraries' load chatter is noise.

    Called before the pipeline modules are imported: transformers warns at import time that
    torchvision is missing (we use the PIL image processors on purpose).
    """
    import diffusers
    import transformers

    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


# An absolute path: run as the lora-sweeper script, Hydra would look for "../conf" as a Python package.
@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """One run. In a sweep (``-m``) each trial is this same function; errors then fail the trial only."""
    if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep checks every grid point before its first trial
        _exit_on_early_problems(cfg)
    quiet_libraries()  # heavy imports only once the config composed, and silenced before they load
    from sweeper.config.validate import ConfigError
    from sweeper.run.setting import run
    from sweeper.tracking.store import TrackingUnavailableError
    from training.network.file import LoraNotSavedError

    hydra_cfg = HydraConfig.get()

    try:
        result = run(cfg, overrides=list(hydra_cfg.overrides.task))
    except (ConfigError, TrackingUnavailableError) as error:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise
        print(error, file=sys.stderr)
        sys.exit(2)
    except LoraNotSavedError as error:  # training finished; the file is kept elsewhere: a message, not a traceback
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise
        print(f"\n{error}", file=sys.stderr)
        if error.rescued is not None:
            print(f"The trained LoRA is safe at: {error.rescued}", file=sys.stderr)
        sys.exit(1)
    metrics = result.metrics
    replicates = result.replicates or [
        {"seed": cfg.train.seed, "per_image": result.per_image, "prompts": result.prompts, "stopped_early": False}
    ]
    returned = {
        "metrics": metrics,
        "pruned": result.stopped_early,
        "run_id": result.run_id,
        "per_image": result.per_image,
        # each seed's per-image values: what the sweep's verdict compares settings on
        "replicates": [{k: r[k] for k in ("seed", "per_image", "prompts", "stopped_early")} for r in replicates],
    }
    if hydra_cfg.mode == RunMode.MULTIRUN:  # a sweep prints one line per trial and the final table
        return returned
    if result.replicates:
        print(f"\nScores over {len(result.replicates)} training seeds (95% intervals over seeds x prompts x images;")
        print("gain = paired difference to the base model):")
    else:
        print(f"\nScores at step {result.selected_step} of this file (95% prompt-clustered intervals; gain = paired")
        print(
            "difference to the base model; another training seed gives other values: train.replicates=3 says how far):"
        )
    for line in result.summary:
        print(f"  {line}")
    if result.note:
        print(f"note: {result.note}")
    print(f"LoRA file:  {result.lora_path.resolve()}")
    if result.replicates:
        print("            (the seed whose score is nearest the setting's mean; every seed's file is in seed-*/)")
    if result.run_id:
        print(f"MLflow run: {result.run_id}")
        print(f"MLflow UI:  {result.ui_command}")
    return returned


def _exit_on_early_problems(cfg: DictConfig) -> None:
    """The config's own values and data folders, checked before the model libraries load (seconds, not
    ~15 s); the model, network file and speed checks follow in the run, with everything else."""
    from sweeper.config.validate import ConfigError, early_problems

    if problems := early_problems(cfg):
        print(ConfigError(problems), file=sys.stderr)
        print("(the model, network-file and speed options are checked once these are fixed)", file=sys.stderr)
        sys.exit(2)


def command_line_problems(args: Any) -> list[str]:
    """Unknown keys and group options among the overrides, before Hydra composes (sweeper/config/cli_overrides.py).

    Left to Hydra: shell completion (it queries half-typed words) and another primary config
    (``--config-name``, ``--config-path``), which the schema does not describe. Group options are
    not checked where other config folders add options (``--config-dir``, ``hydra.searchpath``: an
    imported ``+experiment=...`` written elsewhere).
    """
    from sweeper.config.cli_overrides import override_problems

    if args is None or args.shell_completion or args.config_name or args.config_path or args.experimental_rerun:
        return []
    searched = any(o.lstrip("+~").startswith("hydra.searchpath") for o in args.overrides)
    return override_problems(args.overrides, check_options=not (args.config_dir or searched))


def _parsed_args(argv: list[str]) -> Any:
    """Hydra's own reading of the command line; None where it refuses it (Hydra then says why)."""
    from hydra._internal.utils import get_args_parser

    try:
        return get_args_parser().parse_known_args(argv)[0]
    except SystemExit:
        return None


@contextlib.contextmanager
def _help_without_group_listings(enabled: bool) -> Iterator[None]:
    """Hydra's ``--help`` lists every config group twice ($APP_CONFIG_GROUPS, $HYDRA_CONFIG_GROUPS)
    whether or not the template shows them, and each group's listing deep-copies the whole
    ConfigStore: about 2 of --help's 3 seconds. Our template (conf/config.yaml) uses neither: it
    lists the groups itself (``${option_groups:}``). ``--hydra-help``'s template does use them."""
    from hydra._internal.hydra import Hydra

    original = getattr(Hydra, "format_config_groups", None)
    if not enabled or original is None:
        yield
        return
    Hydra.format_config_groups = lambda self, predicate, compact=True: ""  # type: ignore[method-assign]
    try:
        yield
    finally:  # the class is Hydra's: a test calling entry() in-process gets it back unchanged
        Hydra.format_config_groups = original  # type: ignore[method-assign]


def entry() -> None:
    """``main`` with SIGTERM handled like Ctrl-C, and the shell's exit status for each (130, 143)."""
    from sweeper.config.cli_overrides import unknown_names_message
    from sweeper.run.signals import exit_status, handle_sigterm, interruption_reason

    handle_sigterm()
    args = _parsed_args(sys.argv[1:])
    problems = command_line_problems(args)
    if problems:
        print(unknown_names_message(problems), file=sys.stderr)
        sys.exit(2)
    shows_only = args is not None and (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion)
    if args is not None and args.multirun and not shows_only:
        quiet_libraries()  # the sweeper loads the task's modules before its first trial calls main
    try:
        with _help_without_group_listings(args is not None and args.help and not args.hydra_help):
            main()
    except KeyboardInterrupt as interrupted:
        print(f"\nStopped: {interruption_reason(interrupted)}", file=sys.stderr)
        sys.exit(exit_status(interrupted))
    except BrokenPipeError:  # ``lora-sweeper --help | head``: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
        sys.exit(1)


if __name__ == "__main__":
    entry()
