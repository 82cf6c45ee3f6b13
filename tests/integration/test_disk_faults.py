"""Disk and permission faults against the real controller daemon (issue 7): a log
directory that cannot be written, a log disk that fills while a job runs, a full state
disk, a full disk under ``events.jsonl``. Each ends in a clear job failure reason or a
clear refusal at submit; the controller keeps running and the store stays consistent.

The faults are small tmpfs mounts (read-only, or filled to the last byte) over parts of
``$MNP_HOME``: that needs root (or CAP_SYS_ADMIN), without which the tests are skipped.
chmod is no fault for root, so a read-only mount stands in for an unwritable directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import mnp, wait_until
from tests.ledger import Ledger

pytestmark = pytest.mark.faults

TERMINAL = ("SUCCEEDED", "FAILED")


class DiskHome:
    """An ``MNP_HOME`` for one test, with the tmpfs mounts it puts over parts of it;
    at teardown the controller stops first, then every mount goes (latest first)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(mode=0o700)
        self.env = {"MNP_HOME": str(self.home)}
        self.mounts: list[Path] = []

    def mount(self, path: Path, size: str, *options: str) -> Path:
        """A tmpfs of ``size`` on ``path`` (made if missing); options such as ``ro``."""
        path.mkdir(parents=True, exist_ok=True)
        opts = ",".join([f"size={size}", "mode=0700", *options])
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
        self.mounts.append(path)
        return path

    def bind(self, source: Path, target: Path) -> None:
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
        self.mounts.append(target)

    def remount(self, path: Path, *options: str) -> None:
        subprocess.run(["mount", "-o", ",".join(["remount", *options]), str(path)], check=True)

    def close(self) -> None:
        mnp("controller", "stop", env=self.env)
        for path in reversed(self.mounts):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)

    # --- the CLI ----------------------------------------------------------

    def start(self) -> None:
        r = mnp("controller", "start", env=self.env)
        assert r.returncode == 0, r.stderr

    def alive(self) -> bool:
        r = mnp("controller", "status", "--json", env=self.env)
        return r.returncode == 0 and bool(json.loads(r.stdout).get("answering"))

    def submit(self, *args: str) -> str:
        r = mnp("submit", *args, env=self.env)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def describe(self, job: str) -> dict[str, Any]:
        r = mnp("describe", job, "--json", env=self.env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def wait(self, job: str, timeout: float = 30) -> dict[str, Any]:
        return wait_until(
            f"job {job} to end",
            lambda: (d := self.describe(job))["state"] in TERMINAL and d,
            timeout,
        )

    def listed(self) -> list[str]:
        r = mnp("list", "--json", env=self.env)
        assert r.returncode == 0, r.stderr
        return [j["id"] for j in json.loads(r.stdout)]

    def log_problems(self) -> list[str]:
        """Lines of the controller's log that tell of an exception escaping somewhere."""
        text = (self.home / "controller.log").read_text(errors="replace")
        return [line for line in text.splitlines() if "Traceback" in line or "exception" in line]

    def ends(self) -> Counter[str]:
        """How many times each job ended, from the store's events (``mnp events``)."""
        r = mnp("events", env=self.env)
        assert r.returncode == 0, r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        return Counter(e["job_id"] for e in events if e["status"] in TERMINAL)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskHome]:
    d = DiskHome(tmp_path)
    try:
        yield d
    finally:
        d.close()


def fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s file system; deleting the file frees them."""
    path = folder / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        st = os.statvfs(folder)
        if st.f_bavail:
            os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
        os.lseek(fd, 0, os.SEEK_END)
        while True:  # whatever the allocation left
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return path


def lost(disk: DiskHome, jobs: list[str]) -> int:
    """Accepted jobs that did not end exactly once."""
    ends = disk.ends()
    return sum(ends[j] != 1 for j in jobs)


# --- log directory -------------------------------------------------------------------


def test_unwritable_log_dir_fails_the_job_and_the_controller_goes_on(
    disk: DiskHome, ledger: Ledger
) -> None:
    logs = disk.mount(disk.home / "logs", "1m", "ro")
    disk.start()
    ledger.fault("log directory read-only")
    job = disk.submit("--attempts", "2", "--", "echo", "hi")
    d = disk.wait(job)
    assert d["state"] == "FAILED"
    assert d["reason"] == f"Cannot write logs: {logs}/{job}: Read-only file system"
    assert len(d["attempts"]) == 2  # retried like any failure
    assert disk.alive()

    disk.remount(logs, "rw")  # fixed: the next job runs and keeps its output
    again = disk.submit("--", "echo", "hi")
    d = disk.wait(again)
    assert (d["state"], d["reason"]) == ("SUCCEEDED", None)
    assert mnp("logs", again, env=disk.env).stdout == "hi\n"
    assert disk.log_problems() == []
    ledger.jobs(accepted=2, lost=lost(disk, [job, again]))
    assert lost(disk, [job, again]) == 0


def test_a_logs_path_that_is_no_directory_does_not_keep_the_controller_from_starting(
    disk: DiskHome, ledger: Ledger
) -> None:
    (disk.home / "logs").write_text("not a directory\n")
    ledger.fault("logs/ is a file")
    disk.start()
    r = mnp("submit", "--wait", "--", "true", env=disk.env)
    assert r.returncode == 1
    job = r.stdout.strip()
    expected = f"Cannot write logs: {disk.home}/logs/{job}: Not a directory"
    assert r.stderr == f"mnp: job {job} FAILED: {expected}\n"
    assert disk.alive()
    assert disk.log_problems() == []
    ledger.jobs(accepted=1, lost=lost(disk, [job]))


def test_log_disk_filling_mid_run_drops_output_and_says_so(disk: DiskHome, ledger: Ledger) -> None:
    logs = disk.mount(disk.home / "logs", "1m")
    disk.start()
    ledger.fault("disk full: logs", 2)
    chatty = "yes 0123456789abcdef | head -c 3000000"
    ok = disk.submit("--", "sh", "-c", chatty)
    d = disk.wait(ok)
    full = f"Output lost: {logs}/{ok}/{ok}.out: No space left on device"
    assert (d["state"], d["reason"]) == ("SUCCEEDED", full)
    # the real reason comes first
    slow = disk.submit("--timeout", "2s", "--", "sh", "-c", chatty + "; sleep 30")
    d = disk.wait(slow)
    assert d["state"] == "FAILED"
    assert d["reason"] == (
        "Job attempt duration exceeded timeout; "
        f"Output lost: {logs}/{slow}/{slow}.out: No space left on device"
    )
    assert disk.alive()

    for name in (ok, slow):  # space freed: output is kept again
        subprocess.run(["rm", "-rf", str(logs / name)], check=True)
    again = disk.submit("--", "echo", "kept")
    d = disk.wait(again)
    assert (d["state"], d["reason"]) == ("SUCCEEDED", None)
    assert mnp("logs", again, env=disk.env).stdout == "kept\n"
    jobs = [ok, slow, again]
    assert disk.log_problems() == []
    ledger.jobs(accepted=len(jobs), lost=lost(disk, jobs))
    assert lost(disk, jobs) == 0


# --- state database ------------------------------------------------------------------


def test_full_state_disk_refuses_submit_and_keeps_the_store_consistent(
    disk: DiskHome, ledger: Ledger
) -> None:
    disk.mount(disk.home, "32m")
    disk.start()
    first = disk.submit("--", "true")
    assert disk.wait(first)["state"] == "SUCCEEDED"
    running = disk.submit("--", "sleep", "1.5")
    wait_until("a running job", lambda: disk.describe(running)["state"] == "RUNNING", 10)

    filler = fill(disk.home)
    ledger.fault("disk full: state database")
    refusal = (
        f"mnp: job not accepted: state database {disk.home}/mnp.db: writing failed: "
        "database or disk is full; free space on its disk\n"
    )
    tries = [
        ("submit", "--array-size", "2000", "--", "true"),
        ("submit", "--", "true"),
        ("run", "--", "echo", "never"),
    ]
    for args in tries:
        r = mnp(*args, env=disk.env)
        assert (r.returncode, r.stdout, r.stderr) == (3, "", refusal), args
    time.sleep(2.5)  # the running job ends meanwhile; its end waits for space
    assert disk.alive()
    assert disk.listed() == [first, running]  # nothing of the refused jobs was stored
    for job_id in range(int(running) + 1, int(running) + 1 + len(tries)):
        # ... nor kept by the controller
        r = mnp("terminate", str(job_id), "--reason", "x", env=disk.env)
        assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr

    filler.unlink()  # space back: what waited is written, new jobs are accepted
    d = wait_until(
        "the buffered end", lambda: (x := disk.describe(running))["state"] in TERMINAL and x, 5
    )
    assert d["state"] == "SUCCEEDED"
    r = mnp("submit", "--wait", "--", "true", env=disk.env)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip()
    assert disk.listed() == [first, running, last]
    ends = disk.ends()
    assert set(ends) == {first, running, last}  # no event of a refused job
    jobs = [first, running, last]
    assert disk.log_problems() == []
    ledger.jobs(accepted=len(jobs), lost=lost(disk, jobs))
    assert lost(disk, jobs) == 0


# --- events.jsonl ----------------------------------------------------------------------


def test_events_file_on_a_full_disk_catches_up(disk: DiskHome, ledger: Ledger) -> None:
    space = disk.mount(disk.root / "events-disk", "1m")
    events = disk.home / "events.jsonl"
    events.touch()
    (space / "events.jsonl").touch()
    disk.bind(space / "events.jsonl", events)
    disk.start()

    def seqs_in_file() -> list[int]:
        """The seqs of the file's whole lines (a write cut short by the full disk is not)."""
        return [json.loads(line)["seq"] for line in events.read_text().split("\n")[:-1]]

    def seqs_in_store() -> list[int]:
        r = mnp("events", env=disk.env)
        return [json.loads(line)["seq"] for line in r.stdout.splitlines()]

    filler = fill(space)
    ledger.fault("disk full: events file")
    arr = disk.submit("--array-size", "20", "--", "true")
    assert disk.wait(arr)["state"] == "SUCCEEDED"
    assert disk.alive()
    assert len(seqs_in_store()) > len(seqs_in_file())

    filler.unlink()  # caught up while running
    wait_until("events.jsonl caught up", lambda: seqs_in_file() == seqs_in_store(), 5)

    # and at the next start, when the controller stopped while it lagged
    filler = fill(space)
    ledger.fault("disk full: events file")
    more: list[str] = []
    while len(seqs_in_store()) == len(seqs_in_file()):  # the file's last page had room
        assert len(more) < 20, "events.jsonl never fell behind"
        more.append(disk.submit("--", "true"))
        assert disk.wait(more[-1])["state"] == "SUCCEEDED"
    assert mnp("controller", "stop", env=disk.env).returncode == 0
    filler.unlink()
    assert seqs_in_file() != seqs_in_store()
    disk.start()
    wait_until("events.jsonl caught up at start", lambda: seqs_in_file() == seqs_in_store(), 5)
    assert sorted(set(seqs_in_file())) == seqs_in_file()  # each once, in order
    assert events.read_text().endswith("\n")  # a line torn by the full disk was cut off
    jobs = [arr, *(f"{arr}:{i}" for i in range(20)), *more]
    assert disk.log_problems() == []
    ledger.jobs(accepted=len(jobs), lost=lost(disk, jobs))
    assert lost(disk, jobs) == 0
