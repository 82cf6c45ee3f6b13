"""The code stays lint-clean and type-checked (mypy strict on mnp/), as CI enforces."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import ROOT


def test_ruff_is_clean() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_is_clean() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr


PURE = (
    "mnp/sched/lifecycle.py",
    "mnp/sched/decide.py",
    "mnp/sched/autoscale.py",
    "mnp/wiring.py",
    "mnp/pmi/layout.py",
    "mnp/pmi/exchange.py",
)
"""Modules of decisions: they import nothing that does I/O and never read the clock."""


def test_pure_modules_import_no_io_and_read_no_clock() -> None:
    import ast

    io = {"asyncio", "socket", "subprocess", "os", "time", "sqlite3", "asyncssh", "threading"}
    for path in PURE:
        tree = ast.parse((ROOT / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
                if node.module and node.module.startswith("mnp."):
                    assert node.module in ("mnp.model", "mnp.jobs", "mnp.wiring", "mnp.jobid") or (
                        node.module.startswith("mnp.sched")
                    ), (path, node.module)
            else:
                continue
            assert not names & io, (path, names & io)


MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 450


def test_no_module_over_700_lines_and_no_class_over_450() -> None:
    """A room that outgrows these has more than one job: cut it by what it does."""
    too_big = []
    for path in sorted((ROOT / "mnp").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{path.relative_to(ROOT)}: class {node.name}: {size} lines")
    assert not too_big, too_big
