"""The daemon's lifecycle with a toy controller: start, one per home, SIGKILL, stop.

The toy is a script written into the test's directory that calls
``serve_forever`` (not ``mnp controller start``), so these tests pin the
lifecycle down whatever the real controller does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from mnp import daemon
from mnp.api import ApiClient, socket_path
from mnp.errors import InfraError
from tests.helpers import ROOT

TOY = """
import asyncio, os, sys
from pathlib import Path

from mnp.daemon import serve_forever
from mnp.errors import UsageError

home = Path(sys.argv[sys.argv.index("--home") + 1])


async def make_handler(stop):
    if "--fail" in sys.argv:
        raise RuntimeError("cannot open the store")

    async def handle(request, r):
        if request["op"] == "echo":
            await r.end({"value": request.get("value"), "pid": os.getpid()})
        elif request["op"] == "stop-me":
            await r.end({})
            stop()
        else:
            raise UsageError(f"unknown op {request['op']!r}")

    async def shutdown():
        if "--slow-shutdown" in sys.argv:
            await asyncio.sleep(1.5)
        (home / "shutdown-ran").write_text(str(os.getpid()))

    return handle, shutdown


sys.exit(serve_forever(home, make_handler))
"""


class Toy:
    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.script = tmp_path / "toy_controller.py"
        self.script.write_text(TOY)
        self.command = [sys.executable, str(self.script)]

    def start(self, *extra: str, timeout: float = 10.0) -> int:
        return daemon.start_background(self.home, list(extra), timeout, command=self.command)

    def procs(self) -> list[psutil.Process]:
        """Live processes running this toy."""
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(self.script) in (
                p.info["cmdline"] or []
            ):
                found.append(p)
        return found

    def log(self) -> str:
        return (self.home / daemon.LOG_NAME).read_text()


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Toy]:
    t = Toy(tmp_path)
    try:
        yield t
    finally:
        for p in t.procs():
            p.kill()
        psutil.wait_procs(t.procs(), timeout=5)


def wait_until(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_start_status_stop(toy: Toy) -> None:
    pid = toy.start()
    assert [p.pid for p in toy.procs()] == [pid]
    st = daemon.status(toy.home)
    assert st["running"] and st["answering"] and st["pid"] == pid
    assert 0 <= st["uptime"] < 10 and st["socket"] == socket_path(toy.home.resolve())
    assert daemon.Lock(toy.home).holder() == pid
    assert os.getsid(pid) == pid  # detached: its own session
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == str(toy.home.resolve() / daemon.LOG_NAME)

    with daemon.ensure_client(toy.home, [], command=toy.command) as c:
        assert c.request("echo", value="hi") == {
            "ok": True,
            "value": "hi",
            "pid": pid,
            "id": 1,
            "end": True,
        }
        ping = c.request("ping")
        assert ping["pid"] == pid and ping["home"] == str(toy.home.resolve())

    assert daemon.stop(toy.home, timeout=5) is True
    assert (toy.home / "shutdown-ran").read_text() == str(pid)
    assert not os.path.exists(socket_path(toy.home))
    assert daemon.Lock(toy.home).holder() is None
    wait_until(lambda: not toy.procs())
    assert daemon.status(toy.home)["running"] is False
    assert daemon.stop(toy.home, timeout=5) is False
    log = toy.log()
    assert "ready" in log and "stopped" in log
    assert log.splitlines()[0][:4].isdigit()  # timestamped


def test_concurrent_starts_end_with_one_controller(toy: Toy) -> None:
    with ThreadPoolExecutor(4) as pool:
        pids = list(pool.map(lambda _: toy.start(), range(4)))
    assert len(set(pids)) == 1
    wait_until(lambda: len(toy.procs()) == 1)
    assert toy.procs()[0].pid == pids[0]
    assert toy.log().count("a controller already runs for") == 3
    assert daemon.stop(toy.home, timeout=5)


def test_sigkill_releases_the_lock_and_a_new_start_works(toy: Toy) -> None:
    pid = toy.start()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    assert daemon.Lock(toy.home).holder() is None
    assert os.path.exists(socket_path(toy.home))  # stale, left behind
    assert ApiClient.connect(toy.home) is None
    st = daemon.status(toy.home)
    assert st["running"] is False

    new = toy.start()
    assert new != pid
    with daemon.ensure_client(toy.home, [], command=toy.command) as c:
        assert c.request("echo")["pid"] == new
    assert daemon.stop(toy.home, timeout=5)


def test_a_second_foreground_controller_exits_0(toy: Toy) -> None:
    pid = toy.start()
    r = subprocess.run(
        [*toy.command, "--home", str(toy.home)],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 0
    assert f"mnp: a controller already runs for {toy.home.resolve()} (pid {pid})" in r.stderr
    assert daemon.stop(toy.home, timeout=5)


def test_sigterm_and_the_stop_callback_shut_down_gracefully(toy: Toy) -> None:
    for how in ("SIGTERM", "stop-me"):
        proc = subprocess.Popen(
            [*toy.command, "--home", str(toy.home)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            wait_until(lambda: daemon.status(toy.home)["answering"])
            if how == "SIGTERM":
                proc.send_signal(signal.SIGTERM)
            else:
                with ApiClient.connect(toy.home) as c:  # type: ignore[union-attr]
                    c.request("stop-me")
            _, err = proc.communicate(timeout=5)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, err
        assert (toy.home / "shutdown-ran").read_text() == str(proc.pid)
        assert not os.path.exists(socket_path(toy.home))
        assert "stopped" in err
        (toy.home / "shutdown-ran").unlink()


def test_a_controller_that_fails_to_start_is_reported_with_its_log(toy: Toy) -> None:
    with pytest.raises(InfraError) as info:
        toy.start("--fail")
    msg = str(info.value)
    assert "exited with code 1" in msg
    assert "RuntimeError: cannot open the store" in msg
    assert daemon.status(toy.home)["running"] is False


def test_a_start_while_the_old_controller_stops_gets_a_new_one(toy: Toy) -> None:
    old = toy.start("--slow-shutdown")
    with ApiClient.connect(toy.home) as c:  # type: ignore[union-attr]
        assert c.request("shutdown")["stopping"] is True
    new = toy.start()
    assert new != old
    assert (toy.home / "shutdown-ran").read_text() == str(old)
    assert "a controller already runs for" in toy.log()
    assert daemon.stop(toy.home, timeout=5)


def test_stop_signals_a_controller_that_holds_the_lock_without_answering(toy: Toy) -> None:
    pid = toy.start()
    os.unlink(socket_path(toy.home))  # as if it were still starting up
    assert daemon.status(toy.home) == {
        "running": True,
        "answering": False,
        "pid": pid,
        "socket": socket_path(toy.home),
        "home": str(toy.home),
    }
    assert daemon.stop(toy.home, timeout=5) is True
    wait_until(lambda: not toy.procs())
