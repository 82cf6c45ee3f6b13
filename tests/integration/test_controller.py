"""The controller's job model (SPEC §6) driven directly, on local agents."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mnp.controller import Controller, ipv4_literal
from mnp.errors import JobRefused
from mnp.jobs import TIMEOUT_REASON, Job
from mnp.model import JobState
from mnp.spec import definition_from_command, definition_to_dict, local_inventory, parse_definition
from mnp.transport.local import LocalTransport


@pytest.fixture
async def ctl() -> AsyncIterator[Controller]:
    c = Controller(local_inventory(2), {"local": LocalTransport()})
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def cmd(*argv: str, **overrides: object) -> object:
    return definition_from_command(list(argv), **overrides)


async def done(c: Controller, job: Job) -> Job:
    return await asyncio.wait_for(c.wait(job), 30)


async def test_failed_dependency_fails_the_dependent(ctl: Controller) -> None:
    a = ctl.submit(cmd("sh", "-c", "exit 1"))
    b = ctl.submit(cmd("true", depends_on=[a.id]))
    await done(ctl, b)
    assert a.state is JobState.FAILED
    assert (b.state, b.reason) == (JobState.FAILED, f"Dependent job {a.id} failed")
    assert b.attempts == []


async def test_afterany_runs_after_a_failure(ctl: Controller) -> None:
    a = ctl.submit(cmd("sh", "-c", "sleep 0.2; exit 1"))
    b = ctl.submit(cmd("true", depends_on=[f"{a.id}:afterany"]))
    await done(ctl, b)
    assert b.state is JobState.SUCCEEDED
    assert a.stopped_at is not None and b.started_at is not None
    assert b.started_at >= a.stopped_at


async def test_plain_dependency_waits_for_success(ctl: Controller) -> None:
    a = ctl.submit(cmd("sleep", "0.3"))
    b = ctl.submit(cmd("true", depends_on=[a.id]))
    assert b.state is JobState.PENDING
    await done(ctl, b)
    assert b.state is JobState.SUCCEEDED
    assert a.stopped_at is not None and b.started_at is not None
    assert b.started_at >= a.stopped_at


async def test_unknown_dependency_is_refused(ctl: Controller) -> None:
    with pytest.raises(JobRefused, match="does not exist"):
        ctl.submit(cmd("true", depends_on=["999"]))


async def test_dependencies_by_name_take_the_newest_job_of_that_name(ctl: Controller) -> None:
    old = ctl.submit(cmd("true", name="prep"))
    await done(ctl, old)
    new = ctl.submit(cmd("sleep", "0.3", name="prep"))
    arr = ctl.submit(cmd("true", name="arr", array_size=2))
    b = ctl.submit(cmd("true", array_size=2, depends_on=["prep", "arr:N_TO_N"]))
    assert [(d.job_id, d.type) for d in b.defn.depends_on] == [
        (new.id, None),
        (arr.id, "N_TO_N"),
    ]  # the definition keeps the ids: a later "prep" changes nothing
    assert b.state is JobState.PENDING  # waits for the newest "prep", not the finished one
    c = ctl.submit(cmd("true", depends_on=["prep:afterany", "arr:1"]))
    assert [d.job_id for d in c.defn.depends_on] == [new.id, f"{arr.id}:1"]
    assert (ctl.resolve(old.id), ctl.resolve("arr:1"), ctl.resolve("arr:2")) == (
        old.id,
        f"{arr.id}:1",
        None,  # no such child
    )
    await done(ctl, b)
    assert b.state is JobState.SUCCEEDED


async def test_unknown_or_twice_named_dependency_is_refused(ctl: Controller) -> None:
    with pytest.raises(JobRefused, match=r"^depends_on: job nosuch does not exist$"):
        ctl.submit(cmd("true", depends_on=["nosuch"]))
    a = ctl.submit(cmd("true", name="once"))
    with pytest.raises(JobRefused, match=f"^depends_on: once and {a.id} are both job {a.id}"):
        ctl.submit(cmd("true", depends_on=[a.id, "once"]))


async def test_cancel_and_terminate_by_name(ctl: Controller) -> None:
    first = ctl.submit(cmd("sleep", "30", name="long"))
    second = ctl.submit(cmd("sleep", "30", name="long", depends_on=[first.id]))
    assert ctl.resolve("long") == second.id
    assert ctl.cancel("long", "by name") is second and second.state is JobState.FAILED
    assert ctl.resolve("long") == second.id  # still the newest, finished or not
    assert ctl.terminate(first.id, "by id") is first
    await done(ctl, first)
    with pytest.raises(JobRefused, match="job nosuch does not exist"):
        ctl.cancel("nosuch", "x")


async def test_host_loads_asks_agents_that_serve_it(ctl: Controller) -> None:
    loads = await ctl.host_loads()
    assert sorted(loads) == ["local-0", "local-1"]
    assert all(len(ev["load"]) == 3 and ev["memory_used"] > 0 for ev in loads.values())
    again = await ctl.host_loads()  # a sample younger than LOAD_FRESH is reused
    assert again["local-0"] is loads["local-0"]
    del ctl.agents["local-1"].facts["ops"]  # an older agent: no `load` op
    ctl.hosts.loads.clear()
    assert sorted(await ctl.host_loads()) == ["local-0"]


async def test_aws_main_node_address_is_ipv4(ctl: Controller, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = (
        f'echo "$AWS_BATCH_JOB_NODE_INDEX ${{AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS-unset}} '
        f'$MNP_MAIN_NODE_ADDR" >> {out}; sleep 0.5'
    )
    raw = definition_to_dict(cmd("sh", "-c", script, nodes=2))  # type: ignore[arg-type]
    defn = parse_definition({**raw, "aws_batch_env": True}, "aws.toml")
    job = await done(ctl, ctl.submit(defn))
    assert job.state is JobState.SUCCEEDED, job.reason
    # local nodes' address is localhost; MNP_MAIN_NODE_ADDR keeps it as written
    assert sorted(out.read_text().splitlines()) == ["0 unset localhost", "1 127.0.0.1 localhost"]


async def test_ipv4_of_resolves_names_and_falls_back(
    ctl: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ipv4_literal("10.0.0.1") == "10.0.0.1" and ipv4_literal("node01") is None
    assert ipv4_literal("::1") is None
    assert await ctl.launcher.ipv4_of("192.168.1.20") == "192.168.1.20"
    assert await ctl.launcher.ipv4_of("localhost") == "127.0.0.1"

    async def fails(*args: object, **kw: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fails)
    assert await ctl.launcher.ipv4_of("no-such-host.invalid") is None
    assert await ctl.launcher.ipv4_of("localhost") == "127.0.0.1"  # remembered


async def test_n_to_n_child_waits_for_its_own_counterpart(ctl: Controller, tmp_path: Path) -> None:
    log = tmp_path / "log"
    # A:i sleeps longer for smaller i, so A ends in reverse order
    a = ctl.submit(
        cmd(
            "sh",
            "-c",
            f"sleep $((3 - $MNP_ARRAY_INDEX))e-1; echo A $MNP_ARRAY_INDEX >> {log}",
            array_size=3,
        )
    )
    b = ctl.submit(
        cmd(
            "sh",
            "-c",
            f"echo B $MNP_ARRAY_INDEX >> {log}",
            array_size=3,
            depends_on=[f"{a.id}:N_TO_N"],
        )
    )
    await done(ctl, b)
    assert b.state is JobState.SUCCEEDED
    order = log.read_text().split("\n")
    for i in range(3):
        assert order.index(f"A {i}") < order.index(f"B {i}")
    for i in range(3):
        assert a.children[i].stopped_at <= b.children[i].started_at  # type: ignore[operator]
    # B:2 needed only A:2 (the first to end), not the whole of A
    assert b.children[2].started_at < a.children[0].stopped_at  # type: ignore[operator]


async def test_n_to_n_needs_arrays_of_the_same_size(ctl: Controller) -> None:
    a = ctl.submit(cmd("true", array_size=2))
    with pytest.raises(JobRefused, match="same size"):
        ctl.submit(cmd("true", array_size=3, depends_on=[f"{a.id}:N_TO_N"]))


async def test_sequential_children_run_in_index_order(ctl: Controller, tmp_path: Path) -> None:
    log = tmp_path / "log"
    job = ctl.submit(
        cmd(
            "sh",
            "-c",
            f"sleep 0.$((4 - $MNP_ARRAY_INDEX)); echo $MNP_ARRAY_INDEX >> {log}",
            array_size=4,
            sequential=True,
        )
    )
    await done(ctl, job)
    assert job.state is JobState.SUCCEEDED
    assert log.read_text().split() == ["0", "1", "2", "3"]


async def test_sequential_failure_fails_the_rest(ctl: Controller) -> None:
    job = ctl.submit(cmd("sh", "-c", 'test "$MNP_ARRAY_INDEX" != 1', array_size=4, sequential=True))
    await done(ctl, job)
    states = [c.state for c in job.children]
    assert states == [JobState.SUCCEEDED, JobState.FAILED, JobState.FAILED, JobState.FAILED]
    assert job.children[2].reason == f"Dependent job {job.id}:1 failed"
    assert job.children[2].attempts == []


async def test_three_attempts(ctl: Controller) -> None:
    job = ctl.submit(cmd("sh", "-c", "exit 1", attempts=3))
    await done(ctl, job)
    assert job.state is JobState.FAILED
    assert [a.exit_code for a in job.attempts] == [1, 1, 1]


async def test_timeout_is_not_retried(ctl: Controller) -> None:
    job = ctl.submit(cmd("sleep", "30", timeout="1s", attempts=3))
    await done(ctl, job)
    assert (job.state, job.reason) == (JobState.FAILED, TIMEOUT_REASON)
    assert len(job.attempts) == 1


async def test_cancel_fails_waiting_jobs_but_not_running_ones(ctl: Controller) -> None:
    running = ctl.submit(cmd("sleep", "0.5"))
    waiting = ctl.submit(cmd("true", depends_on=[running.id]))
    await asyncio.sleep(0.2)
    ctl.cancel(waiting.id, "not needed")
    ctl.cancel(running.id, "too late")
    await done(ctl, running)
    assert running.state is JobState.SUCCEEDED
    assert (waiting.state, waiting.reason) == (JobState.FAILED, "not needed")


async def test_terminate_cascades_to_array_children(ctl: Controller) -> None:
    job = ctl.submit(cmd("sleep", "30", array_size=6))
    await asyncio.sleep(0.5)
    ctl.terminate(job.id, "stop it")
    await done(ctl, job)
    assert job.state is JobState.FAILED
    assert all(c.state is JobState.FAILED and c.reason == "stop it" for c in job.children)


async def test_resource_misconfiguration_is_refused(ctl: Controller) -> None:
    with pytest.raises(JobRefused, match="MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"):
        ctl.submit(cmd("true", vcpus=1000))
    with pytest.raises(JobRefused, match="MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT"):
        ctl.submit(cmd("true", nodes=3))


async def test_events_have_increasing_seq_and_one_terminal_per_job(ctl: Controller) -> None:
    job = ctl.submit(cmd("true", array_size=3))
    await done(ctl, job)
    seqs = [e["seq"] for e in ctl.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    terminal = [e["job_id"] for e in ctl.events if e["status"] in ("SUCCEEDED", "FAILED")]
    assert sorted(terminal) == sorted([job.id] + [c.id for c in job.children])


async def test_big_multinode_job_is_not_starved_and_priority_wins() -> None:
    """16 hosts busy with 1-3 s tasks; a 16-node job, then a 2,000-child array: the big
    job starts within 1 s of the last first task ending; a higher-priority job first."""
    from mnp.spec import parse_inventory

    inventory = parse_inventory(
        {
            "hosts": [{"names": "n[01-16]", "transport": "local", "vcpus": 1}],
            "queues": {"low": {"priority": 1}, "high": {"priority": 10}},
        },
        "<test>",
    )
    c = Controller(inventory, {"local": LocalTransport()})
    await c.start()
    try:
        first = [c.submit(cmd("sleep", f"{1 + (i % 3)}", queue="low")) for i in range(16)]
        await asyncio.sleep(0.5)
        assert all(j.state is JobState.RUNNING for j in first)
        big = c.submit(cmd("true", nodes=16, queue="low"))
        small = c.submit(cmd("true", array_size=2000, queue="low"))
        urgent = c.submit(cmd("true", queue="high"))
        await done(c, big)
        last_first_end = max(j.stopped_at or 0 for j in first)
        assert big.started_at is not None
        assert big.started_at - last_first_end < 1.0
        # nothing of the array ran before the big job: it was not starved
        started = [ch.started_at for ch in small.children if ch.started_at is not None]
        assert all(t >= big.started_at for t in started)
        assert urgent.started_at is not None and urgent.started_at <= big.started_at
        await done(c, small)
        assert small.state is JobState.SUCCEEDED
    finally:
        await c.close()


async def test_a_task_that_cannot_start_fails_its_attempt_and_is_retried() -> None:
    """``on_task_start`` refusing (the daemon: its log file cannot be opened) fails the
    attempt with that reason, like any failure; here node 1 of a 2-node job, after node 0
    started, so node 0 is torn down too."""
    refused: list[str] = []

    def start(job: Job, task: object) -> str | None:
        tid = str(getattr(task, "tid", ""))
        if tid.endswith("#1"):
            refused.append(tid)
            return f"Cannot write logs: /logs/{tid}: Read-only file system"
        return None

    c = Controller(local_inventory(2), {"local": LocalTransport()}, on_task_start=start)
    await c.start()
    try:
        job = c.submit(cmd("sleep", "30", nodes=2, attempts=2))
        await done(c, job)
        assert (job.state, job.reason) == (
            JobState.FAILED,
            f"Cannot write logs: /logs/{job.id}#1: Read-only file system",
        )
        assert len(job.attempts) == 2 and len(refused) == 2
        assert all(n.state is JobState.FAILED for n in job.attempts[-1].nodes)
        after = c.submit(cmd("true"))  # the controller goes on
        assert (await done(c, after)).state is JobState.SUCCEEDED
    finally:
        await c.close()


async def test_a_note_follows_the_final_reason(ctl: Controller) -> None:
    ok = ctl.submit(cmd("true"))
    ctl.note(ok, "Output lost: /x: No space left on device")
    ctl.note(ok, "a second note is not kept")
    bad = ctl.submit(cmd("true", depends_on=[ok.id]))
    ctl.note(bad, "Output lost: /y: No space left on device")
    ctl.cancel(bad.id, "not needed")
    await done(ctl, ok)
    assert (ok.state, ok.reason) == (JobState.SUCCEEDED, "Output lost: /x: No space left on device")
    assert bad.reason == "not needed; Output lost: /y: No space left on device"


async def test_withdraw_forgets_a_job_that_was_just_submitted(ctl: Controller) -> None:
    first = ctl.submit(cmd("sleep", "0.3"))
    arr = ctl.submit(cmd("true", array_size=3, depends_on=[first.id]))
    ctl.withdraw(arr)
    assert arr.id not in ctl.jobs and f"{arr.id}:0" not in ctl.jobs
    await done(ctl, first)
    await asyncio.sleep(0.1)  # nothing of it was left to wake or to run
    assert all(c.attempts == [] for c in arr.children)


def _spy(c: Controller) -> list[tuple[str, str, list[str]]]:
    """Every write the controller makes to an agent: (host, "send" or "send_many", ops)."""
    writes: list[tuple[str, str, list[str]]] = []
    for host, conn in c.agents.items():
        send, send_many = conn.send, conn.send_many

        def one(msg: dict[str, Any], host: str = host, send: Any = send) -> None:
            writes.append((host, "send", [msg["op"]]))
            send(msg)

        def many(msgs: list[dict[str, Any]], host: str = host, send_many: Any = send_many) -> None:
            writes.append((host, "send_many", [m["op"] for m in msgs]))
            send_many(msgs)

        conn.send = one  # type: ignore[method-assign]
        conn.send_many = many  # type: ignore[method-assign]
    return writes


async def test_multinode_teardown_sends_each_host_one_sweep_and_no_kill(ctl: Controller) -> None:
    """The sweep ends the agent's own tasks of the job too: a host that gets one is sent
    no `kill` for them, and every task still reports its `gone`."""
    writes = _spy(ctl)
    job = ctl.submit(cmd("sleep", "100", nodes=2))
    for _ in range(200):
        if job.attempt is not None and job.attempt.running_at is not None:
            break
        await asyncio.sleep(0.05)
    assert job.attempt is not None and job.attempt.running_at is not None
    ctl.terminate(job.id, "stop it")
    await done(ctl, job)
    assert (job.state, job.reason) == (JobState.FAILED, "stop it")
    ends = sorted((h, op) for h, _, ops in writes for op in ops if op in ("kill", "sweep"))
    assert ends == [("local-0", "sweep"), ("local-1", "sweep")]
    tasks = list(job.attempts[-1].tasks.values())
    assert len(tasks) == 2 and all(t.gone and t.exited for t in tasks)


async def test_a_scheduling_pass_writes_each_host_once() -> None:
    """The spawns one pass places on a host go out in one write (one SSH packet)."""
    from mnp.spec import parse_inventory

    inventory = parse_inventory(
        {"hosts": [{"names": "n[1-2]", "transport": "local", "vcpus": 4}]}, "<test>"
    )
    c = Controller(inventory, {"local": LocalTransport()})
    await c.start()
    try:
        writes = _spy(c)
        job = c.submit(cmd("true", array_size=8))
        await done(c, job)
        assert job.state is JobState.SUCCEEDED
        spawns = [(h, how, ops) for h, how, ops in writes if "spawn" in ops]
        assert sum(len(ops) for _, _, ops in spawns) == 8
        assert all(how == "send_many" and set(ops) == {"spawn"} for _, how, ops in spawns)
        # the first pass placed 4 on each host: two writes, not eight
        assert sorted((h, len(ops)) for h, _, ops in spawns[:2]) == [("n1", 4), ("n2", 4)]
    finally:
        await c.close()


async def test_the_stale_sweep_lists_what_may_have_processes(ctl: Controller) -> None:
    """A new agent's first op: unfinished jobs that were placed are live; ``below`` stops
    at the oldest job never placed, so a deep queue does not make the message big."""
    over = ctl.submit(cmd("true"))
    await done(ctl, over)
    running = ctl.submit(cmd("sleep", "30"))
    await asyncio.sleep(0)  # the scheduling pass places it
    assert running.attempts
    waiting = [ctl.submit(cmd("true", depends_on=[running.id])) for _ in range(50)]
    sweep = ctl._stale_sweep()
    assert sweep["op"] == "stale" and sweep["live"] == [running.id]
    assert sweep["below"] == int(waiting[0].id)  # the oldest never placed
    assert int(over.id) < sweep["below"] and over.id not in sweep["live"]  # over: swept
    ctl.terminate(running.id, "test over")
    await done(ctl, running)


async def test_restored_jobs_are_live_in_every_agents_first_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restarted controller takes its unfinished jobs back before any agent gets its
    `stale`: the job being retried is listed live, and the stale comes first."""
    import time

    from mnp.controller import Restored
    from mnp.transport.base import AgentConnection

    sent: list[tuple[str, str, Any]] = []
    real = AgentConnection.send

    def send(self: AgentConnection, msg: dict[str, Any]) -> None:
        sent.append((self.host, msg["op"], msg.get("live", msg.get("tid"))))
        real(self, msg)

    monkeypatch.setattr(AgentConnection, "send", send)
    c = Controller(local_inventory(2), {"local": LocalTransport()})
    old = Restored("7", cmd("sleep", "30"), 7, JobState.RUNNING, time.time(), attempts=1)  # type: ignore[arg-type]
    await c.start(restored=[old])
    try:
        job = c.jobs["7"]
        for _ in range(100):
            if job.state is JobState.RUNNING:
                break
            await asyncio.sleep(0.05)
        assert job.state is JobState.RUNNING and len(job.attempts) == 2
        for host in ("local-0", "local-1"):
            ops = [(op, arg) for h, op, arg in sent if h == host]
            assert ops[0] == ("stale", ["7"]), ops
        c.terminate("7", "test over")
        await done(c, job)
    finally:
        await c.close()


async def test_an_unconfirmed_teardown_gives_the_host_up_after_grace_and_a_bound() -> None:
    """A timed-out job ends even when its agent never confirms the kill: after
    kill_grace plus the bound the controller gives up on the host, as on host loss
    (the heartbeat is out of the way here: a deadline of 10 minutes)."""
    import os
    import signal
    import time
    from dataclasses import replace

    c = Controller(local_inventory(1), {"local": LocalTransport()}, heartbeat=(0.2, 600))
    c.teardown_slack = 1.0
    await c.start()
    agent = int(c.agents["local-0"].facts["pid"])
    try:
        defn: Any = cmd("sleep", "100", timeout="1s")
        defn = replace(defn, timeout=replace(defn.timeout, kill_grace=0.5))
        job = c.submit(defn)
        for _ in range(100):
            if job.state is JobState.RUNNING:
                break
            await asyncio.sleep(0.05)
        assert job.state is JobState.RUNNING
        os.kill(agent, signal.SIGSTOP)
        t0 = time.monotonic()
        await done(c, job)
        took = time.monotonic() - t0
        assert (job.state, job.reason) == (JobState.FAILED, TIMEOUT_REASON)
        assert took < 1 + 0.5 + 1 + 2, took
        assert "not confirmed" in c.host_errors["local-0"]
    finally:
        os.kill(agent, signal.SIGCONT)
        await c.close()
