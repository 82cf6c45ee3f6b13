"""Cancel of a mostly unreleased 100,000-child array against a real controller: it
writes O(1) rows and events (the unreleased children end as one range, read back as
rows and events), every reader shows each child FAILED, and a restarted controller
releases none of them."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mnp
from tests.helpers import mnp as mnp_cli

N = 100_000


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "home"
    yield path
    mnp_cli("controller", "stop", env={"MNP_HOME": str(path)})


def counts(home: Path, job: str) -> tuple[int, int]:
    """(rows of ``job`` and its children, events of ``job`` and its children) stored."""
    with sqlite3.connect(home / "mnp.db") as db:
        rows = db.execute("SELECT count(*) FROM jobs WHERE id = ? OR parent = ?", (job, job))
        events = db.execute("SELECT count(*) FROM events WHERE root = ?", (job,))
        return int(rows.fetchone()[0]), int(events.fetchone()[0])


def test_cancel_of_a_100k_array_writes_o1_rows_and_events(home: Path) -> None:
    client = mnp.Client(home=home)
    env = {"MNP_HOME": str(home)}
    a = client.submit(command=["sleep", "60"], name="big", array_size=N, array_parallelism=2)
    deadline = time.monotonic() + 60
    while client.describe(a).get("children_counts", {}).get("RUNNING", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rows_before, events_before = counts(home, a)
    client.cancel(a, "enough")
    deadline = time.monotonic() + 60
    while client.describe(a)["children_counts"].get("FAILED", 0) < N - 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rows, events = counts(home, a)
    assert rows == rows_before <= 3  # the parent and its two running children
    assert events - events_before <= 2  # the one event that ended the rest
    described = client.describe(a)
    assert described["children_counts"] == {"RUNNING": 2, "FAILED": N - 2}
    child = client.describe(f"{a}:500")
    assert (child["state"], child["reason"]) == ("FAILED", "enough")
    listed = client.list(children=True)
    assert len(listed) == N + 1
    assert [(r["id"], r["state"]) for r in listed[-2:]] == [
        (f"{a}:{N - 2}", "FAILED"),
        (f"{a}:{N - 1}", "FAILED"),
    ]
    ends = [e for e in client.events(job=f"{a}:500") if e["status"] == "FAILED"]
    assert [(e["job_id"], e["reason"]) for e in ends] == [(f"{a}:500", "enough")]
    r = mnp_cli("list", "--children", "--state", "FAILED", "--all", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == N - 2
    # a controller restarted now takes the cut back: it releases none of those children
    assert mnp_cli("controller", "stop", env=env).returncode == 0
    started = mnp_cli("controller", "start", env=env)  # restores the array
    assert started.returncode == 0, started.stderr
    client.terminate(a, "over")
    out = client.wait(a, timeout=60)
    assert out["state"] == "FAILED"
    assert counts(home, a)[0] == rows_before
    assert client.describe(a)["children_counts"] == {"FAILED": N}
