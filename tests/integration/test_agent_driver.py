"""Drives a real node agent over its pipes, for the agent's integration tests (no tests here)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]
CTL = "testtok"
Event = dict[str, Any]


def agent_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MNP_AGENT_GRACE", None)
    return env


class Agent:
    """A running agent, its events read by a thread into a queue."""

    def __init__(
        self,
        *args: str,
        ctl: str = CTL,
        cmd: list[str] | None = None,
        stdin: Any = subprocess.PIPE,
        cwd: Path = REPO,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        if cmd is None:
            cmd = [sys.executable, "-m", "mnp.agent", "--ctl", ctl, *args]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=agent_env(),
            pass_fds=pass_fds,
        )
        self.q: queue.Queue[Event | None] = queue.Queue()
        self.backlog: list[Event] = []  # received, not yet taken by expect()
        self.history: list[Event] = []  # everything received
        self.stderr = b""
        self.readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self.readers:
            t.start()
        self.ready = self.next(15)
        self.ready_after = time.monotonic() - self.t0
        assert self.ready["ev"] == "ready", self.ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            self.history.append(ev)
            self.q.put(ev)
        self.q.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def send(self, **msg: Any) -> None:
        self.send_raw(json.dumps(msg).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def next(self, timeout: float = 10) -> Event:
        if self.backlog:
            return self.backlog.pop(0)
        try:
            ev = self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event from the agent within {timeout}s") from None
        if ev is None:
            self.q.put(None)
            raise AssertionError(f"agent closed its stdout; stderr: {self.stderr!r}")
        return ev

    def expect(self, ev: str, tid: str | None = None, timeout: float = 10, **fields: Any) -> Event:
        """The first event (seen or to come) of this kind for this tid; others stay queued."""

        def match(e: Event) -> bool:
            return (
                e["ev"] == ev
                and (tid is None or e.get("tid") == tid)
                and all(e.get(k) == v for k, v in fields.items())
            )

        for i, e in enumerate(self.backlog):
            if match(e):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            try:
                e = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {ev} for {tid} within {timeout}s; saw {self.backlog[-10:]}"
                ) from None
            if e is None:
                self.q.put(None)
                raise AssertionError(
                    f"agent exited before {ev} {tid}; stderr: {self.stderr!r};"
                    f" saw {self.backlog[-10:]}"
                )
            if match(e):
                return e
            self.backlog.append(e)

    def output(self, tid: str, fd: int = 1) -> str:
        """All output of a task, after waiting for its `gone`."""
        if not any(e["ev"] == "gone" and e.get("tid") == tid for e in self.history):
            self.expect("gone", tid)
        return "".join(
            e["data"]
            for e in self.history
            if e["ev"] == "out" and e["tid"] == tid and e["fd"] == fd
        )

    def run(self, tid: str, argv: list[str], **fields: Any) -> tuple[Event, Event]:
        self.send(op="spawn", tid=tid, argv=argv, **fields)
        exited = self.expect("exited", tid)
        gone = self.expect("gone", tid)
        return exited, gone

    def close(self, timeout: float = 10) -> int:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for t in self.readers:
            t.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return rc


def tagged(pred: Callable[[str], bool], ctl: str = CTL) -> list[psutil.Process]:
    """Live processes whose MNP_JOB_ID satisfies pred and MNP_CONTROLLER_ID is ctl."""
    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if (
                env.get("MNP_CONTROLLER_ID") == ctl
                and pred(env.get("MNP_JOB_ID", ""))
                and p.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def zombie_children(pid: int) -> list[int]:
    try:
        kids = psutil.Process(pid).children()
    except psutil.Error:
        return []
    out = []
    for k in kids:
        try:
            if k.status() == psutil.STATUS_ZOMBIE:
                out.append(k.pid)
        except psutil.Error:
            pass
    return out


PY = sys.executable

# a task that starts a daemon that escapes its session (fork, setsid, fork) and exits
DAEMONIZE = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "1000"])
    os._exit(0)
time.sleep(0.2)
print("parent done", flush=True)
"""
