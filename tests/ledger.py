"""The fault ledger: what the reliability and security tests did to mnp, and what it cost.

Tests marked ``faults`` record, through the ``ledger`` fixture, the faults they
inject, the jobs accepted and lost, the orphan processes found, the malformed inputs
tried (and any that escaped as a traceback) and the security checks made. At the end
of the run pytest prints the totals:

    python -m pytest -m faults        # the reliability and security suite alone

Numbers are recorded as measured, before the test asserts on them, so a failing run
shows what was actually found. A test marked ``@pytest.mark.security("what it checks")``
is a security check: counted as passed or failed with the test (and run by ``-m faults``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest


@dataclass
class Ledger:
    faults: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    lost: int = 0
    orphans: int = 0
    inputs: Counter[str] = field(default_factory=Counter)
    escaped: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    failed_checks: Counter[str] = field(default_factory=Counter)

    def fault(self, kind: str, n: int = 1) -> None:
        """``n`` faults of ``kind`` were injected."""
        self.faults[kind] += n

    def jobs(self, accepted: int, lost: int) -> None:
        """``accepted`` jobs were accepted by mnp; ``lost`` of them never ended exactly once."""
        self.accepted += accepted
        self.lost += lost

    def orphans_found(self, n: int) -> None:
        """``n`` job processes were found alive that nothing managed any more."""
        self.orphans += n

    def input(self, kind: str, escaped: bool = False) -> None:
        """One malformed input of ``kind`` was tried; ``escaped``: it got a traceback (or
        an exception other than MnpError) instead of a clean refusal."""
        self.inputs[kind] += 1
        if escaped:
            self.escaped[kind] += 1

    @contextmanager
    def tried(self, kind: str) -> Iterator[None]:
        """One malformed input of ``kind`` is tried in the block, which asserts it is refused
        cleanly: any exception but a failed assertion escaping it counts as escaped."""
        try:
            yield
        except (AssertionError, pytest.fail.Exception):
            self.input(kind)
            raise
        except BaseException:
            self.input(kind, escaped=True)
            raise
        self.input(kind)

    def empty(self) -> bool:
        return not (self.faults or self.inputs or self.checks or self.failed_checks)

    def summary(self) -> list[str]:
        def parts(c: Counter[str]) -> str:
            return ", ".join(f"{k} {v:,}" for k, v in sorted(c.items()))

        lines = [
            f"faults injected: {sum(self.faults.values()):,} ({parts(self.faults)})",
            f"jobs accepted under faults: {self.accepted:,}; jobs lost: {self.lost}",
            f"orphan processes found: {self.orphans}",
            f"malformed inputs tried: {sum(self.inputs.values()):,} ({parts(self.inputs)})",
            f"inputs that escaped as a traceback: {sum(self.escaped.values())}"
            + (f" ({parts(self.escaped)})" if self.escaped else ""),
            f"security checks passed: {sum(self.checks.values())} ({parts(self.checks)})",
        ]
        if self.failed_checks:
            lines.append(f"security checks FAILED: {parts(self.failed_checks)}")
        return lines


_LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return _LEDGER


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: the reliability and security suite (prints the fault ledger)"
    )
    config.addinivalue_line(
        "markers", "security(what): a security check, counted in the fault ledger"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # before -m selects: a security check is part of the suite
        if item.get_closest_marker("security") is not None:
            item.add_marker(pytest.mark.faults)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    mark = item.get_closest_marker("security")
    if mark is None or report.when != "call":
        return
    name = str(mark.args[0])
    if report.passed:
        _LEDGER.checks[name] += 1
    elif report.failed:
        _LEDGER.failed_checks[name] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LEDGER.empty():
        return
    terminalreporter.write_sep("=", "mnp fault ledger")
    for line in _LEDGER.summary():
        terminalreporter.write_line(line)
