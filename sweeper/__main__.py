"""``python -m sweeper [overrides]``: one LoRA run on the configured model and data."""

from __future__ import annotations

import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sweeper.credentials import move_passwords_to_env
from sweeper.versions import check_versions_or_exit

# Before Hydra sees the command line: a URL's password moves into the environment, so that no
# .hydra file, multirun.yaml, MLflow param or artifact, log or terminal line can show it.
sys.argv[:] = move_passwords_to_env(sys.argv)


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


check_versions_or_exit()  # before the libraries it checks are imported
quiet_libraries()

from sweeper.config import register_configs, register_resolvers  # noqa: E402
from sweeper.tracking_store import TrackingUnavailableError  # noqa: E402
from sweeper.validate import ConfigError  # noqa: E402

register_resolvers()
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """One run. In a sweep (``-m``) each trial is this same function; errors then fail the trial only."""
    from sweeper.task import run  # heavy imports only once the config composed

    hydra_cfg = HydraConfig.get()
    from training.network.file import LoraNotSavedError

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
    print(f"LoRA file:  {result.lora_path.resolve()}")
    if result.replicates:
        print("            (the seed whose score is nearest the setting's mean; every seed's file is in seed-*/)")
    if result.run_id:
        print(f"MLflow run: {result.run_id}")
        print(f"MLflow UI:  {result.ui_command}")
    return returned


def entry() -> None:
    """``main`` with SIGTERM handled like Ctrl-C, and the shell's exit status for each (130, 143)."""
    from sweeper.signals import exit_status, handle_sigterm, interruption_reason

    handle_sigterm()
    try:
        main()
    except KeyboardInterrupt as interrupted:
        print(f"\nStopped: {interruption_reason(interrupted)}", file=sys.stderr)
        sys.exit(exit_status(interrupted))


if __name__ == "__main__":
    entry()
