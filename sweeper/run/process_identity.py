"""Which process owns a record (a running trial, an MLflow run), and whether that process still lives.

A record left RUNNING by a worker that was killed (kill -9, the OOM killer) is stale. On the same
host this is known at once: the pid is gone, or now belongs to a process started at another time
(pid reuse). On another host only the heartbeat can tell, so ``is_gone`` answers None there.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

HOST, PID, STARTED = "worker.host", "worker.pid", "worker.started"


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which pid reuse changes; None
    when the process is gone or a zombie (killed, not yet reaped by its parent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # state is field 3, start time field 22


def this_process() -> dict[str, str]:
    pid = os.getpid()
    return {HOST: socket.gethostname(), PID: str(pid), STARTED: _start_ticks(pid) or ""}


def is_gone(identity: dict[str, str]) -> bool | None:
    """True when the owning process has ended, False when it runs, None when it is on another host
    (or the record names no process)."""
    host, pid = identity.get(HOST), identity.get(PID)
    if not host or not pid or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    current = _start_ticks(int(pid))
    if current is None:
        return Path("/proc").is_dir()  # no /proc (not Linux): the pid answered, so take it as alive
    started = identity.get(STARTED)
    return bool(started) and current != started
