"""``hydra.sweeper.n_workers=N|auto``: N worker processes on this machine, all on the same study.

Each worker is the same sweep command with ``n_workers=1``, started in its own process with
``CUDA_VISIBLE_DEVICES`` set to one GPU (round robin when N exceeds the GPUs), so one command fills a
multi-GPU machine. The workers coordinate through the study's storage exactly as workers on several
machines do (``sweeper.search.lock``); this process only starts them, labels their output, passes
Ctrl-C / SIGTERM on, and exits with the first failing worker's status.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from sweeper.search.study import SweepConfigError

N_WORKERS_OVERRIDE = re.compile(r"^(\+\+|\+)?hydra\.sweeper\.n_workers=")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (ids or UUIDs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def resolve_n_workers(value: Any, gpus: list[str] | None = None) -> int:
    """``auto`` = one worker per visible GPU (one on a CPU-only machine); otherwise a positive int."""
    if str(value).lower() == "auto":
        return max(1, len(visible_gpus() if gpus is None else gpus))
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise SweepConfigError(f"hydra.sweeper.n_workers={value}: give a positive number of workers or auto")
    return count


def worker_commands(argv: list[str], sweep_dir: Path, count: int) -> list[list[str]]:
    """The command of each worker: this sweep with n_workers=1, writing into the same sweep folder."""
    kept = [arg for arg in argv if not N_WORKERS_OVERRIDE.match(arg) and not arg.startswith("hydra.sweep.dir=")]
    command = [sys.executable, "-m", "sweeper", *kept, "hydra.sweeper.n_workers=1", f"hydra.sweep.dir={sweep_dir}"]
    return [list(command) for _ in range(count)]


def run_workers(count: int, sweep_dir: Path, argv: list[str] | None = None) -> int:
    """Start ``count`` workers, stream their output prefixed ``[worker i]``, wait; the worst exit status."""
    gpus = visible_gpus()
    commands = worker_commands(sys.argv[1:] if argv is None else argv, sweep_dir, count)
    placement = f"GPUs {', '.join(gpus)}" if gpus else "the CPU"
    print(f"Starting {count} sweep workers on {placement}; each runs one trial at a time on the same study")
    processes: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for index, command in enumerate(commands):
        env = {**os.environ, "LORA_SWEEPER_WORKER": str(index)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        process = subprocess.Popen(  # own session: a terminal's Ctrl-C reaches them once, through us
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        processes.append(process)
        pump = threading.Thread(target=_prefix_lines, args=(process, f"[worker {index}] "), daemon=True)
        pump.start()
        pumps.append(pump)
    try:
        statuses = [process.wait() for process in processes]
    except KeyboardInterrupt as interrupted:  # Ctrl-C or SIGTERM here: every worker gets the same signal
        forwarded = signal.SIGTERM if "SIGTERM" in str(interrupted) else signal.SIGINT
        for process in processes:
            if process.poll() is None:
                process.send_signal(forwarded)
        for process in processes:
            process.wait()
        raise
    finally:
        for pump in pumps:
            pump.join(timeout=5)
    failed = [status for status in statuses if status != 0]
    return failed[0] if failed else 0


def _prefix_lines(process: subprocess.Popen, prefix: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()
