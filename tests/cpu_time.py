"""Per-test CPU seconds (this process and its finished children), the costliest listed at the end.

Wall time on a 2-core machine says as much about what else ran as about the test; CPU seconds are
what CI pays. ``LORA_SWEEPER_CPU_REPORT=path`` also writes every test's seconds as TSV there.

Each test's seconds travel in its teardown report (``user_properties``), so the summary is the same
whether the tests ran in this process or in pytest-xdist's workers.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

SHOWN = 20
PROPERTY = "cpu_seconds"
_started: dict[str, float] = {}
_seconds: dict[str, float] = {}


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _started[item.nodeid] = _cpu()  # setup counts: the fixtures this test was first to need


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    if call.when == "teardown" and item.nodeid in _started:
        outcome.get_result().user_properties.append((PROPERTY, _cpu() - _started.pop(item.nodeid)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == PROPERTY and report.when == "teardown":
            _seconds[report.nodeid] = value


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
