"""Files that are not what mnp expects (issue 12, classes 13 and 15): a state database
that is corrupt, definitions, inventories, hostfiles, secrets and state files that are
not regular files. One line and a clear exit, never a traceback or a hang; a corrupt
database is set aside (kept) and the controller starts afresh."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import mnp, wait_until
from tests.ledger import Ledger

pytestmark = pytest.mark.faults


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"MNP_HOME": str(tmp_path / "home")}
    yield env
    mnp("controller", "stop", env=env)


def one_line(r: object, code: int) -> None:
    rc, out, err = r.returncode, r.stdout, r.stderr  # type: ignore[attr-defined]
    assert rc == code, (rc, out, err)
    assert err.startswith("mnp: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


# --- 13: a corrupt state database ---------------------------------------------------


def _history(home: dict[str, str]) -> bytes:
    """Three finished jobs with output; the controller stopped; the database's bytes."""
    for i in range(3):
        r = mnp("submit", "--", "sh", "-c", f"echo job{i}", env=home)
        assert r.returncode == 0, r.stderr
    wait_until(
        "three jobs end",
        lambda: mnp("list", "--state", "SUCCEEDED", "--json", env=home).stdout.count('"id"') == 3,
        30,
    )
    assert mnp("controller", "stop", env=home).returncode == 0
    return (Path(home["MNP_HOME"]) / "mnp.db").read_bytes()


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "random bytes": lambda b: os.urandom(len(b)),
    "truncated to 50 bytes": lambda b: b[:50],
    "truncated to half": lambda b: b[: len(b) // 2],
    "garbage header": lambda b: os.urandom(100) + b[100:],
    "text file": lambda b: b"name = 'not a database'\n" * 100,
}
READERS = [["list"], ["describe", "1"], ["events"], ["logs", "1"], ["queues", "--json"], ["purge"]]


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_database_is_one_line_then_set_aside_by_the_controller(
    kind: str, home: dict[str, str], ledger: Ledger
) -> None:
    original = _history(home)
    path = Path(home["MNP_HOME"]) / "mnp.db"
    damaged = CORRUPTIONS[kind](original)
    path.write_bytes(damaged)
    for side in ("-wal", "-shm"):
        Path(str(path) + side).unlink(missing_ok=True)
    ledger.fault("corrupt state database")
    for argv in READERS:
        with ledger.tried("corrupt state database"):
            r = mnp(*argv, env=home, timeout=30)
            if argv[0] == "queues":  # answered from the inventory when the store fails?
                assert r.returncode in (0, 3), r.stderr
                if r.returncode == 0:
                    continue
            one_line(r, 3)
            assert str(path) in r.stderr and "mnp controller start" in r.stderr, r.stderr
            assert "corrupt-" in r.stderr, r.stderr
    # the advice works: a controller (here started by submit) sets the file aside
    with ledger.tried("corrupt state database"):
        r = mnp("submit", "--", "sh", "-c", "echo after", env=home, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("mnp: warning: ") and "moved aside" in r.stderr
    job = r.stdout.strip()
    assert int(job) > 3  # above the old jobs' log folders: never mixed with theirs
    aside = sorted(path.parent.glob("mnp.db.corrupt-*"))
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [damaged]
    assert (path.parent / "logs" / "1").is_dir()  # the old jobs' logs are kept
    wait_until("the new job ends", lambda: mnp("logs", job, env=home).stdout == "after\n", 30)
    r = mnp("list", "--json", env=home)
    assert [j["id"] for j in json.loads(r.stdout)] == [job]
    seqs = [json.loads(x)["seq"] for x in mnp("events", env=home).stdout.splitlines()]
    old = [json.loads(x) for x in (path.parent / "events.jsonl").read_text().splitlines()]
    assert seqs and min(seqs) > max(e["seq"] for e in old if e["job_id"] != job)


def test_controller_start_sets_a_corrupt_database_aside(
    home: dict[str, str], ledger: Ledger
) -> None:
    path = Path(home["MNP_HOME"])
    path.mkdir(mode=0o700)
    (path / "mnp.db").write_bytes(os.urandom(8192))
    ledger.fault("corrupt state database")
    with ledger.tried("corrupt state database"):
        r = mnp("controller", "start", env=home, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "moved aside" in r.stderr and "Traceback" not in r.stderr
    assert len(list(path.glob("mnp.db.corrupt-*"))) == 1
    assert mnp("list", env=home).stdout == "no jobs\n"


def test_controller_start_refusing_a_database_says_why_in_one_line(
    home: dict[str, str], ledger: Ledger
) -> None:
    """What cannot be set aside safely (a newer mnp's database, another program's) is
    refused in one line by controller start and submit alike."""
    path = Path(home["MNP_HOME"])
    path.mkdir(mode=0o700)
    for setup, needle in (
        ("PRAGMA user_version = 99", "newer mnp"),
        ("CREATE TABLE other (x)", "did not create"),
    ):
        (path / "mnp.db").unlink(missing_ok=True)
        conn = sqlite3.connect(path / "mnp.db")
        conn.execute(setup)
        conn.close()
        for argv in (["controller", "start"], ["submit", "--", "true"], ["list"]):
            with ledger.tried("foreign state database"):
                r = mnp(*argv, env=home, timeout=60)
                one_line(r, 3)
                assert needle in r.stderr, r.stderr
        assert not list(path.glob("mnp.db.corrupt-*"))


# --- 15: files that are not regular files --------------------------------------------


def _special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "device":
        return Path("/dev/zero")  # endless: read whole, it would fill memory
    elif kind == "null":
        return Path("/dev/null")
    return path


KINDS = ["fifo", "directory", "socket", "device", "null"]
WHAT = {
    "fifo": "FIFO",
    "directory": "directory",
    "socket": "socket",
    "device": "character device",
    "null": "character device",
}
USES: dict[str, Callable[[str], list[str]]] = {
    "validate": lambda f: ["validate", f],
    "run DEF": lambda f: ["run", f],
    "submit DEF": lambda f: ["submit", f],
    "run --inventory": lambda f: ["run", "--inventory", f, "--", "true"],
    "hosts --inventory": lambda f: ["hosts", "--inventory", f],
    "hostfile": lambda f: ["hosts", "--inventory", f"hostfile:{f}"],
    "controller start --inventory": lambda f: ["controller", "start", "--inventory", f],
    "submit --inventory": lambda f: ["submit", "--inventory", f, "--", "true"],
}


@pytest.mark.parametrize("use", sorted(USES))
@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_is_not_a_regular_file_is_refused_in_one_line(
    kind: str, use: str, tmp_path: Path, ledger: Ledger
) -> None:
    target = _special(tmp_path, kind)
    env = {"MNP_HOME": str(tmp_path / "home")}
    with ledger.tried("not a regular file"):
        try:
            r = mnp(*USES[use](str(target)), env=env, timeout=20)  # a FIFO once hung here
        finally:
            mnp("controller", "stop", env=env)
        one_line(r, 2)
        assert str(target) in r.stderr and WHAT[kind] in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_pbs_nodefile_that_is_not_a_regular_file(
    kind: str, tmp_path: Path, ledger: Ledger
) -> None:
    target = _special(tmp_path, kind)
    with ledger.tried("not a regular file"):
        r = mnp("hosts", "--inventory", "pbs", env={"PBS_NODEFILE": str(target)}, timeout=20)
        one_line(r, 2)
        assert WHAT[kind] in r.stderr


def test_a_secret_file_that_is_a_fifo_fails_the_job_not_the_controller(
    home: dict[str, str], tmp_path: Path, ledger: Ledger
) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    job = tmp_path / "job.toml"
    job.write_text(f'command = ["true"]\n[secrets]\nTOKEN = {{ file = "{fifo}" }}\n')
    with ledger.tried("not a regular file"):
        r = mnp("submit", str(job), env=home, timeout=60)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip()

        def ended() -> dict[str, object] | None:
            d = json.loads(mnp("describe", job_id, "--json", env=home).stdout)
            return d if d["state"] in ("SUCCEEDED", "FAILED") else None

        d = wait_until("the job ends", ended, 30)
        assert d["state"] == "FAILED" and "FIFO" in str(d["reason"]), d["reason"]
    r = mnp("submit", "--wait", "--", "true", env=home, timeout=60)  # the controller goes on
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["mnp.db", "events.jsonl", "controller.log"])
def test_state_files_that_are_fifos_never_hang_mnp(
    name: str, home: dict[str, str], ledger: Ledger
) -> None:
    path = Path(home["MNP_HOME"])
    path.mkdir(mode=0o700)
    os.mkfifo(path / name)
    ledger.fault(f"{name} is a FIFO")
    with ledger.tried("not a regular file"):
        r = mnp("submit", "--", "true", env=home, timeout=60)
        if name in ("mnp.db", "controller.log"):
            one_line(r, 3)
            assert "FIFO" in r.stderr, r.stderr
        else:  # the events file is not written (logged), jobs still run
            assert r.returncode == 0, r.stderr
        r = mnp("list", env=home, timeout=20)
        if name == "mnp.db":
            one_line(r, 3)
        else:
            assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO((path / name).stat().st_mode)  # never replaced or removed
