"""Faults of issue 12 injected into the real controller daemon, on local agents and on
real sshd hosts: a restart racing the agents' stale sweeps, a hung (SIGSTOPped) agent,
the state database deleted under the controller, a client that stops reading, and a
task's daemon that sheds its session and environment. Each test records what it did
in the fault ledger (tests/ledger.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import (
    controller_pid,
    describe,
    mnp,
    procs_with_env,
    submit,
    wait_no_procs,
    wait_until,
)
from tests.integration.sshd import SshdCluster
from tests.ledger import Ledger

pytestmark = [pytest.mark.faults]

TERMINAL = ("SUCCEEDED", "FAILED")
Daemon = Callable[..., dict[str, str]]


@pytest.fixture
def start_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    """``start_daemon(hosts, **env)``: a controller daemon with its own MNP_HOME serving
    ``hosts`` ("local": 4 local nodes; "ssh": the 4 sshd hosts), ``env`` added to the
    environment it starts with. Stopped at the end of the test."""
    started: list[dict[str, str]] = []

    def start(hosts: str, **extra: str) -> dict[str, str]:
        if hosts == "ssh":
            cluster: SshdCluster = request.getfixturevalue("sshd_hosts_default")
            inventory = str(cluster.inventory_toml)
        else:
            inventory = "local"
        home = tmp_path / f"home{len(started)}"
        env = {"MNP_HOME": str(home), "MNP_INVENTORY": inventory, **extra}
        r = mnp("controller", "start", env=env)
        assert r.returncode == 0, r.stderr
        started.append(env)
        return env

    yield start
    for env in started:
        mnp("controller", "stop", env=env)


def hosts_of(env: dict[str, str]) -> list[dict[str, Any]]:
    r = mnp("hosts", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def ended(env: dict[str, str], job: str) -> dict[str, Any] | None:
    d = describe(env, job)
    return d if d["state"] in TERMINAL else None


def kill_and_restart(env: dict[str, str], ledger: Ledger) -> None:
    pid = controller_pid(env)
    os.kill(pid, signal.SIGKILL)
    ledger.fault("controller SIGKILL + restart")
    wait_until("the killed controller gone", lambda: not psutil.pid_exists(pid), 5)
    r = mnp("controller", "start", env=env)
    assert r.returncode == 0, r.stderr


# --- 1. a restart must not let a stale sweep kill the retry ------------------------


@pytest.mark.parametrize("hosts", ["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def test_restart_retries_running_jobs_and_no_stale_sweep_kills_the_retry(
    hosts: str, start_daemon: Daemon, ledger: Ledger
) -> None:
    """SIGKILL the controller while jobs run and start it again: each running job is
    retried (a lost attempt) and the retry runs to its end. The new agents' stale sweep
    must never take a retry -- same job id as the lost attempt -- for a leftover
    (before the fix about half the retries got SIGTERM a few ms after they started).

    To hold every sweep open while the retries are spawned, a real leftover is planted
    before each restart: a process carrying the controller's token and a job id that
    is over, which ignores SIGTERM (the sweeps wait their grace, then SIGKILL it)."""
    env = start_daemon(hosts)
    mark = uuid.uuid4().hex
    jobs: list[str] = []
    planted: list[subprocess.Popen[bytes]] = []
    # one job a host, half of them ignoring SIGTERM as the leftover does
    scripts = ["sleep 3", "trap '' TERM; sleep 3"] * 2
    whole = ["--vcpus", str(max(h["vcpus"] for h in hosts_of(env)))]
    try:
        for _ in range(3):
            batch = [
                submit(env, *whole, "--env", f"TEST_MARK={mark}", "--", "sh", "-c", script)
                for script in scripts
            ]
            jobs += batch
            wait_until(
                "the jobs running",
                lambda b=batch: all(describe(env, j)["state"] == "RUNNING" for j in b),
                30,
            )
            token = procs_with_env("TEST_MARK", mark)[0].environ()["MNP_CONTROLLER_ID"]
            tags = {"MNP_CONTROLLER_ID": token, "MNP_JOB_ID": "0", "TEST_MARK": f"{mark}-0"}
            planted.append(
                subprocess.Popen(
                    ["sh", "-c", "trap '' TERM; sleep 30"],
                    env={**os.environ, **tags},
                    start_new_session=True,
                )
            )
            kill_and_restart(env, ledger)
        done = [wait_until(f"job {j} to end", lambda j=j: ended(env, j), 60) for j in jobs]
        left = wait_no_procs("TEST_MARK", mark, 10)
        bad = [d for d in done if d["state"] != "SUCCEEDED"]
        ledger.jobs(accepted=len(jobs), lost=len(bad))
        ledger.orphans_found(len(left))
        assert bad == [], [(d["id"], d["reason"], d["exit_code"], d["signal"]) for d in bad]
        for d in done:
            last = d["attempts"][-1]
            assert (last["exit_code"], last["signal"]) == (0, None), d
        assert left == []
        # the sweeps still do their job: the planted leftovers are dead (SIGKILLed, or
        # exiting 137 when their sleep was SIGKILLed first)
        assert all(p.wait(10) in (-signal.SIGKILL, 128 + signal.SIGKILL) for p in planted)
    finally:
        for p in planted:
            if p.poll() is None:
                p.kill()
                p.wait()


# --- 2. a hung agent is noticed ------------------------------------------------------

HEARTBEAT = {"MNP_HEARTBEAT_INTERVAL": "0.5", "MNP_HEARTBEAT_TIMEOUT": "3"}


def agent_of(task: psutil.Process) -> psutil.Process:
    """The agent that started ``task`` (its parent: tasks are spawned directly)."""
    agent = task.parent()
    assert agent is not None and "--ctl" in agent.cmdline(), agent
    return agent


def has_exited(p: psutil.Process) -> bool:
    try:
        return p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("hosts", ["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def test_hung_agent_is_given_up_on_and_its_job_retried(
    hosts: str, start_daemon: Daemon, ledger: Ledger
) -> None:
    """SIGSTOP the agent of a running job (its connection stays up): the heartbeat
    notices it within its deadline, the attempt fails with `Host lost: NAME (agent not
    responding)` and is retried; the next agent on that host kills the lost attempt's
    processes even while the old agent is still stopped. After SIGCONT the old agent
    finds its connection closed and exits, and the host is up."""
    env = start_daemon(hosts, **HEARTBEAT)
    mark = uuid.uuid4().hex
    script = 'if [ "$MNP_JOB_ATTEMPT" = 1 ]; then exec sleep 1000; fi; echo "$MNP_HOST"'
    job = submit(env, "--env", f"TEST_MARK={mark}", "--attempts", "2", "--", "sh", "-c", script)
    (task,) = wait_until(
        "the first attempt's sleep",
        lambda: [p for p in procs_with_env("TEST_MARK", mark) if p.name() == "sleep"],
        30,
    )
    host = task.environ()["MNP_HOST"]
    agent = agent_of(task)
    agent.suspend()
    ledger.fault("agent SIGSTOPped (hung)")
    t0 = time.monotonic()
    try:

        def first_attempt_failed() -> dict[str, Any] | None:
            d = describe(env, job)
            return d if d["attempts"] and d["attempts"][0].get("reason") else None

        d = wait_until("the attempt to fail", first_attempt_failed, 20, every=0.1)
        took = time.monotonic() - t0
        assert d["attempts"][0]["reason"] == f"Host lost: {host} (agent not responding)"
        assert took <= 3 + 3, took  # the deadline, and a beat or two
        d = wait_until("the retry to end", lambda: ended(env, job), 30)
        assert d["state"] == "SUCCEEDED", d
        # the lost attempt's sleep: killed by the host's next agent (the old one is stopped)
        left = wait_no_procs("TEST_MARK", mark, 15)
        ledger.orphans_found(len(left))
        assert left == []
    finally:
        agent.resume()
    wait_until("the old agent to exit", lambda: has_exited(agent), 20)

    def up() -> bool:
        return any(h["name"] == host and h["state"] == "up" for h in hosts_of(env))

    wait_until(f"{host} up", up, 30, every=0.5)
    ledger.jobs(accepted=1, lost=0)


@pytest.mark.parametrize("hosts", ["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def test_timeout_ends_the_job_even_when_its_agent_is_hung(
    hosts: str, start_daemon: Daemon, ledger: Ledger
) -> None:
    """A job's own timeout fires whatever its agent does: the agent is SIGSTOPped, the
    kill it is sent is never answered, and the job still ends FAILED with the timeout's
    reason (not retried), once the controller gives up on the host."""
    env = start_daemon(hosts, **HEARTBEAT)
    mark = uuid.uuid4().hex
    job = submit(
        env,
        "--env",
        f"TEST_MARK={mark}",
        "--timeout",
        "2",
        "--attempts",
        "2",
        "--",
        "sleep",
        "1000",
    )
    (task,) = wait_until("the sleep", lambda: procs_with_env("TEST_MARK", mark), 30)
    agent = agent_of(task)
    agent.suspend()
    ledger.fault("agent SIGSTOPped (hung)")
    t0 = time.monotonic()
    try:
        d = wait_until("the job to end", lambda: ended(env, job), 20)
        took = time.monotonic() - t0
        assert d["state"] == "FAILED", d
        assert d["reason"] == "Job attempt duration exceeded timeout", d
        assert len(d["attempts"]) == 1 and d["timed_out"], d
        assert took <= 2 + 3 + 3, took
        left = wait_no_procs("TEST_MARK", mark, 15)
        ledger.orphans_found(len(left))
        assert left == []
    finally:
        agent.resume()
    wait_until("the old agent to exit", lambda: has_exited(agent), 20)
    ledger.jobs(accepted=1, lost=0)


# --- 6. the state database deleted or replaced under the controller ----------------------


def event_seqs(env: dict[str, str]) -> list[int]:
    path = Path(env["MNP_HOME"]) / "events.jsonl"
    return [int(json.loads(line)["seq"]) for line in path.read_text().splitlines()]


def test_state_database_deleted_or_replaced_under_the_controller(
    start_daemon: Daemon, ledger: Ledger
) -> None:
    """`mnp.db` deleted under a running controller: `submit` is refused (exit 3, one line
    saying what happened and what to do) instead of answering an id for a job that would
    be lost at the restart. The controller started again on a new database goes on after
    the last event `seq` and job id in use (`events.jsonl`, `logs/`): no number twice.
    A database replaced by another file is refused the same way."""
    env = start_daemon("local")
    home = Path(env["MNP_HOME"])
    first = [submit(env, "--wait", "--", "echo", "hello") for _ in range(2)]
    before = event_seqs(env)
    (home / "mnp.db").unlink()
    ledger.fault("state database deleted under the controller")
    r = mnp("submit", "--", "true", env=env)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mnp.db was deleted" in lines[0], r.stderr
    assert "mnp controller stop" in lines[0]
    r = mnp("run", "--", "true", env=env)
    assert r.returncode == 3 and "was deleted" in r.stderr, r.stderr

    r = mnp("controller", "stop", env=env)
    assert r.returncode == 0, r.stderr
    r = mnp("controller", "start", env=env)
    assert r.returncode == 0, r.stderr
    later = submit(env, "--wait", "--", "echo", "again")
    assert int(later) > max(int(j) for j in first), (first, later)
    seqs = event_seqs(env)
    assert seqs[: len(before)] == before
    assert seqs == sorted(set(seqs)), seqs  # never backwards, never twice
    assert mnp("logs", later, env=env).stdout == "again\n"

    # replaced by another file (a copy of itself, even): the open file is not mnp.db
    db = home / "mnp.db"
    copy = home / "copy.db"
    copy.write_bytes(db.read_bytes())
    copy.replace(db)
    ledger.fault("state database replaced under the controller")
    r = mnp("submit", "--", "true", env=env)
    assert r.returncode == 3 and "was replaced by another file" in r.stderr, r.stderr
    ledger.jobs(accepted=3, lost=0)


# --- 8. a client that does not read ------------------------------------------------


WRITE_100MB = (
    "import sys\n"
    "block = ('x' * 999 + '\\n') * 1000\n"
    "for _ in range(100):\n"
    "    sys.stdout.write(block)\n"
)


def test_a_run_client_that_stops_reading_costs_the_controller_bounded_memory(
    start_daemon: Daemon, ledger: Ledger
) -> None:
    """`mnp run ... | less`, unscrolled: the client reads nothing while its task writes
    100 MB. The controller keeps a bounded buffer for it (its RSS grows by far less than
    the output), the log on disk gets every byte, and when the client reads again it
    gets a note saying how much it missed, then the job's end."""
    from mnp.api import ApiClient
    from mnp.spec import definition_from_command, definition_to_dict

    env = start_daemon("local")
    home = Path(env["MNP_HOME"])
    ctl = psutil.Process(controller_pid(env))
    submit(env, "--wait", "--", "true")  # warm: agents up, first job's costs paid
    rss0 = ctl.memory_info().rss
    defn = definition_from_command(["python3", "-c", WRITE_100MB])
    client = ApiClient.connect(home)
    assert client is not None
    with client:
        client.send("run", definition=definition_to_dict(defn), source="test")
        ledger.fault("mnp run client stops reading")
        peak = rss0
        log: Path | None = None

        def written() -> bool:
            nonlocal peak, log
            peak = max(peak, ctl.memory_info().rss)
            if log is None:
                found = sorted(home.glob("logs/*/*.out"))
                log = found[-1] if found and found[-1].parent.name != "1" else None
            return log is not None and log.stat().st_size == 100_000_000

        wait_until("the task's 100 MB in its log", written, 120, every=0.05)
        assert log is not None
        job = log.parent.name
        wait_until("the job to end", lambda: ended(env, job), 30)
        peak = max(peak, ctl.memory_info().rss)
        growth = (peak - rss0) / 1e6
        print(f"controller RSS grew {growth:.1f} MB for 100 MB of output nobody read")
        # now read: what was kept, the note, the end
        msgs = []
        while True:
            msg = client.receive()
            msgs.append(msg)
            if msg.get("end"):
                break
    assert growth < 40, growth
    notes = [m["out"] for m in msgs if m.get("tid") == "mnp"]
    assert notes and "not shown here" in notes[0] and f"mnp logs {job}" in notes[0], notes
    assert msgs[-1]["state"] == "SUCCEEDED" and msgs[-1]["exit_code"] == 0, msgs[-1]
    shown = sum(len(m["out"]) for m in msgs if "out" in m and m.get("tid") != "mnp")
    assert 0 < shown < 100_000_000
    ledger.jobs(accepted=1, lost=0)


# --- 9. a task's daemon that sheds its session and its tags -----------------------


def with_mark(mark: str) -> list[psutil.Process]:
    """Live processes whose command line has ``mark`` (they carry no tag to find)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if mark in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.mark.parametrize("hosts", ["local", pytest.param("ssh", marks=pytest.mark.ssh)])
def test_untagged_daemon_of_a_task_dies_before_its_job_is_succeeded(
    hosts: str, start_daemon: Daemon, ledger: Ledger
) -> None:
    """A task runs `env -i setsid sh -c 'sleep N' &` and exits 0: the daemon has left
    the task's session and cleared its environment (no MNP_JOB_ID, no token). It comes
    back to the agent, the subreaper, when the task's shell exits and is attributed to
    that task; the job is SUCCEEDED only once it is dead and reaped. Once with the
    daemon's output inherited, once redirected to /dev/null."""
    env = start_daemon(hosts)
    for redirect in ("", " >/dev/null 2>&1"):
        secs = f"1000.{uuid.uuid4().int % 10**9}"
        script = f"env -i setsid sh -c 'sleep {secs}'{redirect} & echo started"
        r = mnp("submit", "--wait", "--", "sh", "-c", script, env=env)
        ledger.fault("untagged daemon left by a task")
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip()
        assert describe(env, job)["state"] == "SUCCEEDED"
        ledger.jobs(accepted=1, lost=0)
        found = with_mark(secs)  # at once: SUCCEEDED is recorded after it was reaped
        ledger.orphans_found(len(found))
        assert found == [], [(p.pid, p.info["cmdline"]) for p in found]
