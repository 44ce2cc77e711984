"""A test hook: hold one training run in place, so fault tests can signal a trial mid-training.

Fault tests (a signal to a sweep, a frozen worker, a killed journal worker) need a trial that is
alive and training when they strike; training one for hundreds of steps only to keep it alive cost
CI minutes. ``LORA_SWEEPER_HOLD_RUN=N`` makes the N-th training run of this process print
``HOLD_LINE`` and wait at its first step until the process is signalled or killed. Unset (always,
outside tests), it does nothing.
"""

from __future__ import annotations

import os
import sys
import time

HOLD_ENV = "LORA_SWEEPER_HOLD_RUN"
HOLD_LINE = "held for a test"
_runs_started = 0


def hold_if_asked() -> None:
    """Called once as each training run starts its first step."""
    global _runs_started
    _runs_started += 1
    wanted = os.environ.get(HOLD_ENV)
    if not wanted or int(wanted) != _runs_started:
        return
    print(f"\n{HOLD_LINE} ({HOLD_ENV}={wanted}): training run {_runs_started} waits for a signal", flush=True)
    sys.stderr.flush()
    while True:
        time.sleep(0.2)
