"""``mnp top`` in a real terminal: tmux runs it, ``capture-pane`` reads the screen,
``send-keys q`` quits it (issue 17)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mnp.top import render
from tests.helpers import ROOT
from tests.helpers import mnp as mnp_cli


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    e = {"MNP_HOME": str(tmp_path / "home")}
    yield e
    mnp_cli("controller", "stop", env=e)


def tmux(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=30, check=False
    )


def screen_until(sock: str, wanted: list[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        shown = tmux(sock, "capture-pane", "-p", "-t", "top").stdout
        if all(w in shown for w in wanted) or time.monotonic() > deadline:
            return shown
        time.sleep(0.2)


def test_top_shows_hosts_queues_jobs_and_failures_and_q_quits(
    env: dict[str, str], tmp_path: Path
) -> None:
    failed = mnp_cli("submit", "--name", "broken", "--wait", "--", "sh", "-c", "exit 3", env=env)
    assert failed.returncode == 3
    running = mnp_cli("submit", "--name", "sleeper", "--vcpus", "2", "--", "sleep", "60", env=env)
    assert running.returncode == 0, running.stderr
    waiting = mnp_cli(
        "submit", "--name", "later", "--depends-on", running.stdout.strip(), "--", "true", env=env
    )
    assert waiting.returncode == 0
    sock = f"mnp-top-{os.getpid()}"
    command = " ".join(
        shlex.quote(a)
        for a in ["env", f"MNP_HOME={env['MNP_HOME']}", sys.executable, "-m", "mnp", "top"]
    )
    started = tmux(sock, "new-session", "-d", "-s", "top", "-x", "120", "-y", "40", "-c",
                   str(ROOT), command)  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        shown = screen_until(
            sock, ["HOST", "local-0", "QUEUE", "default", "sleeper", "later", "broken", "2/"]
        )
        assert shown.startswith("mnp top - ") and "q quits" in shown, shown
        lines = shown.splitlines()
        host = next(line for line in lines if line.startswith("local-"))
        assert host.split()[1] == "up"
        assert any(line.split()[:2] == ["default", "ENABLED"] for line in lines), shown
        assert "RUNNING (1)" in shown and "WAITING (1)" in shown and "RECENT FAILURES (1)" in shown
        first = shown.splitlines()[0]
        # it refreshes: the clock in the first line moves on
        deadline = time.monotonic() + 10
        while screen_until(sock, []).splitlines()[0] == first:
            assert time.monotonic() < deadline, "the view did not refresh"
            time.sleep(0.2)
        tmux(sock, "send-keys", "-t", "top", "q")
        deadline = time.monotonic() + 10
        while tmux(sock, "has-session", "-t", "top").returncode == 0:
            assert time.monotonic() < deadline, "q did not quit"
            time.sleep(0.1)
    finally:
        tmux(sock, "kill-server")


def test_top_refuses_without_a_terminal(env: dict[str, str]) -> None:
    r = mnp_cli("top", env=env)
    assert r.returncode == 2 and r.stderr == (
        "mnp: mnp top needs a terminal (stdin and stdout); use mnp list, mnp hosts\n"
    )


def test_render_without_a_controller_cuts_lines_to_the_width() -> None:
    snap = {
        "time": 100.0, "home": "/h", "controller": False, "hosts": [], "queues": [],
        "running": [], "waiting": [],
        "failed": [{"id": "7", "name": "x" * 50, "state": "FAILED", "queue": "q",
                    "stopped": 40.0, "reason": "Exited 3"}],
    }  # fmt: skip
    lines = render(snap, 200)
    assert lines[2] == "no controller runs for this home: hosts and queues are not known"
    assert "RECENT FAILURES (1)" in lines
    failure = next(line for line in lines if line.startswith("  7 "))
    assert failure.split()[1:] == ["x" * 20, "FAILED", "q", "60s", "Exited", "3"]
    narrow = render(snap, 60)
    assert all(len(line) <= 60 for line in narrow) and narrow != lines
