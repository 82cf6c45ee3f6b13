"""The SQLite store: round trips, batching, crash safety, readers beside the writer, errors.

Figures (add_jobs of 100k children, list_jobs at 100k jobs, state changes per
second) are printed, not asserted: they depend on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mnp.errors import InfraError
from mnp.model import JobState
from mnp.store import JOB_ID_BLOCK, SCHEMA_VERSION, Store
from tests.helpers import ROOT

DEFN: dict[str, Any] = {
    "name": "train",
    "command": ["python", "train.py", "Ref::size"],
    "type": "multinode",
    "queue": "gpu",
    "parameters": {"size": "10"},
    "secrets": {"TOKEN": {"file": "~/.config/token", "env": None}, "KEY": {"env": "KEY"}},
    "multinode": {"num_nodes": 2, "groups": [{"start": 0, "end": 1}]},
}


def job_row(job_id: str, seq: int, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": job_id,
        "seq": seq,
        "name": "j" + job_id,
        "queue": "default",
        "type": "single",
        "state": "SUBMITTED",
        "created": 1000.0 + seq,
        "definition": {"name": "j" + job_id, "command": ["true"]},
    }
    row.update(extra)
    return row


def array_rows(parent: str, first_seq: int, n: int, state: str = "PENDING") -> list[dict[str, Any]]:
    return [
        {
            "id": f"{parent}:{i}",
            "seq": first_seq + i,
            "parent": parent,
            "array_index": i,
            "name": "arr",
            "queue": "default",
            "type": "single",
            "state": state,
            "created": 1000.0,
        }
        for i in range(n)
    ]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "mnp.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = Store(db)
    yield s
    s.close()


def figure(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n  [store] {text}")


# --- opening ------------------------------------------------------------------


def test_new_database_is_0600_wal_and_versioned(db: Path) -> None:
    with Store(db) as s:
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with Store(db) as s:  # reopening an existing one
        assert s.list_jobs() == []


def test_newer_schema_is_refused(db: Path) -> None:
    Store(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    for readonly in (False, True):
        with pytest.raises(InfraError, match="newer mnp") as e:
            Store(db, readonly=readonly)
        assert str(db) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_file_and_foreign_database_are_infra_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(InfraError, match="not a database") as e:
        Store(junk)
    assert str(junk) in str(e.value) and "\n" not in str(e.value)
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE stuff (x)")
    conn.close()
    with pytest.raises(InfraError, match="did not create"):
        Store(foreign)


def test_read_only_open_of_a_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(InfraError, match="does not exist"):
        Store(tmp_path / "none.db", readonly=True)
    (tmp_path / "empty.db").touch()
    with pytest.raises(InfraError, match="no mnp schema"):
        Store(tmp_path / "empty.db", readonly=True)


def test_jobs_by_id_or_by_name_the_newest_of_that_name(store: Store, db: Path) -> None:
    store.add_jobs(
        [
            job_row("1", 1, name="train"),
            job_row("2", 2, name="7"),  # a name that looks like an id
            job_row("3", 3, name="train", array_size=2),
            *array_rows("3", 4, 2),
            job_row("7", 6, name="other"),
            job_row("8", 7, name="8"),
        ]
    )
    store.flush()
    with Store(db, readonly=True) as reader:
        for s in (store, reader):
            assert s.resolve("1") == "1"
            assert s.resolve("train") == "3"  # the newest of the name
            assert s.resolve("train:1") == "3:1" and s.resolve("train#0") == "3#0"
            assert s.resolve("7") == "7"  # an id comes first
            assert s.resolve("8") == "8"
            assert s.resolve("arr") is None  # array children's name is not looked up
            assert s.resolve("nosuch") is None and s.resolve("nosuch:1") is None
            assert s.newest_named("train") == "3" and s.newest_named("nosuch") is None
            assert s.state_and_size("3") == ("SUBMITTED", 2)
            assert s.state_and_size("1") == ("SUBMITTED", None)
            assert s.state_and_size("9") is None
    plan = store.conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE name = ? AND parent IS NULL "
        "ORDER BY seq DESC LIMIT 1",
        ("train",),
    ).fetchall()
    assert "jobs_name" in str(plan) and "TEMP B-TREE" not in str(plan), plan


def test_version_1_is_read_as_it_is_and_migrated_by_the_writer(db: Path) -> None:
    Store(db).close()
    conn = sqlite3.connect(db)
    conn.execute("DROP INDEX jobs_name")  # what version 1 had
    conn.execute("ALTER TABLE attempts DROP COLUMN usage")  # added by version 3
    conn.execute("DROP TABLE definitions")  # added by version 4
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO jobs (seq, id, name, state) VALUES (1, '1', 'old', 'SUCCEEDED')")
    conn.commit()
    conn.close()
    with Store(db, readonly=True) as reader:  # no writer has migrated it yet
        assert reader.resolve("old") == "1"
        assert reader.conn.execute("PRAGMA user_version").fetchone()[0] == 1
    with Store(db) as writer:
        assert writer.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        cols = {r[1] for r in writer.conn.execute("PRAGMA table_info(attempts)")}
        assert "usage" in cols
        names = {r[0] for r in writer.conn.execute("SELECT name FROM sqlite_master")}
        assert "jobs_name" in names
        assert writer.resolve("old") == "1"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mnp-store-"))
    path.chmod(0o755)
    yield path
    path.chmod(0o755)
    shutil.rmtree(path)


@contextmanager
def unprivileged() -> Iterator[None]:
    """Permission checks apply: as root, act as nobody for the block (seteuid, undone)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_unwritable_directory_is_one_line_infra_error(open_dir: Path) -> None:
    path = open_dir / "mnp.db"
    open_dir.chmod(0o555)
    with unprivileged(), pytest.raises(InfraError) as e:
        Store(path)
    message = str(e.value)
    assert str(path) in message and "Permission denied" in message
    assert "\n" not in message and e.value.exit_code == 3


def test_read_only_store_reads_a_database_it_cannot_write(open_dir: Path) -> None:
    path = open_dir / "mnp.db"
    with Store(path) as s:
        s.add_job(job_row("1", 1))
        s.append_event({"time": 1.0, "job_id": "1", "status": "SUBMITTED"})
    path.chmod(0o444)
    open_dir.chmod(0o555)  # no -shm can be made: read as immutable
    with unprivileged():
        with pytest.raises(InfraError, match="Permission denied"):
            Store(path)
        with Store(path, readonly=True) as r:
            job = r.get_job("1")
            assert job is not None and job["definition"]["command"] == ["true"]
            assert [j["id"] for j in r.list_jobs()] == ["1"]
            assert r.events_since(0)[0]["job_id"] == "1"
            with pytest.raises(InfraError, match="read-only"):
                r.add_job(job_row("2", 2))


# --- round trips --------------------------------------------------------------


def test_job_round_trip_and_update(store: Store) -> None:
    row = job_row(
        "7",
        7,
        type="multinode",
        queue="gpu",
        state=JobState.SUBMITTED,
        definition=DEFN,
        depends_on=[{"job_id": "3", "type": "afterany"}],
        num_nodes=2,
    )
    store.add_job(row)
    store.flush()
    job = store.get_job("7")
    assert job is not None
    expected = {**row, "state": "SUBMITTED", "parent": None, "array_index": None}
    assert {k: job[k] for k in expected} == expected
    assert job["attempts"] == [] and job["nodes"] == [] and job["timed_out"] is False
    assert "children_counts" not in job

    store.update_job("7", state=JobState.FAILED, reason="timeout", timed_out=True, stopped=9.5)
    store.update_job("7", exit_code=None, signal=15, attempt_count=1)
    store.flush()
    job = store.get_job("7")
    assert job is not None
    assert (job["state"], job["reason"], job["timed_out"], job["signal"]) == (
        "FAILED",
        "timeout",
        True,
        15,
    )
    assert job["stopped"] == 9.5 and job["attempt_count"] == 1 and job["name"] == "j7"
    assert store.get_job("nope") is None


def test_defaults_and_unknown_fields(store: Store) -> None:
    store.add_job({"id": "1"})
    store.flush()
    job = store.get_job("1")
    assert job is not None
    assert (job["state"], job["attempt_count"], job["depends_on"]) == ("SUBMITTED", 0, [])
    with pytest.raises(ValueError, match="unknown job field.*colour"):
        store.add_job({"id": "2", "colour": "red"})
    with pytest.raises(ValueError, match="needs an id"):
        store.add_job({"name": "x"})
    with pytest.raises(ValueError, match="unknown job field.*id"):
        store.update_job("1", id="3")
    with pytest.raises(ValueError, match="unknown attempt field"):
        store.upsert_attempt("1", 1, host="h")
    with pytest.raises(ValueError, match="unknown node field"):
        store.upsert_node("1", 1, 0, hosts=["h"])
    with pytest.raises(ValueError, match="added twice"):
        store.add_jobs([{"id": "5"}, {"id": "5"}])


def test_attempts_and_nodes_round_trip(store: Store) -> None:
    store.add_job(job_row("9", 9, type="multinode", num_nodes=2))
    store.upsert_attempt("9", 1, ce="gpu", hosts=["a", "b"], placed_at=1.0)
    store.upsert_node("9", 1, 0, host="a", grp=0, state="RUNNING", started=1.5)
    store.upsert_node("9", 1, 1, host="b", grp=1, state="RUNNING", started=1.6)
    store.flush()
    store.upsert_attempt("9", 1, running_at=2.0, stopped_at=3.0, exit_code=None, signal=9)
    store.upsert_attempt("9", 1, reason="Host lost: b", final_state="FAILED")
    store.upsert_attempt("9", 1, usage={"9#0": {"max_rss_bytes": 5, "cpu_seconds": 0.5}})
    store.upsert_node("9", 1, 1, state="FAILED", reason="Host lost: b", stopped=3.0)
    store.upsert_attempt("9", 2, ce="gpu", hosts=["c", "d"])
    store.upsert_node("9", 2, 0, host="c", grp=0, state="STARTING")
    store.upsert_node("9", 2, 1)  # key only: created with nothing else
    store.flush()
    job = store.get_job("9")
    assert job is not None
    first, second = job["attempts"]
    assert first == {
        "job_id": "9",
        "number": 1,
        "ce": "gpu",
        "hosts": ["a", "b"],
        "placed_at": 1.0,
        "running_at": 2.0,
        "main_exit_at": None,
        "reaped_at": None,
        "stopped_at": 3.0,
        "exit_code": None,
        "signal": 9,
        "reason": "Host lost: b",
        "final_state": "FAILED",
        "usage": {"9#0": {"max_rss_bytes": 5, "cpu_seconds": 0.5}},
    }
    assert second["number"] == 2 and second["usage"] is None and second["hosts"] == ["c", "d"]
    assert [(n["node_index"], n["host"], n["state"]) for n in job["nodes"]] == [
        (0, "c", "STARTING"),
        (1, None, None),
    ]
    rows = store.conn.execute("SELECT state, reason FROM nodes WHERE attempt = 1 ORDER BY 1")
    assert rows.fetchall() == [("FAILED", "Host lost: b"), ("RUNNING", None)]


def test_updates_within_a_batch_coalesce_into_one_statement_per_row(store: Store) -> None:
    store.add_jobs([job_row(str(i), i) for i in range(1, 4)])
    store.flush()
    for state in ("PENDING", "RUNNABLE", "STARTING", "RUNNING"):
        for i in (1, 2):
            store.update_job(str(i), state=state)
            store.upsert_attempt(str(i), 1, ce="x")
    store.update_job("1", reason="r")
    store.update_job("3", started=5.0)
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    store.flush()
    store.flush()  # nothing buffered: no statement at all
    store.conn.set_trace_callback(None)
    updates = [s for s in statements if s.startswith("UPDATE jobs")]
    upserts = [s for s in statements if s.startswith("INSERT INTO attempts")]
    assert len(updates) == 3 and len(upserts) == 2
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
    assert statements.count("COMMIT") == 1
    states = {j["id"]: (j["state"], j["reason"]) for j in store.list_jobs()}
    assert states == {"1": ("RUNNING", "r"), "2": ("RUNNING", None), "3": ("SUBMITTED", None)}


def test_update_of_a_job_added_in_the_same_batch(store: Store) -> None:
    store.add_job(job_row("1", 1))
    store.add_job({"id": "2"})  # no seq: the next rowid
    assert store.max_job_seq() == 1  # counts what is buffered
    store.update_job("1", state="PENDING")
    store.update_job("1", state="RUNNABLE")
    store.flush()
    job = store.get_job("1")
    assert job is not None and job["state"] == "RUNNABLE"
    assert store.get_job("2")["seq"] == 2  # type: ignore[index]


def test_meta_round_trip(db: Path) -> None:
    with Store(db) as s:
        assert s.get_meta("controller_token") is None
        s.set_meta("controller_token", "abc")
        assert s.get_meta("controller_token") == "abc"  # this writer's buffered value
    with Store(db, readonly=True) as r:
        assert r.get_meta("controller_token") == "abc"


def test_secret_values_are_refused_references_are_kept(store: Store) -> None:
    for secrets in (
        {"TOKEN": "hunter2"},
        {"TOKEN": {"value": "hunter2"}},
        {"TOKEN": {"file": "~/t", "env": "TOKEN"}},
        {"TOKEN": {"file": None, "env": None}},
        {"TOKEN": {"env": 12345}},
        ["hunter2"],
    ):
        with pytest.raises(ValueError, match="secrets") as e:
            store.add_job(job_row("1", 1, definition={"name": "x", "secrets": secrets}))
        assert "hunter2" not in str(e.value)
        with pytest.raises(ValueError, match="secrets"):
            store.update_job("1", definition={"name": "x", "secrets": secrets})
    store.add_job(job_row("1", 1, definition=DEFN))
    store.flush()
    job = store.get_job("1")
    assert job is not None and job["definition"]["secrets"] == DEFN["secrets"]


# --- events -------------------------------------------------------------------


def event(job_id: str, status: str = "RUNNING", **extra: Any) -> dict[str, Any]:
    return {"time": 5.0, "type": "job-state-change", "job_id": job_id, "status": status, **extra}


def test_events_seq_bodies_and_job_filter(db: Path) -> None:
    with Store(db) as s:
        given = event("42", "SUBMITTED")
        assert s.append_event(given) == 1
        assert "seq" not in given  # not changed
        assert s.append_event(event("42:0", array_index=0)) == 2
        assert s.append_event(event("42:10", array_index=10)) == 3
        assert s.append_event(event("42#3", node_index=3)) == 4
        assert s.append_event(event("42", node_index=1)) == 5  # filed under 42#1
        assert s.append_event(event("420")) == 6
        assert s.append_event(event("42:1#2", node_index=2)) == 7
        assert s.append_event({"time": 6.0, "type": "host-lost", "host": "h1"}) == 8
        assert s.max_event_seq() == 8
        assert s.events_since(0) == []  # reads see what has been flushed
        s.flush()
        everything = s.events_since(0)
        assert [e["seq"] for e in everything] == list(range(1, 9))
        assert list(everything[0]) == ["seq", "time", "type", "job_id", "status"]

        def seqs(job: str, since: int = 0) -> list[int]:
            return [e["seq"] for e in s.events_since(since, job_id=job)]

        assert seqs("42") == [1, 2, 3, 4, 5, 7]
        assert seqs("42", since=3) == [4, 5, 7]
        assert seqs("42:1") == [7]
        assert seqs("42:0") == [2]
        assert seqs("42#3") == [4]
        assert seqs("42#1") == [5]
        assert seqs("420") == [6]
        assert [e["seq"] for e in s.events_since(2, limit=3)] == [3, 4, 5]
    with Store(db) as s:  # seq continues after reopening
        assert s.max_event_seq() == 8
        assert s.append_event(event("43")) == 9


def test_event_filters_use_indexes(store: Store) -> None:
    """`mnp events --follow --job 42` polls: each poll must be an index seek, not a scan."""
    for job_id, index in (("42", "events_root"), ("42:7", "events_job"), ("42#3", "events_job")):
        issued: list[str] = []
        store.conn.set_trace_callback(issued.append)
        store.events_since(1000, job_id=job_id, limit=10)
        store.conn.set_trace_callback(None)
        (sql,) = (q for q in issued if q.startswith("SELECT body"))
        plan = " ".join(r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert f"USING INDEX {index}" in plan, plan


# --- ids, seqs, crash safety ---------------------------------------------------


def test_job_ids_are_monotonic_and_a_clean_close_leaves_no_gap(db: Path) -> None:
    with Store(db) as s:
        assert [s.next_job_id() for _ in range(3)] == [1, 2, 3]
        stored = s.conn.execute("SELECT value FROM meta WHERE key = 'next_job_id'").fetchone()
        assert int(stored[0]) == 1 + JOB_ID_BLOCK  # reserved ahead, before any flush
    with Store(db) as s:
        assert s.next_job_id() == 4
        ids = [s.next_job_id() for _ in range(2 * JOB_ID_BLOCK)]
        assert ids == list(range(5, 5 + 2 * JOB_ID_BLOCK))


def test_job_survives_sigkill_and_ids_are_not_reused(db: Path) -> None:
    child = textwrap.dedent(
        f"""
        import os, signal
        from mnp.store import Store
        s = Store({str(db)!r})
        for _ in range(3):
            s.next_job_id()
        job_id = s.next_job_id()
        s.add_job({{"id": str(job_id), "seq": job_id, "name": "survivor", "state": "RUNNABLE"}})
        s.append_event({{"time": 1.0, "job_id": str(job_id), "status": "RUNNABLE"}})
        s.flush()
        print(job_id, s.next_job_id(), flush=True)  # the second id is handed out, never stored
        s.add_job({{"id": "lost", "seq": 99}})  # buffered, not flushed: lost with the process
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", child],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    stored_id, handed_out = map(int, r.stdout.split())
    with Store(db) as s:
        job = s.get_job(str(stored_id))
        assert job is not None and job["name"] == "survivor" and job["state"] == "RUNNABLE"
        assert s.get_job("lost") is None
        assert s.next_job_id() > handed_out
        assert s.max_event_seq() == 1 and s.append_event(event("x")) == 2
        assert s.max_job_seq() == stored_id


def test_reader_sees_flushed_writes_while_the_writer_stays_open(db: Path) -> None:
    writer = Store(db)
    reader = Store(db, readonly=True)
    try:
        writer.add_job(job_row("1", 1))
        assert reader.list_jobs() == []
        writer.flush()
        assert [j["id"] for j in reader.list_jobs()] == ["1"]
        writer.update_job("1", state="RUNNING")
        writer.append_event(event("1"))
        assert reader.get_job("1")["state"] == "SUBMITTED"  # type: ignore[index]
        writer.flush()
        assert reader.get_job("1")["state"] == "RUNNING"  # type: ignore[index]
        assert reader.events_since(0, job_id="1")[0]["status"] == "RUNNING"
        assert reader.max_event_seq() == 1
    finally:
        reader.close()
        writer.close()


def test_failed_flush_writes_nothing_and_keeps_the_batch(store: Store) -> None:
    store.add_job(job_row("1", 1))
    store.flush()
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is "full"
    store.add_jobs(array_rows("1", 2, 5000))
    store.update_job("1", state="PENDING")
    with pytest.raises(InfraError, match="full") as e:
        store.flush()
    assert str(store.path) in str(e.value) and "\n" not in str(e.value)
    assert store.get_job("1")["state"] == "SUBMITTED"  # type: ignore[index]
    store.conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    store.flush()
    assert store.get_job("1")["state"] == "PENDING"  # type: ignore[index]
    assert len(store.children("1")) == 5000


def test_discard_withdraws_a_job_that_could_not_be_committed(store: Store) -> None:
    """A submit whose commit failed: its job goes from the batch, the rest stays for later."""
    store.add_job(job_row("1", 1))
    store.flush()
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is "full"
    store.update_job("1", state="RUNNING")  # an accepted job's change, waiting for space
    store.append_event({"job_id": "1", "status": "RUNNING"})
    store.add_job(job_row("2", 2))  # the new job: an array with its children and events
    store.add_jobs(array_rows("2", 3, 5000))
    store.update_job("2", state="PENDING")
    store.append_event({"job_id": "2", "status": "PENDING"})
    store.append_event({"job_id": "2:7", "array_index": 7, "status": "PENDING"})
    store.upsert_attempt("2:1", 1, ce="local")
    store.upsert_node("2", 1, 0, host="h")
    with pytest.raises(InfraError, match="full"):
        store.flush()
    store.discard(["2", *(f"2:{i}" for i in range(5000))])
    store.conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    store.flush()
    assert [(j["id"], j["state"]) for j in store.list_jobs(parents_only=False)] == [
        ("1", "RUNNING")
    ]
    assert [e["job_id"] for e in store.events_since(0)] == ["1"]
    assert store.get_job("2") is None and store.get_job("2:1") is None
    assert store.conn.execute("SELECT count(*) FROM attempts").fetchone()[0] == 0
    assert store.conn.execute("SELECT count(*) FROM nodes").fetchone()[0] == 0
    store.add_job(job_row("2", 5003))  # the id may be stored later: nothing is left of it
    store.flush()
    assert [j["id"] for j in store.list_jobs()] == ["1", "2"]


def test_duplicate_job_id_is_a_value_error_and_the_batch_is_dropped(store: Store) -> None:
    store.add_job(job_row("1", 1))
    store.flush()
    store.add_job(job_row("2", 2))
    store.add_job(job_row("1", 3))
    with pytest.raises(ValueError, match="UNIQUE"):
        store.flush()
    assert store.get_job("2") is None
    store.add_job(job_row("3", 4))  # later writes are not blocked by the bad batch
    store.flush()
    assert [j["id"] for j in store.list_jobs()] == ["1", "3"]


def test_add_jobs_is_all_or_nothing(store: Store) -> None:
    store.add_job(job_row("1", 1))
    with pytest.raises(ValueError, match="unknown job field"):
        store.add_jobs([job_row("2", 2), job_row("3", 3), {"id": "4", "bogus": 1}])
    store.add_job(job_row("2", 2))  # not "added twice": the failed call left nothing
    store.flush()
    assert [j["id"] for j in store.list_jobs()] == ["1", "2"]


# --- arrays, listing, recovery, purge -------------------------------------------


def test_array_children_counts_and_listing(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 100_000
    store.add_job(job_row("1", 1, state="PENDING", definition=DEFN, array_size=n))
    rows = array_rows("1", 2, n)
    t0 = time.perf_counter()
    store.add_jobs(rows)
    store.flush()
    ms = (time.perf_counter() - t0) * 1e3
    figure(capsys, f"add_jobs + flush of {n:,} array children: {ms:.0f} ms")
    store.add_job(job_row("2", n + 2, queue="other"))
    for i in (3, 5):
        store.update_job(f"1:{i}", state="RUNNING")
    store.update_job("1:4", state="FAILED", exit_code=2)
    store.flush()

    assert [j["id"] for j in store.list_jobs()] == ["1", "2"]
    assert [j["id"] for j in store.list_jobs(queue="other")] == ["2"]
    assert len(store.list_jobs(parents_only=False)) == n + 2
    assert [j["id"] for j in store.list_jobs(parents_only=False, state="RUNNING")] == [
        "1:3",
        "1:5",
    ]
    assert [j["id"] for j in store.list_jobs(parents_only=False, after_seq=3, limit=2)] == [
        "1:2",
        "1:3",
    ]
    assert "definition" not in store.list_jobs()[0]
    assert [c["array_index"] for c in store.children("1", limit=3)] == [0, 1, 2]
    assert [c["id"] for c in store.children("1", state=JobState.RUNNING)] == ["1:3", "1:5"]

    parent = store.get_job("1")
    assert parent is not None
    assert parent["children_counts"] == {"PENDING": n - 3, "RUNNING": 2, "FAILED": 1}
    child = store.get_job("1:4")
    assert child is not None and child["exit_code"] == 2 and child["definition"] == DEFN
    assert store.counts_by_queue_state() == {
        "default": {"PENDING": n - 3, "RUNNING": 2, "FAILED": 1},  # the parent is no unit
        "other": {"SUBMITTED": 1},
    }


def test_listing_100k_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """mnp list at 100,000 stored jobs: an array's children, then 100,000 top-level jobs."""
    n = 100_000
    with Store(tmp_path / "mnp.db") as s:
        s.add_job(job_row("1", 1, state="PENDING", array_size=n))
        s.add_jobs(array_rows("1", 2, n, state="RUNNABLE"))
        s.add_jobs(job_row(str(i), n + i, state="RUNNING") for i in range(2, 102))
    with Store(tmp_path / "mnp.db", readonly=True) as r:
        parents = timed(capsys, "list_jobs() with 100,000 children stored", r.list_jobs)
        assert len(parents) == 101
        timed(capsys, "list_jobs(limit=50)", lambda: r.list_jobs(limit=50))
        timed(capsys, "list_jobs(state=RUNNING)", lambda: r.list_jobs(state="RUNNING"))
        runnable = timed(capsys, "list_jobs(state=RUNNABLE), 0 of 100,000", runnable_of(r))
        assert runnable == []
        timed(capsys, "counts_by_queue_state()", r.counts_by_queue_state)
        timed(capsys, "get_job(array parent)", lambda: r.get_job("1"))
    with Store(tmp_path / "top.db") as s:
        s.add_jobs(job_row(str(i), i, state="SUCCEEDED") for i in range(1, n + 1))
    with Store(tmp_path / "top.db", readonly=True) as r:
        every = timed(capsys, "list_jobs() of 100,000 top-level jobs", r.list_jobs)
        assert len(every) == n and every[-1]["id"] == str(n)
        page = timed(capsys, "list_jobs(after_seq=99,000, limit=100)", page_of(r))
        assert len(page) == 100
        table, left_out = timed(capsys, "table_page(finished=1000): mnp list", table_of(r))
        assert len(table) == 1000 and table[0][0] == str(n - 999) and left_out == n - 1000


def runnable_of(r: Store) -> Any:
    return lambda: r.list_jobs(state="RUNNABLE")


def table_of(r: Store) -> Any:
    return lambda: r.table_page(finished=1000)


def page_of(r: Store) -> Any:
    return lambda: r.list_jobs(after_seq=99_000, limit=100)


def timed(capsys: pytest.CaptureFixture[str], what: str, fn: Any) -> Any:
    best, result = float("inf"), None
    for _ in range(3):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    figure(capsys, f"{what}: {best * 1e3:.1f} ms (best of 3)")
    return result


def test_state_names_spelt_out_for_readers_match_the_model() -> None:
    from mnp.model import TERMINAL
    from mnp.store import reads

    assert set(reads.FINISHED_STATES) == {s.value for s in TERMINAL}
    assert set(reads.UNFINISHED_STATES) == {s.value for s in JobState} - {s.value for s in TERMINAL}


LONG_REASON = "x" * 59 + "yz"


@pytest.fixture
def history(store: Store) -> Store:
    """1 RUNNING; 2-21 finished (every 4th FAILED, odd ones in queue "other");
    22 an array of 3 (23 SUCCEEDED, 24 RUNNING, 25 RUNNABLE); 26 a SUBMITTED
    4-node job; 27 SUCCEEDED."""
    store.add_job(job_row("1", 1, state="RUNNING"))
    for i in range(2, 22):
        store.add_job(
            job_row(
                str(i),
                i,
                state="FAILED" if i % 4 == 0 else "SUCCEEDED",
                queue="other" if i % 2 else "default",
                reason=LONG_REASON if i == 20 else None,
            )
        )
    store.add_job(job_row("22", 22, state="PENDING", array_size=3))
    store.add_jobs(array_rows("22", 23, 3))
    for child, state in (("22:0", "SUCCEEDED"), ("22:1", "RUNNING"), ("22:2", "RUNNABLE")):
        store.update_job(child, state=state)
    store.add_job(job_row("26", 26, type="multinode", num_nodes=4))
    store.add_job(job_row("27", 27, state="SUCCEEDED", created=None))
    store.flush()
    return store


def expected_page(store: Store, finished: int, **filters: Any) -> tuple[list[str], int]:
    """The default page worked out from list_jobs: every unfinished job, the newest
    ``finished`` finished ones."""
    every = store.list_jobs(**filters)
    done = [j["id"] for j in every if j["state"] in ("SUCCEEDED", "FAILED")]
    kept = set(done[-finished:])
    shown = [j["id"] for j in every if j["id"] in kept or j["id"] not in done]
    return shown, len(done) - len(kept)


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"parents_only": False},
        {"queue": "other"},
        {"queue": "default", "parents_only": False},
        {"state": "FAILED"},
        {"state": "SUCCEEDED", "parents_only": False},
        {"state": "RUNNING", "parents_only": False},
        {"queue": "nope"},
    ],
)
@pytest.mark.parametrize("finished", [1, 2, 5, 30])
def test_list_page_shows_unfinished_jobs_and_the_newest_finished(
    history: Store, filters: dict[str, Any], finished: int
) -> None:
    rows, left_out = history.list_page(finished=finished, **filters)
    assert ([r["id"] for r in rows], left_out) == expected_page(history, finished, **filters)
    table, table_left_out = history.table_page(finished=finished, **filters)
    assert [t[0] for t in table] == [r["id"] for r in rows] and table_left_out == left_out


def test_list_page_figures(history: Store) -> None:
    rows, left_out = history.list_page(finished=5)
    assert [r["id"] for r in rows] == ["1", "18", "19", "20", "21", "22", "26", "27"]
    assert left_out == 16
    assert rows[0] == history.list_jobs()[0]  # the same dicts as list_jobs
    rows, left_out = history.list_page(finished=5, parents_only=False)
    assert [r["id"] for r in rows] == [
        *("1", "19", "20", "21", "22", "22:0", "22:1", "22:2", "26", "27")
    ]
    assert left_out == 17
    assert history.list_page(finished=2, state="FAILED") == (
        history.list_jobs(state="FAILED")[-2:],
        3,
    )
    # newest: the newest N whatever their state; nothing counted as left out
    assert [r["id"] for r in history.list_page(newest=3)[0]] == ["22", "26", "27"]
    assert [r["id"] for r in history.list_page(newest=3, parents_only=False)[0]] == [
        *("22:2", "26", "27")
    ]
    assert history.list_page(newest=3, finished=1)[1] == 0
    # neither: everything, as list_jobs
    assert history.list_page() == (history.list_jobs(), 0)
    assert history.list_page(state="RUNNING", parents_only=False, finished=1) == (
        history.list_jobs(state="RUNNING", parents_only=False),
        0,
    )


def test_table_page_cells(history: Store) -> None:
    table, _ = history.table_page(finished=5)
    cells = {t[0]: t for t in table}
    from mnp.store.reads import TABLE_COLUMNS

    assert len(TABLE_COLUMNS) == len(table[0])
    assert cells["1"] == ("1", "j1", "single", "RUNNING", "default", "", 1001.0, "")
    assert cells["22"] == ("22", "j22", "array", "PENDING", "default", "3", 1022.0, "")
    assert cells["26"][2] == "multinode" and cells["26"][5] == "4"
    assert cells["20"][7] == LONG_REASON[:60] and cells["20"][3] == "FAILED"
    assert cells["27"][6] is None


# --- `mnp list`: the command over a store, no controller -------------------------


def mnp_list(home: Path, *args: str) -> Any:
    from click.testing import CliRunner

    from mnp.cli import cli

    return CliRunner().invoke(cli, ["list", "--home", str(home), *args])


@pytest.fixture
def long_history(tmp_path: Path) -> Path:
    """1,002 finished jobs (every 10th FAILED, in queue "other"), a RUNNING one
    among the oldest (2) and a SUBMITTED one at the end: the newest 1,000 finished
    are 4-1003."""
    with Store(tmp_path / "mnp.db") as s:
        s.add_jobs(
            job_row(
                str(i),
                i,
                state="FAILED" if i % 10 == 0 else "SUCCEEDED",
                queue="other" if i % 10 == 0 else "default",
            )
            for i in range(1, 1004)
        )
        s.add_job(job_row("1004", 1004, state="SUBMITTED"))
        s.update_job("2", state="RUNNING")
    return tmp_path


def table_ids(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    assert lines[0].split() == [
        *("ID", "NAME", "TYPE", "STATE", "QUEUE", "NODES/SIZE", "AGE", "REASON")
    ]
    return [line.split()[0] for line in lines[1:]]


def test_mnp_list_shows_unfinished_jobs_and_the_newest_1000_finished(long_history: Path) -> None:
    r = mnp_list(long_history)
    assert r.exit_code == 0, r.output
    assert table_ids(r.stdout) == ["2", *map(str, range(4, 1005))]
    assert r.stderr == "mnp: 2 older finished jobs not shown; --all shows them\n"
    assert r.stdout.splitlines()[1].split()[:5] == ["2", "j2", "single", "RUNNING", "default"]
    assert all(line == line.rstrip() for line in r.stdout.splitlines())

    r = mnp_list(long_history, "--all")
    assert table_ids(r.stdout) == [str(i) for i in range(1, 1005)] and r.stderr == ""

    r = mnp_list(long_history, "--json")
    rows = json.loads(r.stdout)
    assert [j["id"] for j in rows] == ["2", *map(str, range(4, 1005))]
    assert rows[0]["depends_on"] == [] and rows[0]["timed_out"] is False
    assert "definition" not in rows[0]
    assert r.stderr == "mnp: 2 older finished jobs not shown; --all shows them\n"
    assert len(json.loads(mnp_list(long_history, "--json", "--all").stdout)) == 1004


def test_mnp_list_filters_and_limit(long_history: Path) -> None:
    r = mnp_list(long_history, "--state", "failed")  # case-insensitive, as before
    assert table_ids(r.stdout) == [str(i) for i in range(10, 1004, 10)] and r.stderr == ""
    r = mnp_list(long_history, "--queue", "default", "--state", "RUNNING")
    assert table_ids(r.stdout) == ["2"]
    r = mnp_list(long_history, "--queue", "nope")
    assert r.stdout == "no jobs\n" and r.stderr == ""
    # --limit: the newest N, finished or not, as before; nothing to note
    r = mnp_list(long_history, "--limit", "3")
    assert table_ids(r.stdout) == ["1002", "1003", "1004"] and r.stderr == ""
    r = mnp_list(long_history, "--limit", "1002", "--json")
    assert [j["id"] for j in json.loads(r.stdout)] == [str(i) for i in range(3, 1005)]
    assert mnp_list(long_history, "--limit", "0").exit_code == 2


def test_mnp_list_note_counts_one_job(tmp_path: Path) -> None:
    with Store(tmp_path / "mnp.db") as s:
        s.add_jobs(job_row(str(i), i, state="SUCCEEDED") for i in range(1, 1002))
    r = mnp_list(tmp_path, "--children")
    assert len(table_ids(r.stdout)) == 1000
    assert r.stderr == "mnp: 1 older finished job not shown; --all shows them\n"
    assert mnp_list(tmp_path / "none").stdout == "no jobs\n"


def test_mnp_list_imports_neither_the_model_nor_the_controller(long_history: Path) -> None:
    code = (
        "import sys\n"
        "from mnp.cli import main\n"
        "try:\n"
        f"    main(['list', '--home', {str(long_history)!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'mnp.model', 'mnp.controller', 'asyncssh', 'psutil', 'asyncio', 'dataclasses'}\n"
        "print(sorted(heavy & set(sys.modules)), file=sys.stderr)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert r.stderr.splitlines()[-1] == "[]", r.stderr


def test_unfinished_jobs_for_recovery(store: Store) -> None:
    store.add_job(job_row("1", 1, state="SUCCEEDED"))
    store.add_job(job_row("2", 2, state="PENDING", definition=DEFN, array_size=3))
    store.add_jobs(array_rows("2", 3, 3))
    store.add_job(job_row("3", 6, state="RUNNING", type="multinode", num_nodes=2))
    store.update_job("2:1", state="SUCCEEDED")
    store.upsert_attempt("3", 1, hosts=["a", "b"])
    store.upsert_attempt("3", 2, hosts=["c", "d"])
    store.upsert_node("3", 1, 0, host="a")
    store.upsert_node("3", 2, 0, host="c")
    store.upsert_node("3", 2, 1, host="d")
    store.upsert_attempt("1", 1, hosts=["z"])
    store.flush()
    jobs = store.unfinished_jobs()
    assert [j["id"] for j in jobs] == ["2", "2:0", "2:2", "3"]
    assert jobs[1]["definition"] == DEFN and jobs[1]["definition"] is jobs[2]["definition"]
    assert jobs[3]["definition"] == {"name": "j3", "command": ["true"]}
    assert [a["hosts"] for a in jobs[3]["attempts"]] == [["a", "b"], ["c", "d"]]
    assert [n["host"] for n in jobs[3]["nodes"]] == ["c", "d"]
    assert jobs[0]["attempts"] == [] and jobs[0]["nodes"] == []


def purge_all(store: Store, before: float | None = None, **kw: Any) -> list[str]:
    """Store.purge in chunks, then sweep everything the purged jobs left."""
    ids: list[str] = []
    while True:
        chunk = store.purge(before, **kw)
        ids += chunk
        if len(chunk) < kw.get("limit", 500):
            break
    while True:
        done, more = store.sweep_purged()
        store.purge_done(done)
        if not more:
            break
    return ids


def count(store: Store, table: str) -> int:
    return int(store.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.fixture
def finished(store: Store) -> Store:
    """1 SUCCEEDED and 2 (a FAILED array of 2) stopped at 10; 3 RUNNING; 4 SUCCEEDED at
    99; 5 RUNNABLE (was FAILED at 10: changed in the unflushed batch); each with events."""
    store.add_job(job_row("1", 1, state="SUCCEEDED", stopped=10.0))
    store.add_job(job_row("2", 2, state="FAILED", stopped=10.0, array_size=2))
    store.add_jobs(array_rows("2", 3, 2, state="FAILED"))
    store.add_job(job_row("3", 5, state="RUNNING"))
    store.add_job(job_row("4", 6, state="SUCCEEDED", stopped=99.0))
    store.add_job(job_row("5", 7, state="FAILED", stopped=10.0))
    store.upsert_attempt("1", 1, hosts=["a"])
    store.upsert_attempt("2:0", 1, hosts=["a"])
    store.upsert_node("2:0", 1, 0, host="a")
    for job_id in ("1", "2", "2:0", "2:1", "3", "4", "5"):
        index = {"array_index": int(job_id[2:])} if ":" in job_id else {}
        store.append_event(event(job_id, "SUCCEEDED", **index))
    store.update_job("5", state="RUNNABLE")  # buffered: flushed before purging, so kept
    return store


def test_purge_deletes_old_finished_jobs_their_children_attempts_and_events(
    finished: Store,
) -> None:
    store = finished
    assert store.purge(before=50.0) == ["1", "2"]
    # the top-level rows went at once; the rest is pending until swept
    assert [j["id"] for j in store.list_jobs()] == ["3", "4", "5"]
    assert store.get_job("2:0") is None  # a child of a purged job is gone for readers too
    assert store.purge_pending() == ["1", "2"] and store.events_file_stale()
    done, more = store.sweep_purged(budget=1)  # the one event of 1
    assert (done, more) == ([], True)
    done, more = store.sweep_purged(budget=2)  # 1 has nothing left; one of 2's events
    assert (done, more) == (["1"], True)
    done, more = store.sweep_purged()
    assert (done, more) == (["1", "2"], False)  # 1 again: until purge_done, it is pending
    store.purge_done(done)
    assert store.purge_pending() == []
    assert [j["id"] for j in store.list_jobs(parents_only=False)] == ["3", "4", "5"]
    assert count(store, "attempts") == count(store, "nodes") == 0
    assert [e["job_id"] for e in store.events_since(0)] == ["3", "4", "5"]
    assert purge_all(store, before=1000.0) == ["4"]
    assert purge_all(store, before=1000.0) == []
    store.events_file_rewritten()
    assert not store.events_file_stale()


def test_purge_by_state_and_without_a_time(finished: Store) -> None:
    store = finished
    with pytest.raises(ValueError, match="only finished"):
        store.purge(state="RUNNING")
    assert purge_all(store, state="FAILED") == ["2"]
    assert purge_all(store, state="SUCCEEDED") == ["1", "4"]
    assert [j["id"] for j in store.list_jobs(parents_only=False)] == ["3", "5"]
    assert [e["job_id"] for e in store.events_since(0)] == ["3", "5"]


def test_purge_never_takes_a_job_an_unfinished_one_depends_on(store: Store) -> None:
    store.add_job(job_row("1", 1, state="FAILED", stopped=1.0, array_size=2))
    store.add_jobs(array_rows("1", 2, 2, state="FAILED"))
    store.add_job(job_row("2", 4, state="SUCCEEDED", stopped=1.0))
    store.add_job(job_row("3", 5, state="SUCCEEDED", stopped=1.0))
    # 4 waits on 1's children (N_TO_N), 5 on 2: both unfinished; 6 (finished) on 3
    store.add_job(job_row("4", 6, state="PENDING", depends_on=["1:N_TO_N"], array_size=2))
    store.add_job(job_row("5", 7, state="RUNNING", depends_on=["2"]))
    store.add_job(job_row("6", 8, state="SUCCEEDED", stopped=1.0, depends_on=["3:afterany"]))
    assert purge_all(store) == ["3", "6"]
    assert store.get_job("1:1") is not None
    store.update_job("4", state="FAILED", stopped=2.0)
    store.update_job("5", state="SUCCEEDED", stopped=2.0)
    assert purge_all(store) == ["1", "2", "4", "5"]
    assert count(store, "jobs") == 0


def test_purge_goes_in_chunks_and_bounded_sweeps(store: Store) -> None:
    for i in range(1, 8):
        store.add_job(job_row(str(i), i * 100, state="SUCCEEDED", stopped=1.0, array_size=50))
        store.add_jobs(array_rows(str(i), i * 100 + 1, 50, state="SUCCEEDED"))
        for c in range(50):
            store.append_event(event(f"{i}:{c}", "SUCCEEDED", array_index=c))
    assert store.purge(limit=3) == ["1", "2", "3"]
    assert store.purge(limit=3) == ["4", "5", "6"]
    steps = 0
    while True:
        done, more = store.sweep_purged(budget=40)
        store.purge_done(done)
        steps += 1
        if not more:
            break
    assert steps >= 6 * 100 // 40  # 50 children and 50 events each, 40 rows a step
    assert store.purge_pending() == []
    assert [j["id"] for j in store.list_jobs()] == ["7"]
    assert count(store, "jobs") == 51 and count(store, "events") == 50


def test_ids_and_seqs_go_on_after_everything_is_purged(db: Path) -> None:
    with Store(db) as s:
        for _ in range(3):
            job_id = str(s.next_job_id())
            s.add_job(job_row(job_id, int(job_id), state="SUCCEEDED", stopped=1.0))
            s.append_event(event(job_id, "SUCCEEDED"))
        assert purge_all(s) == ["1", "2", "3"]
        assert count(s, "jobs") == count(s, "events") == 0
        assert s.max_event_seq() == 3 and s.max_job_seq() == 3
    with Store(db) as s:  # reopened: the counters come from meta, not from rows
        assert s.next_job_id() == 4
        assert s.append_event(event("4")) == 4
        assert s.max_job_seq() == 3
    with Store(db, readonly=True) as r:
        assert [e["seq"] for e in r.events_since(0)] == [4]


def test_raise_floors(db: Path) -> None:
    with Store(db) as s:
        s.raise_floors(next_job_id=40, event_seq=700)
        s.raise_floors(next_job_id=5, event_seq=5)  # never lowers
        assert s.next_job_id() == 40 and s.append_event(event("40")) == 701
    with Store(db) as s:
        assert s.next_job_id() == 41


# --- throughput ------------------------------------------------------------------


def test_state_change_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """10,000 jobs, 5 state changes each (update + event), flushed every 100 changes."""
    n, states = 10_000, ("PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED")
    with Store(tmp_path / "mnp.db") as s:
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            s.add_job(job_row(str(s.next_job_id()), i))
        s.flush()
        t1 = time.perf_counter()
        changes = 0
        for previous, state in zip(("SUBMITTED", *states), states, strict=False):
            for i in range(1, n + 1):
                now = time.time()
                s.update_job(str(i), state=state, reason=None, stopped=now)
                s.append_event(
                    {
                        "time": now,
                        "type": "job-state-change",
                        "job_id": str(i),
                        "name": f"j{i}",
                        "queue": "default",
                        "status": state,
                        "previous": previous,
                        "reason": None,
                        "attempt": 1,
                        "exit_code": None,
                    }
                )
                changes += 1
                if changes % 100 == 0:
                    s.flush()
        s.flush()
        t2 = time.perf_counter()
        assert s.counts_by_queue_state() == {"default": {"SUCCEEDED": n}}
        assert s.max_event_seq() == 5 * n
    figure(
        capsys,
        f"{n:,} submits (next_job_id + add_job): {(t1 - t0) * 1e3:.0f} ms; "
        f"{changes:,} state changes (update + event), flush per 100: "
        f"{changes / (t2 - t1):,.0f} changes/s",
    )


def test_a_writer_notices_its_file_deleted_or_replaced(tmp_path: Path) -> None:
    path = tmp_path / "mnp.db"
    store = Store(path)
    try:
        assert store.file_changed() is None
        path.unlink()
        assert store.file_changed() == "was deleted"
        path.write_bytes(b"")  # another file under the same name
        assert store.file_changed() == "was replaced by another file"
    finally:
        store.close()


def test_numbers_go_on_after_those_used_before_the_database(tmp_path: Path) -> None:
    """A new database beside an older events.jsonl and logs/ (continue_after): event
    seqs and job ids go on after theirs, and the ids stay reserved on disk."""
    store = Store(tmp_path / "mnp.db")
    store.continue_after(event_seq=41, job_id=7)
    assert store.append_event({"job_id": "8", "status": "SUBMITTED"}) == 42
    assert store.next_job_id() == 8
    store.continue_after(event_seq=3, job_id=2)  # never backwards
    assert store.append_event({"job_id": "9", "status": "SUBMITTED"}) == 43
    assert store.next_job_id() == 9
    store.flush()
    store.close()
    again = Store(tmp_path / "mnp.db")
    try:
        assert again.next_job_id() == 10
        assert again.append_event({"job_id": "10", "status": "SUBMITTED"}) == 44
    finally:
        again.close()


# --- sparse arrays: children not released yet are read as the rows they stand for ---


def _sparse(store: Store, released: int, **array: Any) -> None:
    """Array 1 of 100,000 children with ``released`` of them stored, then job 100002."""
    defn = {"name": "arr", "command": ["true"], "array": {"size": 100_000, **array}}
    store.add_job(job_row("1", 1, name="arr", state="PENDING", definition=defn, array_size=100_000))
    store.add_jobs(array_rows("1", 2, released, state="RUNNABLE"))
    store.add_job(job_row("100002", 100_002))
    store.flush()


def test_unreleased_children_read_as_runnable_rows(store: Store) -> None:
    _sparse(store, 3)
    store.update_job("1:0", state="RUNNING")
    store.flush()
    parent = store.get_job("1")
    assert parent is not None
    assert parent["children_counts"] == {"RUNNING": 1, "RUNNABLE": 100_000 - 1}
    child = store.get_job("1:70000")
    assert child is not None
    assert (child["state"], child["seq"], child["parent"], child["array_index"]) == (
        "RUNNABLE",
        70_002,
        "1",
        70_000,
    )
    assert child["definition"]["array"]["size"] == 100_000 and child["attempts"] == []
    assert store.get_job("1:100000") is None
    assert store.state_and_size("1:99999") == ("RUNNABLE", None)
    assert store.state_and_size("1:100000") is None
    assert [c["id"] for c in store.children("1", limit=5)] == [f"1:{i}" for i in range(5)]
    assert len(store.children("1")) == 100_000
    assert [c["id"] for c in store.children("1", state="RUNNING")] == ["1:0"]
    listed = store.list_jobs(parents_only=False)
    assert len(listed) == 100_002
    assert [j["id"] for j in listed[:2]] == ["1", "1:0"]
    assert listed[-1]["id"] == "100002"  # in seq order: the range sits under its parent
    assert [j["id"] for j in store.list_jobs(parents_only=False, after_seq=99_999, limit=3)] == [
        "1:99998",
        "1:99999",
        "100002",
    ]
    rows, left_out = store.list_page(parents_only=False, newest=2)
    assert [r["id"] for r in rows] == ["1:99999", "100002"] and left_out == 0
    table, _ = store.table_page(parents_only=False, state="RUNNABLE", finished=1000)
    assert len(table) == 100_000 - 1 and table[-1][0] == "1:99999"
    assert store.counts_by_queue_state() == {
        "default": {"RUNNING": 1, "RUNNABLE": 100_000 - 1, "SUBMITTED": 1}
    }
    assert [j["id"] for j in store.list_jobs()] == ["1", "100002"]  # parents: unchanged


@pytest.mark.parametrize(
    ("released", "array", "state"),
    [
        (0, {}, "PENDING"),  # its dependencies are not met yet: nothing released
        (2, {"parallelism": 2}, "PENDING"),  # outside the parallelism window
        (1, {"sequential": True}, "PENDING"),
    ],
)
def test_unreleased_children_wait_outside_the_window(
    store: Store, released: int, array: dict[str, Any], state: str
) -> None:
    _sparse(store, released, **array)
    parent = store.get_job("1")
    assert parent is not None
    assert parent["children_counts"].get(state) == 100_000 - released
    assert store.state_and_size("1:500") == (state, None)


def test_a_range_keeps_its_seqs_from_the_next_controller(store: Store) -> None:
    defn = {"name": "arr", "command": ["true"], "array": {"size": 1000}}
    store.add_job(job_row("1", 7, state="PENDING", definition=defn, array_size=1000))
    store.flush()
    assert store.max_job_seq() == 7 + 1000
