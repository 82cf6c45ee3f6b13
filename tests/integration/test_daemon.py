"""The controller daemon through the CLI (issue: the whole AWS Batch job model)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import describe, mnp, submit, wait_no_procs, wait_until
from tests.ledger import Ledger


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"MNP_HOME": str(tmp_path / "home")}
    yield env
    mnp("controller", "stop", env=env)


def wait_state(env: dict[str, str], job: str, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = describe(env, job)
        if d["state"] in ("SUCCEEDED", "FAILED"):
            return d
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not end: {d}")


def test_submit_starts_a_private_controller(home: dict[str, str]) -> None:
    job = submit(home, "--", "true")
    assert wait_state(home, job)["state"] == "SUCCEEDED"
    path = Path(home["MNP_HOME"])
    assert path.stat().st_mode & 0o777 == 0o700
    assert (path / "controller.sock").stat().st_mode & 0o777 == 0o600
    assert mnp("controller", "status", env=home).returncode == 0


def test_failed_dependency(home: dict[str, str]) -> None:
    first = submit(home, "--", "sh", "-c", "exit 1")
    second = submit(home, "--depends-on", first, "--", "true")
    d = wait_state(home, second)
    assert (d["state"], d["reason"]) == ("FAILED", f"Dependent job {first} failed")


def test_three_attempts_show_in_describe(home: dict[str, str]) -> None:
    job = submit(home, "--attempts", "3", "--", "sh", "-c", "exit 1")
    d = wait_state(home, job)
    assert d["state"] == "FAILED"
    assert [a["number"] for a in d["attempts"]] == [1, 2, 3]  # type: ignore[union-attr]
    text = mnp("describe", job, env=home).stdout
    assert text.count("attempt ") == 3 and text.startswith("root cause:")


def test_timeout_after_one_attempt(home: dict[str, str]) -> None:
    job = submit(home, "--timeout", "1s", "--attempts", "2", "--", "sleep", "30")
    d = wait_state(home, job)
    assert (d["state"], d["reason"]) == ("FAILED", "Job attempt duration exceeded timeout")
    assert len(d["attempts"]) == 1  # type: ignore[arg-type]


def test_submit_wait_exits_with_the_job(home: dict[str, str]) -> None:
    r = mnp("submit", "--wait", "--", "sh", "-c", "exit 4", env=home)
    assert r.returncode == 4


def test_logs_and_events(home: dict[str, str]) -> None:
    job = submit(home, "--array-size", "3", "--", "sh", "-c", "echo out $MNP_ARRAY_INDEX")
    wait_state(home, job)
    r = mnp("logs", job, env=home)
    assert sorted(r.stdout.splitlines()) == [f"{i}: out {i}" for i in range(3)]
    assert mnp("logs", f"{job}:1", env=home).stdout == "out 1\n"
    events = [
        json.loads(line) for line in mnp("events", "--job", job, env=home).stdout.splitlines()
    ]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    terminal = [e["job_id"] for e in events if e["status"] in ("SUCCEEDED", "FAILED")]
    assert sorted(terminal) == sorted([job, f"{job}:0", f"{job}:1", f"{job}:2"])
    last = seqs[-1]
    assert mnp("events", "--since", str(last), "--job", job, env=home).stdout == ""
    lines = Path(home["MNP_HOME"], "events.jsonl").read_text().splitlines()
    assert {json.loads(x)["seq"] for x in lines} >= set(seqs)


def test_cancel_and_terminate(home: dict[str, str]) -> None:
    running = submit(home, "--", "sleep", "30")
    waiting = submit(home, "--depends-on", running, "--", "true")
    time.sleep(0.5)
    r = mnp("cancel", waiting, "--reason", "not needed", env=home)
    assert r.returncode == 0, r.stderr
    assert wait_state(home, waiting)["reason"] == "not needed"
    r = mnp("terminate", running, "--reason", "enough", env=home)
    d = wait_state(home, running)
    assert (d["state"], d["reason"]) == ("FAILED", "enough")


def test_jobs_are_named_by_name_or_by_id(home: dict[str, str]) -> None:
    """Issue 11: a name is the newest job of that name, for every command that names
    a job, before and after a restart of the controller."""
    first = submit(home, "--name", "prep", "--", "echo", "first")
    wait_state(home, first)
    script = "echo second $MNP_ARRAY_INDEX"
    second = submit(home, "--name", "prep", "--array-size", "2", "--", "sh", "-c", script)
    dep = submit(home, "--depends-on", "prep", "--", "true")
    d = wait_state(home, dep)
    assert (d["state"], d["depends_on"]) == ("SUCCEEDED", [second])
    assert describe(home, "prep")["id"] == second
    assert describe(home, "prep:1")["id"] == f"{second}:1"
    assert describe(home, first)["name"] == "prep"  # an id still names its own job
    assert mnp("logs", "prep:1", env=home).stdout == "second 1\n"
    assert sorted(mnp("logs", "prep", env=home).stdout.splitlines()) == [
        "0: second 0",
        "1: second 1",
    ]
    events = mnp("events", "--job", "prep", env=home).stdout.splitlines()
    assert events and {json.loads(e)["job_id"].split(":")[0] for e in events} == {second}
    # after a restart the controller holds no finished job: names and ids of stored ones
    assert mnp("controller", "stop", env=home).returncode == 0
    late = submit(home, "--depends-on", "prep:afterany", "--depends-on", first, "--", "true")
    assert describe(home, late)["depends_on"] == [f"{second}:afterany", first]
    assert wait_state(home, late)["state"] == "SUCCEEDED"
    long = submit(home, "--name", "long", "--", "sleep", "30")
    r = mnp("terminate", "long", "--reason", "by name", env=home)
    assert r.returncode == 0 and r.stdout.split()[0] == long, r.stderr
    assert (wait_state(home, long)["reason"]) == "by name"
    for argv, needle in [
        (["describe", "nosuch"], "mnp: job nosuch does not exist\n"),
        (["logs", "nosuch#0"], "mnp: job nosuch does not exist\n"),
        (["cancel", "nosuch", "--reason", "x"], "mnp: job nosuch does not exist\n"),
        (["submit", "--depends-on", "nosuch", "--", "true"], "job nosuch does not exist\n"),
    ]:
        r = mnp(*argv, env=home)
        assert r.returncode == 2 and r.stderr.endswith(needle), (argv, r.stderr)
        assert r.stderr.startswith("mnp: ") and r.stderr.count("\n") == 1


def test_submit_cancel_terminate_json(home: dict[str, str]) -> None:
    r = mnp("submit", "--json", "--name", "js", "--", "sleep", "30", env=home)
    assert r.returncode == 0, r.stderr
    running = json.loads(r.stdout)
    assert running == {"job_id": running["job_id"], "name": "js", "warnings": []}
    r = mnp("submit", "--json", "--depends-on", "js", "--", "true", env=home)
    waiting = json.loads(r.stdout)["job_id"]
    r = mnp("cancel", waiting, "--reason", "no", "--json", env=home)
    assert json.loads(r.stdout) == {"job_id": waiting, "name": "true", "state": "FAILED"}
    r = mnp("terminate", "js", "--reason", "enough", "--json", env=home)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert (answer["job_id"], answer["name"]) == (running["job_id"], "js")
    r = mnp("submit", "--json", "--wait", "--", "sh", "-c", "exit 3", env=home)
    done = json.loads(r.stdout)
    assert r.returncode == 3
    assert (done["state"], done["exit_code"], done["name"]) == ("FAILED", 3, "sh")
    # errors stay one line on stderr, exit 2, nothing on stdout
    for argv in (["submit", "--json", "--vcpus", "4096", "--", "true"],
                 ["terminate", "nosuch", "--reason", "x", "--json"]):  # fmt: skip
        r = mnp(*argv, env=home)
        assert (r.returncode, r.stdout, r.stderr.count("\n")) == (2, "", 1), r.stderr


def test_hosts_show_their_load(home: dict[str, str]) -> None:
    assert mnp("controller", "start", env=home).returncode == 0
    r = mnp("hosts", "--json", env=home)
    assert r.returncode == 0, r.stderr
    hosts = json.loads(r.stdout)
    assert [h["name"] for h in hosts] == [f"local-{i}" for i in range(4)]
    for h in hosts:
        assert h["state"] == "up" and abs(h["load"] - os.getloadavg()[0]) < 5, h
        assert 0 < h["memory_used"] <= psutil.virtual_memory().total
    header, *rows = mnp("hosts", env=home).stdout.splitlines()
    assert header.split()[-3:] == ["TASKS", "LOAD", "MEMORY_USED"]
    assert len(rows) == 4 and all(float(row.split()[-2]) >= 0 for row in rows)


def test_run_uses_the_running_controller(home: dict[str, str]) -> None:
    submit(home, "--", "true")
    r = mnp("run", "--array-size", "3", "--", "sh", "-c", "echo $MNP_ARRAY_INDEX", env=home)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["0: 0", "1: 1", "2: 2"]
    assert "no jobs" not in mnp("list", env=home).stdout


def test_resource_misconfiguration_is_refused_at_submit(home: dict[str, str]) -> None:
    r = mnp("submit", "--vcpus", "4096", "--", "true", env=home)
    assert r.returncode == 2
    assert "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT" in r.stderr


@pytest.mark.faults
def test_sigkill_and_restart_lose_nothing(home: dict[str, str], ledger: Ledger) -> None:
    """5 rounds of SIGKILL under load: every job ends exactly once, nothing runs unmanaged."""
    mark = uuid.uuid4().hex
    arr = submit(home, "--env", f"TEST_MARK={mark}", "--array-size", "1000", "--", "sleep", "0.05")
    mn = submit(home, "--env", f"TEST_MARK={mark}", "--nodes", "2", "--", "sleep", "1.5")
    dep = submit(home, "--depends-on", arr, "--", "true")
    for _ in range(5):
        time.sleep(0.6)
        st = json.loads(mnp("controller", "status", "--json", env=home).stdout)
        os.kill(int(st["pid"]), signal.SIGKILL)
        ledger.fault("controller SIGKILL + restart (local hosts)")
        # its local agents die with it, and take their tasks along
        left = wait_no_procs("TEST_MARK", mark, 5)
        ledger.orphans_found(len(left))
        assert left == []
        r = mnp("controller", "start", env=home)
        assert r.returncode == 0, r.stderr
    for job in (arr, mn, dep):
        assert wait_state(home, job, 60)["state"] == "SUCCEEDED", job
    events = [json.loads(x) for x in mnp("events", env=home).stdout.splitlines()]
    ends: dict[str, int] = {}
    for e in events:
        if e["status"] in ("SUCCEEDED", "FAILED"):
            key = e["job_id"] + (f"#{e['node_index']}" if "node_index" in e else "")
            ends[key] = ends.get(key, 0) + 1
    jobs = [arr, mn, dep] + [f"{arr}:{i}" for i in range(1000)]
    ledger.jobs(accepted=len(jobs), lost=sum(ends.get(j) != 1 for j in jobs))
    assert all(ends.get(j) == 1 for j in jobs), {j: ends.get(j) for j in jobs if ends.get(j) != 1}
    assert [p for p in psutil.process_iter() if _marked(p, mark)] == []


def _marked(p: psutil.Process, mark: str) -> bool:
    try:
        return p.environ().get("TEST_MARK") == mark
    except (psutil.Error, OSError):
        return False


def test_a_controller_serves_only_its_own_inventory(home: dict[str, str]) -> None:
    submit(home, "--", "true")  # starts a controller on the local default (4 nodes)
    r = mnp("submit", "--inventory", "local", "--local-nodes", "2", "--", "true", env=home)
    assert r.returncode == 2
    assert "serves inventory local:4, not local:2" in r.stderr
    # mnp run with another inventory runs in-process instead
    r = mnp("run", "--inventory", "local", "--local-nodes", "2", "--", "echo", "here", env=home)
    assert (r.returncode, r.stdout) == (0, "here\n")


@pytest.mark.security("secrets reach the task and appear nowhere else")
def test_secrets_reach_the_task_and_nowhere_else(home: dict[str, str], tmp_path: Path) -> None:
    import hashlib

    file_secret = "file-" + uuid.uuid4().hex
    env_secret = "env-" + uuid.uuid4().hex
    (tmp_path / "token").write_text(file_secret + "\n")
    job = tmp_path / "secret.toml"
    job.write_text(
        f"""\
name = "secret"
command = ["sh", "-c", "printenv FROM_FILE | sha256sum; printenv FROM_ENV | sha256sum"]
[secrets]
FROM_FILE = {{ file = "{tmp_path / "token"}" }}
FROM_ENV = {{ env = "MNP_TEST_SECRET" }}
"""
    )
    # the controller reads env secrets from its own environment: start it with one
    env = {**home, "MNP_TEST_SECRET": env_secret}
    r = mnp("submit", "--wait", str(job), env=env)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    digests = mnp("logs", job_id, env=home).stdout.split()
    assert hashlib.sha256((file_secret + "\n").encode()).hexdigest() in digests
    assert hashlib.sha256((env_secret + "\n").encode()).hexdigest() in digests
    seen = mnp("describe", job_id, "--json", env=home).stdout + mnp("events", env=home).stdout
    state = Path(home["MNP_HOME"])
    for path in state.rglob("*"):
        if path.is_file() and not path.is_socket():
            seen += path.read_bytes().decode("utf-8", "replace")
    assert file_secret not in seen and env_secret not in seen


def test_a_restarted_controller_numbers_on_after_finished_jobs(home: dict[str, str]) -> None:
    first = submit(home, "--", "true")
    wait_state(home, first)
    assert mnp("controller", "stop", env=home).returncode == 0
    assert mnp("controller", "start", env=home).returncode == 0
    second = submit(home, "--", "true")
    assert int(second) > int(first)
    assert wait_state(home, second)["state"] == "SUCCEEDED"


def test_export_forwards_the_submitting_shells_environment(home: dict[str, str]) -> None:
    """``--export`` (Slurm's ``--export=ALL``) through a controller started without the
    variable: the task sees the submitting shell's value; ``--env`` wins over it."""
    assert mnp("controller", "start", env=home).returncode == 0
    marker = uuid.uuid4().hex
    shell = {**home, "EXPORT_TEST_VAR": marker, "W": "from the shell"}
    script = 'echo "v=$EXPORT_TEST_VAR w=$W"'
    r = mnp("run", "--export", "--env", "W=set", "--", "sh", "-c", script, env=shell)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"v={marker} w=set"
    r = mnp("run", "--", "sh", "-c", script, env=shell)
    assert r.stdout.strip() == "v= w="


def test_mnp_run_through_a_running_controller_is_the_quick_clients(
    home: dict[str, str], tmp_path: Path
) -> None:
    """With a controller running, ``mnp run -- CMD`` is the quick client's: it imports
    neither click nor ``mnp.spec`` nor ``mnp.model``, the job runs where it was started
    from and the client exits with its code. What the full command must judge (a bad
    option, a job the controller refuses) is said by it, once, and leaves no job."""
    assert mnp("controller", "start", env=home).returncode == 0
    probe = (
        "import sys; from mnp.quickrun import quick_run; code = quick_run(sys.argv[1:]); "
        "print([m for m in ('click', 'mnp.spec', 'mnp.model') if m in sys.modules], code)"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, "--", "sh", "-c", "pwd; exit 3"],
        cwd=tmp_path,
        env={**os.environ, **home},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.splitlines() == [str(tmp_path), "[] 3"], r.stderr
    # -v is the client's own: the attempt's timings at the end, as the full command prints
    r = subprocess.run(
        [sys.executable, "-c", probe, "--name", "quick", "-v", "--", "true"],
        env={**os.environ, **home},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.splitlines() == ["[] 0"], r.stderr
    timed = re.search(r"^mnp: job (\d+) attempt 1: \{", r.stderr, re.M)
    assert timed is not None, r.stderr
    assert describe(home, timed.group(1))["name"] == "quick"
    r = mnp("run", "--nodes", "x", "--", "true", env=home)
    assert r.returncode == 2 and "Invalid value for '--nodes'" in r.stderr, r.stderr
    r = mnp("run", "--vcpus", "4096", "--", "true", env=home)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT") == 1, r.stderr
    listed = json.loads(mnp("list", "--json", env=home).stdout)
    assert [j["state"] for j in listed] == ["FAILED", "SUCCEEDED"], listed


def test_controller_stop_neither_fails_a_running_job_nor_uses_an_attempt(
    home: dict[str, str],
) -> None:
    job = submit(home, "--attempts", "1", "--", "sh", "-c", "sleep 2; echo done")
    runner = subprocess.Popen(
        [sys.executable, "-m", "mnp", "run", "--attempts", "1", "--", "sleep", "3"],
        env={**os.environ, **home},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def running(j: str) -> bool:
        r = mnp("describe", j, "--json", env=home)
        return r.returncode == 0 and json.loads(r.stdout)["state"] == "RUNNING"

    for j in (job, "2"):
        wait_until(f"job {j} RUNNING", lambda j=j: running(j), 30)
    assert mnp("controller", "stop", env=home).returncode == 0
    # the `mnp run` client is told its job was stopped, not failed
    _, err = runner.communicate(timeout=30)
    assert runner.returncode == 3, err
    assert "the controller stopped; job 2 was not failed" in err
    for j in (job, "2"):
        assert describe(home, j)["state"] == "RUNNING"  # as left, until a controller resumes it
    events = mnp("events", env=home).stdout
    assert '"FAILED"' not in events
    assert mnp("controller", "start", env=home).returncode == 0
    for j in (job, "2"):
        d = wait_state(home, j)
        # --attempts 1, and the stopped attempt did not count against it
        assert d["state"] == "SUCCEEDED", (d["reason"], d["attempts"])
        assert len(d["attempts"]) == 2  # type: ignore[arg-type]
    assert mnp("logs", job, env=home).stdout == "done\n"


class _Client:
    """A ``Responder`` for an op called in-process: keeps the answers; its client never
    goes away."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.ended: dict[str, Any] | None = None

    async def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)

    async def end(self, msg: dict[str, Any] | None = None) -> None:
        self.ended = msg or {}

    async def fail(self, error: Exception) -> None:
        raise AssertionError(f"the op failed: {error}")

    async def wait_closed(self) -> None:
        await asyncio.Event().wait()


def test_run_and_wait_answer_once_the_end_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a client reads from the store as soon as ``run`` or ``wait`` answered (a
    ``describe``) shows the job's end, however long the batching window of the writes."""
    from mnp.daemon import Daemon, prepare_home
    from mnp.service import Service, recording
    from mnp.spec import definition_from_command, definition_to_dict, local_inventory
    from mnp.store import Store

    monkeypatch.setattr(recording, "FLUSH_EVERY", 600.0)
    home = prepare_home(tmp_path / "home")
    request = {"definition": definition_to_dict(definition_from_command(["true"]))}

    def stored_state(job_id: str) -> str | None:
        with Store(home / "mnp.db", readonly=True) as store:
            row = store.get_job(job_id)
        return None if row is None else str(row["state"])

    async def go() -> tuple[str | None, str | None]:
        service = Service(home, local_inventory(1), "local:1")
        ops = service.ops(Daemon(home, asyncio.get_running_loop()))
        await service.start(restore=False)
        try:
            ran = _Client()
            await ops["run"](request, ran)  # type: ignore[arg-type]
            assert ran.ended is not None and ran.ended["state"] == "SUCCEEDED", ran.ended
            after_run = stored_state(ran.ended["job_id"])
            submitted = _Client()  # its answer commits what was buffered before it
            await ops["submit"](request, submitted)  # type: ignore[arg-type]
            assert submitted.ended is not None
            job_id = submitted.ended["job_id"]
            await service.controller.wait(service.controller.jobs[job_id])
            waited = _Client()
            await ops["wait"]({"job_id": job_id}, waited)  # type: ignore[arg-type]
            assert waited.ended is not None and waited.ended["state"] == "SUCCEEDED"
            return after_run, stored_state(job_id)
        finally:
            await service.shutdown()

    assert asyncio.run(go()) == ("SUCCEEDED", "SUCCEEDED")
