"""mnp purge and the retention setting (issue 11), through the CLI, with and without a
running controller: rows, array children, events (store and events.jsonl) and logs go;
unfinished jobs and what they depend on stay; ids and event seq go on."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mnp.daemon import PURGE_ROLE, Lock
from tests.helpers import ROOT, mnp, submit, wait_until

DAY = 86400.0


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"MNP_HOME": str(tmp_path / "home")}
    yield env
    mnp("controller", "stop", env=env)


def state(env: dict[str, str], job: str) -> str | None:
    r = mnp("describe", job, "--json", env=env)
    if r.returncode == 2 and "does not exist" in r.stderr:
        return None
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["state"])


def wait_done(env: dict[str, str], *jobs: str, timeout: float = 30) -> None:
    for job in jobs:
        ended = lambda j=job: state(env, j) in ("SUCCEEDED", "FAILED")  # noqa: E731
        wait_until(f"job {job} ends", ended, timeout)


def listed(env: dict[str, str]) -> list[str]:
    r = mnp("list", "--all", "--children", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return [str(j["id"]) for j in json.loads(r.stdout)]


def events(env: dict[str, str]) -> list[dict[str, object]]:
    r = mnp("events", env=env)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def file_events(env: dict[str, str]) -> list[dict[str, object]]:
    path = Path(env["MNP_HOME"]) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def roots(evs: list[dict[str, object]]) -> set[str]:
    return {str(e["job_id"]).split(":")[0].split("#")[0] for e in evs}


def purge(env: dict[str, str], *args: str) -> list[str]:
    r = mnp("purge", "--json", *args, env=env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return [str(i) for i in json.loads(r.stdout)["job_ids"]]


def age_jobs(env: dict[str, str], days: float, *jobs: str) -> None:
    """Make jobs (and their children) look as if they stopped ``days`` earlier; only
    with no controller running (the store is single-writer)."""
    conn = sqlite3.connect(Path(env["MNP_HOME"]) / "mnp.db")
    with conn:
        for job in jobs:
            conn.execute(
                "UPDATE jobs SET stopped = stopped - ? WHERE id = ? OR parent = ?",
                (days * DAY, job, job),
            )
    conn.close()


def test_purge_without_a_controller_by_age_and_state(home: dict[str, str]) -> None:
    ok = submit(home, "--", "sh", "-c", "echo ok")
    bad = submit(home, "--", "sh", "-c", "echo bad; exit 3")
    arr = submit(home, "--array-size", "3", "--", "sh", "-c", "echo $MNP_ARRAY_INDEX")
    new = submit(home, "--", "sh", "-c", "echo new")
    wait_done(home, ok, bad, arr, new)
    assert mnp("controller", "stop", env=home).returncode == 0
    age_jobs(home, 8, ok, bad, arr)
    logs = Path(home["MNP_HOME"]) / "logs"
    assert {ok, bad, arr, new} <= {p.name for p in logs.iterdir()}
    last_seq = max(int(e["seq"]) for e in events(home))  # type: ignore[call-overload]

    assert purge(home, "--before", "7d", "--state", "FAILED") == [bad]
    assert purge(home, "--before", "7d") == [ok, arr]
    assert listed(home) == [new]
    assert {p.name for p in logs.iterdir()} == {new}
    assert roots(events(home)) == roots(file_events(home)) == {new}
    for job in (ok, bad, arr, f"{arr}:1"):
        assert state(home, job) is None
    r = mnp("logs", arr, env=home)
    assert (r.returncode, r.stderr) == (2, f"mnp: job {arr} does not exist\n")
    assert "nothing to purge" in mnp("purge", "--before", "7d", env=home).stdout

    # ids and event seq go on from where they were, even once everything is purged
    assert purge(home) == [new]
    assert listed(home) == [] and events(home) == [] and file_events(home) == []
    after = submit(home, "--", "true")
    assert int(after) == int(new) + 1
    wait_done(home, after)
    seqs = [int(e["seq"]) for e in events(home)]  # type: ignore[call-overload]
    assert seqs and min(seqs) == last_seq + 1
    assert [e["seq"] for e in file_events(home)] == seqs


def test_purge_through_the_running_controller(home: dict[str, str]) -> None:
    done = submit(home, "--", "sh", "-c", "echo done")
    failed = submit(home, "--array-size", "2", "--", "sh", "-c", "exit $MNP_ARRAY_INDEX")
    wait_done(home, done, failed)
    running = submit(home, "--", "sleep", "30")
    needs = submit(home, "--", "true")
    wait_done(home, needs)
    waiting = submit(home, "--depends-on", needs, "--depends-on", running, "--", "true")
    wait_until("running", lambda: state(home, running) == "RUNNING", 20)

    assert purge(home, "--state", "FAILED") == [failed]
    assert purge(home) == [done]  # needs: an unfinished job depends on it
    assert listed(home) == [running, needs, waiting]
    assert roots(events(home)) == roots(file_events(home)) == {running, needs, waiting}
    assert not (Path(home["MNP_HOME"]) / "logs" / done).exists()
    r = mnp("submit", "--depends-on", done, "--", "true", env=home)
    assert r.returncode == 2 and "does not exist" in r.stderr  # purged: gone for the controller

    # the controller goes on appending to the rewritten events.jsonl
    assert mnp("terminate", running, "--reason", "enough", env=home).returncode == 0
    wait_done(home, running, waiting)
    assert [e["seq"] for e in file_events(home)] == [e["seq"] for e in events(home)]
    assert file_events(home)[-1]["job_id"] == waiting
    assert purge(home) == [running, needs, waiting]
    later = submit(home, "--", "true")
    assert int(later) == int(waiting) + 1


def test_retention_purges_finished_jobs_automatically(home: dict[str, str]) -> None:
    r = mnp("controller", "start", "--retention", "2s", env=home)
    assert r.returncode == 0, r.stderr
    quick = submit(home, "--", "sh", "-c", "echo quick")
    slow = submit(home, "--", "sleep", "30")
    wait_done(home, quick)
    logs = Path(home["MNP_HOME"]) / "logs" / quick
    assert logs.is_dir()
    wait_until("retention purges the finished job", lambda: state(home, quick) is None, 20)
    assert not logs.exists()
    assert quick not in roots(events(home)) | roots(file_events(home))
    assert state(home, slow) == "RUNNING"  # unfinished: never purged
    assert mnp("terminate", slow, "--reason", "done", env=home).returncode == 0
    wait_until("and the other one once it ended", lambda: state(home, slow) is None, 20)
    log_text = (Path(home["MNP_HOME"]) / "controller.log").read_text()
    assert "retention: purged 1 finished job(s)" in log_text


def test_bad_retention_is_refused(home: dict[str, str]) -> None:
    for value, needle in (("soon", "not a duration"), ("10ms", "shorter than 1s")):
        r = mnp("controller", "start", "--retention", value, env=home)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("mnp: --retention:") and needle in r.stderr
    r = mnp("controller", "start", env={**home, "MNP_RETENTION": "never"})
    assert r.returncode == 0, r.stderr


def test_a_controller_waits_for_a_purge_that_holds_the_store(home: dict[str, str]) -> None:
    """``mnp purge`` with no controller takes the controller's lock: a controller that
    starts meanwhile waits for it; stop and status do not take it for a controller."""
    path = Path(home["MNP_HOME"])
    path.mkdir(mode=0o700)
    lock = Lock(path)
    assert lock.acquire(role=PURGE_ROLE)
    try:
        st = mnp("controller", "status", env=home)
        assert st.returncode == 3 and "no controller running" in st.stdout
        assert "no controller was running" in mnp("controller", "stop", env=home).stdout
        proc = subprocess.Popen(
            [sys.executable, "-m", "mnp", "submit", "--", "true"],
            cwd=ROOT,
            env={**os.environ, **home},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        assert proc.poll() is None  # waiting for the purge
        assert not (path / "controller.sock").exists()
    finally:
        lock.release()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip() == "1"
    assert "waiting for mnp purge" in (path / "controller.log").read_text()


def test_a_purge_cut_short_is_finished_at_the_next_start(home: dict[str, str]) -> None:
    """A purge killed after its first transaction (the jobs' rows gone, their children,
    events and logs not yet) is finished by the next controller, at its start."""
    from mnp.store import Store

    arr = submit(home, "--array-size", "3", "--", "sh", "-c", "echo $MNP_ARRAY_INDEX")
    keep = submit(home, "--", "sleep", "0.1")
    wait_done(home, arr, keep)
    assert mnp("controller", "stop", env=home).returncode == 0
    path = Path(home["MNP_HOME"])
    with Store(path / "mnp.db") as s:  # what `mnp purge` had done when it was killed
        assert s.purge(state="SUCCEEDED", limit=1) == [arr]
    assert listed(home) == [f"{arr}:0", f"{arr}:1", f"{arr}:2", keep]  # left: its children
    assert arr in roots(file_events(home))
    assert mnp("controller", "start", env=home).returncode == 0
    wait_until("the next controller finishes it", lambda: arr not in roots(file_events(home)), 20)
    assert listed(home) == [keep] and roots(events(home)) == {keep}
    assert not (path / "logs" / arr).exists() and (path / "logs" / keep).exists()
