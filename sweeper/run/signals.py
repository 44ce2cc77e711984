"""SIGTERM ends a run the way Ctrl-C does: run KILLED, trial FAIL with the reason, a clean exit.

``docker stop``, systemd, Slurm at its time limit and Kubernetes all send SIGTERM, then SIGKILL a
few seconds later. Python's default for SIGTERM is to die on the spot, which leaves every MLflow run
and Optuna trial RUNNING for good. Raising an exception instead lets the usual clean-up run.
"""

from __future__ import annotations

import signal
from types import FrameType

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; a KeyboardInterrupt so that every Ctrl-C clean-up path handles it too."""

    def __init__(self, signal_number: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by {signal.Signals(signal_number).name}")


def _raise_terminated(signal_number: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during clean-up ends it at once
    raise Terminated(signal_number)


def handle_sigterm() -> None:
    """Install the handler (main thread only, as Python requires)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def interruption_reason(error: BaseException) -> str:
    return str(error) if isinstance(error, Terminated) else "interrupted by SIGINT (Ctrl-C)"


def exit_status(error: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED
