"""The node agent against real processes: tearing tasks down (escaped daemons, kill,
sweep, zombies) and the agent's own lifetime (stdin EOF, signals, parent death)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.integration.test_agent_driver import (
    CTL,
    DAEMONIZE,
    PY,
    REPO,
    Agent,
    agent_env,
    tagged,
    wait_until,
    zombie_children,
)

# ---------------------------------------------------------------- teardown


def test_daemon_that_escapes_is_killed_after_exit(agent: Agent) -> None:
    agent.send(op="spawn", tid="d1", argv=[PY, "-c", DAEMONIZE])
    exited = agent.expect("exited", "d1")
    assert exited["code"] == 0
    gone = agent.expect("gone", "d1", timeout=5)
    assert gone["killed"] == 1  # the setsid'd sleep
    assert tagged(lambda t: t == "d1") == []
    assert wait_until(lambda: zombie_children(agent.proc.pid) == [], 2)


def test_leftover_in_session_is_killed_after_exit(agent: Agent) -> None:
    t0 = time.monotonic()
    agent.send(op="spawn", tid="bg", argv=["sh", "-c", "sleep 1000 & echo started"])
    assert agent.expect("exited", "bg")["code"] == 0
    assert agent.expect("gone", "bg")["killed"] == 1
    assert time.monotonic() - t0 < 1.0  # sleep dies at SIGTERM, long before the grace
    assert tagged(lambda t: t == "bg") == []


def test_kill_with_grace_escalates_to_sigkill(agent: Agent) -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    agent.send(op="spawn", tid="k", argv=["sh", "-c", script])
    agent.expect("out", "k")  # the trap is set
    t0 = time.monotonic()
    agent.send(op="kill", tid="k", grace=0.5)
    exited = agent.expect("exited", "k", timeout=5)
    waited = time.monotonic() - t0
    assert exited["signal"] == signal.SIGKILL
    assert 0.45 <= waited < 2.0
    gone = agent.expect("gone", "k")
    assert gone["killed"] >= 1
    assert tagged(lambda t: t == "k") == []
    # kill is idempotent, and a task has one `gone`: a late kill gets no second one
    agent.send(op="kill", tid="k", grace=0)
    agent.send(op="ping", id="after")
    agent.expect("pong")
    assert [e for e in agent.history if e["ev"] == "gone" and e["tid"] == "k"] == [gone]


def test_kill_wakes_stopped_tasks(agent: Agent) -> None:
    agent.send(op="spawn", tid="st", argv=["sleep", "100"])
    agent.expect("started", "st")
    agent.send(op="signal", tid="st", sig=signal.SIGSTOP)
    time.sleep(0.1)
    t0 = time.monotonic()
    agent.send(op="kill", tid="st", grace=5)
    assert agent.expect("exited", "st")["signal"] == signal.SIGTERM  # SIGCONT followed it
    assert time.monotonic() - t0 < 2
    agent.expect("gone", "st")


def test_kill_reaches_escaped_daemons(agent: Agent) -> None:
    script = DAEMONIZE.replace(
        'print("parent done", flush=True)', 'print("parent done", flush=True); time.sleep(1000)'
    )
    agent.send(op="spawn", tid="kd", argv=[PY, "-c", script])
    agent.expect("out", "kd")
    assert wait_until(lambda: len(tagged(lambda t: t == "kd")) == 2, 5)
    agent.send(op="kill", tid="kd", grace=2)
    assert agent.expect("exited", "kd")["signal"] == signal.SIGTERM
    gone = agent.expect("gone", "kd", timeout=5)
    assert gone["killed"] == 2
    assert tagged(lambda t: t == "kd") == []


def test_kill_does_not_touch_other_tags(agent: Agent) -> None:
    env = dict(agent_env(), MNP_JOB_ID="kx", MNP_CONTROLLER_ID="someone-else")
    other = subprocess.Popen(["sleep", "100"], env=env)
    try:
        agent.send(op="kill", tid="kx", grace=0)
        agent.send(op="ping", id="after")
        agent.expect("pong")
        assert not any(e["ev"] == "gone" for e in agent.history)  # nothing of ours to kill
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def _tagged_sleeper(tid: str, ctl: str = CTL, trap: bool = False) -> subprocess.Popen[bytes]:
    """A process started outside the agent (as mpiexec's ranks would be), carrying tags."""
    script = ("trap '' TERM; " if trap else "") + "sleep 100 & wait"
    return subprocess.Popen(
        ["sh", "-c", script] if trap else ["sleep", "100"],
        start_new_session=True,
        env=dict(agent_env(), MNP_JOB_ID=tid, MNP_CONTROLLER_ID=ctl),
    )


def test_kill_of_a_tid_without_task_sweeps_its_tag(agent: Agent) -> None:
    stray = _tagged_sleeper("55")
    try:
        assert wait_until(lambda: len(tagged(lambda t: t == "55")) == 1, 5)
        agent.send(op="kill", tid="55", grace=1)
        assert agent.expect("gone", "55")["killed"] == 1
        assert stray.wait(5) == -signal.SIGTERM
    finally:
        stray.kill()
        stray.wait()


def test_retry_with_the_same_tid_after_a_late_kill(agent: Agent) -> None:
    """What a controller does when an attempt fails: `kill` as soon as it sees `exited`
    (the `gone` may already be on its way), then spawn the next attempt, same tid."""
    agent.send(op="spawn", tid="r", argv=["sh", "-c", "exit 3"])
    assert agent.expect("exited", "r")["code"] == 3
    agent.send(op="kill", tid="r", grace=1)
    agent.expect("gone", "r")
    agent.send(op="spawn", tid="r", argv=["sh", "-c", "echo second"])
    assert agent.expect("exited", "r")["code"] == 0
    agent.expect("gone", "r")
    agent.send(op="ping", id="end")
    agent.expect("pong")
    assert [e["ev"] for e in agent.history if e.get("tid") == "r"] == [
        "started",
        "exited",
        "gone",
        "started",
        "out",
        "exited",
        "gone",
    ]


def test_respawn_ends_a_tag_sweep_of_the_same_tid(agent: Agent) -> None:
    stray = _tagged_sleeper("rs", trap=True)  # ignores SIGTERM: the sweep waits its grace
    try:
        assert wait_until(lambda: len(tagged(lambda t: t == "rs")) == 2, 5)
        agent.send(op="kill", tid="rs", grace=30)
        time.sleep(0.3)
        assert stray.poll() is None
        agent.send(op="spawn", tid="rs", argv=["sh", "-c", "sleep 0.3; echo new"])
        # the old run's leftovers die at once, not after the 30 s grace; sh itself may
        # exit 0 when its sleep is killed first (a bare `wait` returns 0)
        assert stray.wait(5) in (0, -signal.SIGKILL)
        assert agent.expect("exited", "rs")["code"] == 0
        assert agent.output("rs") == "new\n"
        assert [e["ev"] for e in agent.history if e.get("tid") == "rs"] == [
            "started",
            "out",
            "exited",
            "gone",
        ]
        assert tagged(lambda t: t == "rs") == []
    finally:
        stray.kill()
        stray.wait()


def test_sweep_by_job_part(agent: Agent) -> None:
    procs = {tid: _tagged_sleeper(tid) for tid in ("42#1", "42.3", "42:5", "43", "420")}
    foreign = _tagged_sleeper("42#2", ctl="other")
    agent.send(op="spawn", tid="42#0", argv=["sleep", "100"])
    agent.send(op="spawn", tid="44", argv=["sleep", "100"])
    agent.expect("started", "42#0")
    agent.expect("started", "44")
    try:
        assert wait_until(lambda: len(tagged(lambda t: t.startswith("42"))) == 5, 5)
        agent.send(op="sweep", job="42", grace=1)
        swept = agent.expect("swept", timeout=5)
        assert swept["job"] == "42" and swept["killed"] == 4
        assert agent.expect("exited", "42#0")["signal"] == signal.SIGTERM
        agent.expect("gone", "42#0")
        for tid in ("42#1", "42.3", "42:5"):
            assert procs[tid].wait(5) == -signal.SIGTERM
        assert procs["43"].poll() is None and procs["420"].poll() is None
        assert foreign.poll() is None
        assert len(tagged(lambda t: t == "44")) == 1
    finally:
        for p in [*procs.values(), foreign]:
            p.kill()
            p.wait()


def _events_of(agent: Agent, tid: str) -> list[str]:
    return [e["ev"] for e in agent.history if e.get("tid") == tid and e["ev"] != "out"]


@pytest.mark.parametrize("order", ["kill first", "sweep first"])
def test_kill_and_sweep_of_one_job_give_each_task_one_gone(agent: Agent, order: str) -> None:
    """A sweep ends the agent's own tasks of the job as a kill would; sent together (a
    controller may kill a task and sweep its job), each task still has one `exited`, then
    one `gone`, and each process gets one SIGTERM."""
    script = "trap 'echo TERM; exit 0' TERM; echo up; while :; do sleep 0.05; done"
    tids = ("70#0", "70#1", "70#2")
    for tid in tids:
        agent.send(op="spawn", tid=tid, argv=["sh", "-c", script])
    for tid in tids:
        agent.expect("out", tid, data="up\n")
    kills = [dict(op="kill", tid=tid, grace=5) for tid in tids[:2]]
    sweep = dict(op="sweep", job="70", grace=5)
    ops = [*kills, sweep] if order == "kill first" else [sweep, *kills]
    agent.send_raw(b"".join(json.dumps(m).encode() + b"\n" for m in ops))
    agent.expect("swept", timeout=5)
    for tid in tids:
        agent.expect("gone", tid, timeout=5)
    agent.send(op="kill", tid="70#2", grace=0)  # late: the task is gone, nothing to say
    agent.send(op="ping", id="end")
    agent.expect("pong")
    for tid in tids:
        assert _events_of(agent, tid) == ["started", "exited", "gone"], tid
        assert agent.output(tid) == "up\nTERM\n"  # one SIGTERM: the trap ran once
    assert tagged(lambda t: t.startswith("70#")) == []


def test_sweep_ends_leftovers_of_its_tasks_within_its_grace() -> None:
    """A task's own leftovers that no tag names (env -i) are ended with the sweep's grace,
    not the agent's."""
    a = Agent("--grace", "60")
    try:
        inner = "trap '' TERM; echo in; while :; do sleep 0.05; done"
        script = f'env -i sh -c "{inner}" & wait'
        a.send(op="spawn", tid="71#0", argv=["sh", "-c", script])
        a.expect("out", "71#0")
        t0 = time.monotonic()
        a.send(op="sweep", job="71", grace=0.2)
        assert a.expect("exited", "71#0", timeout=10)["signal"] == signal.SIGTERM
        gone = a.expect("gone", "71#0", timeout=30)
        assert time.monotonic() - t0 < 30  # not the agent's 60 s
        assert gone["killed"] >= 1
        a.expect("swept")
    finally:
        a.close()


def test_no_zombies_accumulate(agent: Agent) -> None:
    # each task leaves an orphan that exits on its own shortly after
    script = "(sleep 0.1; exit 0) & exit 0"
    for i in range(20):
        agent.send(op="spawn", tid=f"z{i}", argv=["sh", "-c", script])
    for i in range(20):
        agent.expect("gone", f"z{i}")
    orphan_script = "import os\nif os.fork() == 0:\n    os.setsid(); import time; time.sleep(0.2)"
    agent.run("z-orphan", [PY, "-c", orphan_script])
    time.sleep(0.5)
    assert zombie_children(agent.proc.pid) == []


# ---------------------------------------------------------------- lifetime


def _spawn_sleepers(a: Agent, n: int) -> list[int]:
    script = "trap '' TERM; echo up; while :; do sleep 0.05; done"
    for i in range(n):
        a.send(op="spawn", tid=f"life{i}", argv=["sh", "-c", script])
    pids = []
    for i in range(n):
        pids.append(a.expect("started", f"life{i}")["pid"])
        a.expect("out", f"life{i}")
    return pids


def test_stdin_eof_kills_everything_within_grace() -> None:
    a = Agent("--grace", "0.5")
    _spawn_sleepers(a, 3)
    a.send(op="spawn", tid="daemon", argv=[PY, "-c", DAEMONIZE + "\ntime.sleep(1000)"])
    a.expect("out", "daemon")
    assert wait_until(lambda: len(tagged(lambda t: t == "daemon")) == 2, 5)
    t0 = time.monotonic()
    assert a.proc.stdin is not None
    a.proc.stdin.close()
    assert a.proc.wait(0.5 + 1) == 0
    assert time.monotonic() - t0 < 1.5
    assert tagged(lambda t: t.startswith("life") or t == "daemon") == []
    a.close()


def test_orphans_without_session_or_tags_die_with_their_task() -> None:
    """A daemon that left the session and dropped its environment carries nothing of its
    task; orphaned, it comes back to the agent (the subreaper), which attributes it to
    the task (here: by the output pipes it inherited) and kills it before `gone`."""
    script = DAEMONIZE.replace(
        '"sleep", ["sleep", "1000"]', '"env", ["env", "-i", "sleep", "1001"]'
    )
    a = Agent("--grace", "0.5")
    a.send(op="spawn", tid="u", argv=[PY, "-c", script])
    assert a.expect("gone", "u")["killed"] >= 1

    def sleepers() -> list[psutil.Process]:
        out = []
        for p in psutil.Process(a.proc.pid).children():
            try:
                if p.cmdline() == ["sleep", "1001"] and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    assert sleepers() == []
    assert a.close() == 0


def test_sigterm_kills_everything() -> None:
    a = Agent("--grace", "0.3")
    _spawn_sleepers(a, 2)
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(3) == 0
    assert tagged(lambda t: t.startswith("life")) == []
    a.close()


def test_shutdown_op_reports_and_exits() -> None:
    a = Agent()
    pids = _spawn_sleepers(a, 2)
    a.send(op="shutdown", grace=0.2)
    for i in range(2):
        assert a.expect("exited", f"life{i}")["signal"] == signal.SIGKILL
        assert a.expect("gone", f"life{i}")["killed"] >= 1
    assert a.close() == 0
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("parent_death", [True, False])
def test_parent_death_terminates_the_agent(parent_death: bool) -> None:
    """A local agent started with --parent-death dies with its parent even though its
    stdin stays open (the test holds the write end); without it, it lives on."""
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    argv = [PY, "-m", "mnp.agent", "--ctl", CTL, "--grace", "0.2"]
    if parent_death:
        argv.append("--parent-death")
    middle_code = (
        "import subprocess, time\n"
        f"p = subprocess.Popen({argv!r}, stdin={stdin_r}, stdout={out_w}, cwd={str(REPO)!r})\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(1000)\n"
    )
    middle = subprocess.Popen(
        [PY, "-c", middle_code], stdout=subprocess.PIPE, pass_fds=(stdin_r, out_w), env=agent_env()
    )
    os.close(stdin_r)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as events, os.fdopen(stdin_w, "wb") as commands:
        try:
            assert middle.stdout is not None
            agent_pid = int(middle.stdout.readline())
            assert json.loads(events.readline())["ev"] == "ready"
            commands.write(b'{"op":"spawn","tid":"pd","argv":["sleep","100"]}\n')
            commands.flush()
            assert json.loads(events.readline())["ev"] == "started"
            middle.kill()
            middle.wait()
            if parent_death:
                # the agent tears down and exits: its stdout reaches EOF
                while events.readline():
                    pass
                assert wait_until(lambda: _dead(agent_pid), 5)
                assert tagged(lambda t: t == "pd") == []
            else:
                time.sleep(0.5)
                assert not _dead(agent_pid)
                os.kill(agent_pid, signal.SIGTERM)
                assert wait_until(lambda: _dead(agent_pid), 5)
                assert tagged(lambda t: t == "pd") == []
        finally:
            if middle.stdout is not None:
                middle.stdout.close()


def test_agent_killed_with_sigkill_leaves_tasks_for_a_sweep() -> None:
    """SIGKILL gives the agent no chance to clean up: its tasks survive (in their own
    sessions). The controller can still sweep them by job."""
    a = Agent()
    a.send(op="spawn", tid="77#0", argv=["sleep", "100"])
    pid = a.expect("started", "77#0")["pid"]
    a.proc.kill()
    a.close()
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    b = Agent()
    try:
        b.send(op="sweep", job="77", grace=1)
        assert b.expect("swept")["killed"] == 1
        assert tagged(lambda t: t == "77#0") == []
    finally:
        b.close()


def test_new_agent_sweeps_what_a_killed_agent_and_over_jobs_left() -> None:
    """`stale` (sent by the controller before anything else): the tasks of a SIGKILLed
    agent die even when their job is still live (it was given up on this host), and so
    do tagged processes of jobs that are over; a live agent's tasks, jobs still running
    elsewhere, jobs newer than the list, and other controllers' processes are left."""
    dead, alive = Agent(), Agent()
    strays: dict[str, subprocess.Popen[bytes]] = {}
    try:
        dead.send(op="spawn", tid="77#0", argv=["sh", "-c", "sleep 100 & sleep 100; :"])
        alive.send(op="spawn", tid="78", argv=["sleep", "100"])
        lost = dead.expect("started", "77#0")["pid"]
        kept = alive.expect("started", "78")["pid"]
        # started outside any agent here, as mpiexec's ranks are: judged by their job
        strays = {tid: _tagged_sleeper(tid) for tid in ("60", "61:3", "150")}
        strays["foreign"] = _tagged_sleeper("60", ctl="other")
        assert wait_until(lambda: len(tagged(lambda t: t in ("77#0", "60", "61:3"))) == 5, 5)
        dead.proc.kill()
        dead.close()
        assert psutil.Process(lost).status() != psutil.STATUS_ZOMBIE
        b = Agent()
        try:
            b.send(op="stale", live=["61", "77", "78"], below=100, grace=1)
            assert b.expect("stale", timeout=5)["killed"] == 4  # sh and its two sleeps, 60
            assert tagged(lambda t: t == "77#0") == []
            assert strays["60"].wait(5) == -signal.SIGTERM
            assert strays["61:3"].poll() is None  # its job runs on
            assert strays["150"].poll() is None  # newer than the list
            assert strays["foreign"].poll() is None  # another controller's
            assert psutil.Process(kept).status() != psutil.STATUS_ZOMBIE
            # its own tasks carry its identity: a second `stale` leaves them alone
            b.send(op="spawn", tid="77#0", argv=["sleep", "100"])
            mine = b.expect("started", "77#0")["pid"]
            b.send(op="stale", live=["77"], below=100, grace=1)
            assert b.expect("stale", timeout=5)["killed"] == 2  # 61:3, and 78 (over now)
            assert psutil.Process(mine).status() != psutil.STATUS_ZOMBIE
            assert alive.expect("exited", "78")["signal"] == signal.SIGTERM
            b.send(op="stale", live=[], below="x")
            assert "below" in b.expect("error")["msg"]
        finally:
            b.close()
    finally:
        alive.close()
        for p in strays.values():
            p.kill()
            p.wait()


def test_stale_never_kills_what_this_agent_spawned_before_or_after_it() -> None:
    """A `stale` whose list is older than the agent's tasks (the controller restores its
    jobs after it connects; a spawn arrives while the sweep still scans) leaves the
    agent's own tasks alone, whatever `live` says -- also one that ignores SIGTERM and
    runs while the sweep is still waiting out its grace for a real leftover."""
    dead = Agent()
    b = Agent()
    try:
        dead.send(op="spawn", tid="5", argv=["sh", "-c", "trap '' TERM; sleep 100"])
        dead.expect("started", "5")
        dead.proc.kill()  # its task is left, carrying the job id the retry will carry
        dead.close()
        b.send(op="spawn", tid="4", argv=["sh", "-c", "trap '' TERM; sleep 100"])
        before = b.expect("started", "4")["pid"]
        b.send(op="stale", live=[], below=100, grace=1)
        b.send(op="spawn", tid="5", argv=["sleep", "100"])  # the retry, mid-sweep
        after = b.expect("started", "5")["pid"]
        assert b.expect("stale", timeout=5)["killed"] >= 1  # the dead agent's task
        time.sleep(0.3)
        for pid in (before, after):
            assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert [e for e in b.history if e.get("ev") == "exited"] == []
    finally:
        b.close()


def test_an_ending_agent_leaves_alone_the_retry_a_new_agent_started() -> None:
    """The controller died: its agent tears its tasks down within its grace, by their
    tags too. A restarted controller's new agent on the same machine starts the retry
    meanwhile, with the same tid (the same tag): the old agent's teardown must not take
    it for its own (found in CI: the retry SIGKILLed when the old agent's grace ran out)."""
    old = Agent("--grace", "1")
    new = Agent()
    try:
        old.send(op="spawn", tid="204", argv=["sh", "-c", "trap '' TERM; sleep 100"])
        lost = old.expect("started", "204")["pid"]
        assert old.proc.stdin is not None
        old.proc.stdin.close()  # the controller is gone: the agent ends what it started
        new.send(op="spawn", tid="204", argv=["sh", "-c", "trap '' TERM; sleep 100"])
        retry = new.expect("started", "204")["pid"]
        assert old.proc.wait(5) == 0  # after its grace: the lost attempt SIGKILLed
        assert _dead(lost)
        time.sleep(0.2)
        assert psutil.Process(retry).status() != psutil.STATUS_ZOMBIE
        assert [e for e in new.history if e.get("ev") == "exited"] == []
    finally:
        old.close()
        new.close()


def _sleepers(mark: str) -> list[psutil.Process]:
    """Live processes whose command line has `mark` (it has no tag to find it by)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and mark in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.mark.parametrize(
    "redirect", ["", " >/dev/null 2>&1"], ids=["output-inherited", "output-redirected"]
)
def test_untagged_daemon_that_left_the_session_dies_with_its_task(
    agent: Agent, redirect: str
) -> None:
    """`env -i setsid sh -c 'sleep N' &`: the daemon has neither the task's session nor
    its tag. It comes back to the agent (the subreaper) as an orphan when the task's main
    process exits, and is attributed to that task (its output pipes, or the exit that
    orphaned it): the task's `gone` comes only once it is dead."""
    secs = f"1000.{os.getpid()}{len(redirect)}"  # a command line nobody else has
    script = f"env -i setsid sh -c 'sleep {secs}'{redirect} & sleep 0.3; echo started"
    agent.send(op="spawn", tid="u1", argv=["sh", "-c", script])
    assert agent.expect("exited", "u1", timeout=10)["code"] == 0
    assert agent.expect("gone", "u1", timeout=10)["killed"] >= 1
    assert _sleepers(secs) == []


def test_an_orphan_of_a_running_task_is_not_killed_when_another_task_ends(
    agent: Agent,
) -> None:
    """A task that is still running keeps its untagged daemons; only its own end kills
    them (another task ending meanwhile does not take them)."""
    secs = f"1001.{os.getpid()}"
    keeper = f"(env -i setsid sleep {secs} >/dev/null 2>&1 &); echo up; sleep 100"
    agent.send(op="spawn", tid="run1", argv=["sh", "-c", keeper])
    agent.expect("out", "run1")

    def daemon() -> list[psutil.Process]:
        return [p for p in _sleepers(secs) if p.info["cmdline"][0] == "sleep"]

    assert wait_until(lambda: len(daemon()) == 1, 5)
    time.sleep(1.5)  # the agent's poll finds the orphan while run1 runs
    agent.send(op="spawn", tid="other", argv=["sh", "-c", "sleep 0.2"])
    assert agent.expect("gone", "other", timeout=10)["killed"] == 0
    time.sleep(0.5)
    assert len(daemon()) == 1  # still there: run1 runs on
    agent.send(op="kill", tid="run1", grace=1)
    agent.expect("gone", "run1", timeout=10)
    assert _sleepers(secs) == []
