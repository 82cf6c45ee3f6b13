"""Helpers shared by the tests: running the CLI, finding leftover processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


def mnp(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mnp ARGS`` from the repository root and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mnp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=kw.pop("cwd", ROOT),  # type: ignore[arg-type]
        env=full_env,
        check=False,
    )


def procs_with_env(key: str, value: str) -> list[psutil.Process]:
    """Live processes whose environment has KEY=VALUE (zombies excluded)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get(key) == value:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_no_procs(key: str, value: str, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    left = procs_with_env(key, value)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = procs_with_env(key, value)
    return left


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    """``check()``'s first true value, polled every ``every`` s; AssertionError naming
    ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(every)


def submit(env: dict[str, str], *args: str) -> str:
    """``mnp submit ARGS`` with ``env``; the job id it printed."""
    r = mnp("submit", *args, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def describe(env: dict[str, str], job: str) -> dict[str, Any]:
    """``mnp describe JOB --json`` with ``env``."""
    r = mnp("describe", job, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def controller_pid(env: dict[str, str]) -> int:
    st = json.loads(mnp("controller", "status", "--json", env=env).stdout)
    return int(st["pid"])


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    """Wait, on the running loop, until ``check()`` holds; AssertionError after ``within`` s."""
    import asyncio

    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g}s: {what}")
        await asyncio.sleep(0.2)


def allocs(c: Any) -> list[dict[str, Any]]:
    """Every allocation of a controller's managed compute environments, as shown."""
    return [a for env in c.managed.views() for a in env["allocations"]]
