"""Per-test CPU seconds (this process and its finished children), the costliest listed at the end.

Wall time on a 2-core machine says as much about what else ran as about the test; CPU seconds are
what CI pays. ``LORA_SWEEPER_CPU_REPORT=path`` also writes every test's seconds as TSV there.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

SHOWN = 20
_seconds: dict[str, float] = {}


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    started = _cpu()
    yield
    _seconds[item.nodeid] = _cpu() - started  # setup (fixtures it was first to need), call, teardown


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _seconds:
        return
    costliest = sorted(_seconds.items(), key=lambda item: -item[1])
    total = sum(_seconds.values())
    terminalreporter.write_sep("=", f"{SHOWN} costliest tests in CPU seconds (all {len(_seconds)}: {total:.0f} CPU-s)")
    for nodeid, seconds in costliest[:SHOWN]:
        terminalreporter.write_line(f"{seconds:8.1f}  {nodeid}")
    if report := os.environ.get("LORA_SWEEPER_CPU_REPORT"):
        Path(report).write_text("".join(f"{s:.2f}\t{n}\n" for n, s in costliest), encoding="utf-8")
