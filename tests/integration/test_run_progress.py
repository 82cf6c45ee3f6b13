"""``mnp run`` of an array or multi-node job draws a progress line on stderr when it is a
terminal (a real pty), and nothing of it otherwise (issue 17)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers import mnp as mnp_cli

ARRAY = ["--array-size", "4", "--", "sh", "-c", "sleep 0.3; echo $MNP_ARRAY_INDEX"]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    e = {**os.environ, "MNP_HOME": str(tmp_path / "home")}
    yield e
    mnp_cli("controller", "stop", env=e)


def run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """``mnp run ARGS`` with stderr on a pty: exit code, stdout, what the terminal got."""
    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "mnp", "run", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=slave, text=True,
    )  # fmt: skip
    os.close(slave)
    got = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the pty
                break
            if not chunk:
                break
            got += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    assert p.stdout is not None
    with p.stdout:
        out = p.stdout.read()
    return p.wait(timeout=30), out, got.decode()


@pytest.mark.parametrize("through", ["itself", "a running controller"])
def test_an_array_run_on_a_terminal_shows_progress(env: dict[str, str], through: str) -> None:
    if through != "itself":
        assert mnp_cli("controller", "start", env=env).returncode == 0
    code, out, terminal = run_on_a_terminal(ARRAY, env)
    assert code == 0 and sorted(out.splitlines()) == [f"{i}: {i}" for i in range(4)]
    assert "\r\x1b[Kmnp: job 1: " in terminal and "/4 children done" in terminal
    if through == "itself":  # every state change is drawn as it happens
        assert "4/4 children done, 0 running, 0 failed" in terminal
    assert terminal.endswith("\r\x1b[K")  # the line is cleared at the end


def test_a_multinode_run_counts_nodes(env: dict[str, str]) -> None:
    code, _, terminal = run_on_a_terminal(["--nodes", "2", "--", "true"], env)
    assert code == 0 and "2/2 nodes done" in terminal


def test_nothing_when_stderr_is_not_a_terminal_or_the_job_is_single(env: dict[str, str]) -> None:
    r = mnp_cli("run", *ARRAY, env=env)
    assert r.returncode == 0 and r.stderr == ""
    code, out, terminal = run_on_a_terminal(["--", "echo", "one"], env)
    assert (code, out, terminal) == (0, "one\n", "")
