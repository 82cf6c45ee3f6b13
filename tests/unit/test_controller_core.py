"""The controller's job model (SPEC §6) on the fake transport: no processes, no sleeps.

How to write such a test
------------------------
``ctl`` is a started :class:`~mnp.controller.Controller` over three fake hosts
(``h0``-``h2``, 2 vCPUs each) whose agents are :class:`mnp.transport.fake.FakeAgent`:
every ``spawn`` is answered at once with ``started``, ``exited 0`` and ``gone``. To
shape what the agents do, set ``fake.handler`` before submitting: ``handler(host, msg)``
returns the events to answer ``msg`` with (``[]``: none; ``None``: the default).
``fake.hold`` starts tasks and leaves them running; the test then ends one with
``fake.exit(tid, code)``, delivers any event with ``fake.push(host, event)``, or cuts
a host with ``fake.lose(host)``.

Let the loop run with ``await settle()`` (a bounded number of ``asyncio.sleep(0)``, no
wall-clock time), or wait for a job with ``await done(ctl, job)`` (bounded by a safety
timeout that a passing test never reaches). Then assert on the jobs (state, reason,
exit code, attempts), on the events the controller emitted (``ctl.events``, or
``changes(ctl, job_id)``), and on what it sent the agents (``fake.spawned()``,
``fake.ops(host, "sweep")``, ``fake.log``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from mnp.controller import LOST_REASON, Controller, Restored
from mnp.errors import InfraError, JobRefused
from mnp.jobs import TIMEOUT_REASON, Job
from mnp.model import ComputeEnvironment, HostSpec, Inventory, JobDefinition, JobState, Queue
from mnp.model import Timeout as TimeoutSpec
from mnp.spec import definition_from_command, parse_definition
from mnp.transport import fake as fakemod
from mnp.transport.fake import FakeTransport, exited, gone, started

GiB = 1024**3
HOSTS = ("h0", "h1", "h2")
S, P, R = JobState.SUCCEEDED, JobState.PENDING, JobState.RUNNABLE
F, RUN, ST = JobState.FAILED, JobState.RUNNING, JobState.STARTING

Handler = Callable[[str, dict[str, Any]], list[dict[str, Any]] | None]


def inventory(hosts: tuple[str, ...] = HOSTS) -> Inventory:
    specs = tuple(
        HostSpec(name=h, address=h, vcpus=2, memory=8 * GiB, gpus=0, transport="fake")
        for h in hosts
    )
    return Inventory(
        "fake",
        specs,
        {"default": ComputeEnvironment("default", hosts)},
        {"default": Queue("default", 1, ("default",))},
    )


@pytest.fixture
def fake() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
async def ctl(fake: FakeTransport) -> AsyncIterator[Controller]:
    c = Controller(inventory(), {"fake": fake}, heartbeat=(3600.0, 7200.0))
    await c.start()
    try:
        yield c
    finally:
        await c.close()


async def settle(rounds: int = 100) -> None:
    """Let the loop run ``rounds`` times: what the fake agents said is handled."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def done(c: Controller, job: Job) -> Job:
    return await asyncio.wait_for(c.wait(job), 5)


def cmd(*argv: str, **overrides: Any) -> JobDefinition:
    return definition_from_command(list(argv) or ["true"], **overrides)


def defn(**raw: Any) -> JobDefinition:
    return parse_definition({"name": "t", "command": ["true"], **raw}, "t.toml")


def changes(c: Controller, job_id: str) -> list[tuple[str, str | None]]:
    """(status, reason) of ``job_id``'s own state changes (not its nodes'), in order."""
    return [
        (e["status"], e["reason"])
        for e in c.events
        if e["job_id"] == job_id and "node_index" not in e
    ]


def codes(codes_by_attempt: list[int], only: str | None = None) -> Handler:
    """A handler whose n-th spawn of a tid (of ``only``, if given) exits with
    ``codes_by_attempt[n]`` (then 0)."""
    seen: dict[str, int] = {}

    def handler(host: str, msg: dict[str, Any]) -> list[dict[str, Any]] | None:
        if msg.get("op") != "spawn" or only not in (None, msg["tid"]):
            return None
        tid = str(msg["tid"])
        n = seen.get(tid, 0)
        seen[tid] = n + 1
        code = codes_by_attempt[n] if n < len(codes_by_attempt) else 0
        return [started(tid), exited(tid, code), gone(tid)]

    return handler


# --- single jobs ------------------------------------------------------------------


@pytest.mark.parametrize(("code", "state"), [(0, S), (1, F), (3, F), (137, F)])
async def test_single_job_ends_with_its_exit_code(
    ctl: Controller, fake: FakeTransport, code: int, state: JobState
) -> None:
    fake.handler = codes([code])
    job = await done(ctl, ctl.submit(cmd()))
    assert (job.state, job.exit_code, len(job.attempts)) == (state, code, 1)
    assert changes(ctl, job.id) == [
        ("SUBMITTED", None),
        ("PENDING", None),
        ("RUNNABLE", None),
        ("STARTING", None),
        ("RUNNING", None),
        (state.value, None),
    ]
    last = [e for e in ctl.events if e["job_id"] == job.id][-1]
    assert (last["exit_code"], last["attempt"], last["previous"]) == (code, 1, "RUNNING")
    (spawn,) = fake.ops(op="spawn")
    assert spawn["tid"] == job.id and spawn["argv"] == ["true"]
    assert spawn["env"]["MNP_JOB_ID"] == job.id and spawn["env"]["MNP_JOB_ATTEMPT"] == "1"


async def test_every_agent_gets_its_stale_sweep_before_anything(
    ctl: Controller, fake: FakeTransport
) -> None:
    job = await done(ctl, ctl.submit(cmd()))
    for host in HOSTS:
        assert fake.ops(host)[0]["op"] == "stale"
    assert job.state is S


async def test_a_job_stays_running_until_its_task_exits(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    job = ctl.submit(cmd())
    await settle()
    assert job.state is RUN
    host = fake.host_of(job.id)
    fake.push(host, {"ev": "out", "tid": job.id, "fd": 1, "data": "hi\n"})
    fake.exit(job.id, 3)
    await done(ctl, job)
    assert (job.state, job.exit_code) == (F, 3)


async def test_a_spawn_the_agent_refuses_fails_the_attempt(
    ctl: Controller, fake: FakeTransport
) -> None:
    def refuse(host: str, msg: dict[str, Any]) -> list[dict[str, Any]] | None:
        if msg.get("op") == "spawn":
            return [{"ev": "error", "tid": msg["tid"], "msg": "bad field"}]
        return None

    fake.handler = refuse
    job = await done(ctl, ctl.submit(cmd()))
    assert (job.state, job.exit_code) == (F, 126)
    assert job.reason == "agent refused the task: bad field"


# --- retries ----------------------------------------------------------------------

RETRY_137_ELSE_EXIT = [
    {"on_exit_code": "137", "action": "RETRY"},
    {"on_exit_code": "*", "action": "EXIT"},
]


@pytest.mark.parametrize(
    ("retry", "exits", "state", "tries", "code"),
    [
        ({"attempts": 3}, [1, 1, 0], S, 3, 0),
        ({"attempts": 3}, [1, 2, 3], F, 3, 3),
        ({"attempts": 1}, [1], F, 1, 1),
        ({"attempts": 3, "evaluate_on_exit": RETRY_137_ELSE_EXIT}, [137, 137, 0], S, 3, 0),
        ({"attempts": 3, "evaluate_on_exit": RETRY_137_ELSE_EXIT}, [137, 1], F, 2, 1),
        ({"attempts": 3, "evaluate_on_exit": RETRY_137_ELSE_EXIT}, [1], F, 1, 1),
        # no rule matches: RETRY
        (
            {"attempts": 2, "evaluate_on_exit": [{"on_exit_code": "9", "action": "EXIT"}]},
            [1],
            S,
            2,
            0,
        ),
        # a rule on the reason: a plain exit has none, so "*" must match the empty reason
        (
            {
                "attempts": 3,
                "evaluate_on_exit": [
                    {"on_reason": "Host lost*", "action": "RETRY"},
                    {"on_exit_code": "*", "action": "EXIT"},
                ],
            },
            [1],
            F,
            1,
            1,
        ),
    ],
)
async def test_retries(
    ctl: Controller,
    fake: FakeTransport,
    retry: dict[str, Any],
    exits: list[int],
    state: JobState,
    tries: int,
    code: int,
) -> None:
    fake.handler = codes(exits)
    job = await done(ctl, ctl.submit(defn(retry=retry)))
    assert (job.state, len(job.attempts), job.exit_code) == (state, tries, code)
    assert [a.exit_code for a in job.attempts] == (exits + [0])[:tries]
    assert [s for s, _ in changes(ctl, job.id)].count("RUNNABLE") == tries
    spawns = fake.spawned()
    assert [tid for _, tid in spawns] == [job.id] * tries
    assert [m["env"]["MNP_JOB_ATTEMPT"] for m in fake.ops(op="spawn")] == [
        str(n) for n in range(1, tries + 1)
    ]


async def test_retry_on_reason_retries_a_lost_host_only(
    ctl: Controller, fake: FakeTransport
) -> None:
    rules = [
        {"on_reason": "Host lost*", "action": "RETRY"},
        {"on_exit_code": "*", "action": "EXIT"},
    ]
    fake.handler = fakemod.hold
    job = ctl.submit(defn(retry={"attempts": 3, "evaluate_on_exit": rules}))
    await settle()
    first = fake.host_of(job.id)
    fake.down.add(first)
    fake.lose(first)
    await settle()
    assert job.state is RUN and len(job.attempts) == 2
    assert job.attempts[0].reason == f"Host lost: {first}"
    second = fake.host_of(job.id)
    assert second != first
    fake.exit(job.id, 4)
    await done(ctl, job)
    assert (job.state, job.exit_code, len(job.attempts)) == (F, 4, 2)


# --- dependencies -----------------------------------------------------------------


async def test_plain_dependency_waits_for_success(ctl: Controller, fake: FakeTransport) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd())
    b = ctl.submit(cmd(depends_on=[a.id]))
    await settle()
    assert (a.state, b.state) == (RUN, P)
    assert [tid for _, tid in fake.spawned()] == [a.id]
    fake.handler = lambda host, msg: None
    fake.exit(a.id, 0)
    await done(ctl, b)
    assert b.state is S
    assert [tid for _, tid in fake.spawned()] == [a.id, b.id]


@pytest.mark.parametrize(("kind", "b_state"), [("", F), (":afterany", S)])
async def test_a_failed_dependency(
    ctl: Controller, fake: FakeTransport, kind: str, b_state: JobState
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd())
    b = ctl.submit(cmd(depends_on=[a.id + kind]))
    await settle()
    fake.handler = lambda host, msg: None
    fake.exit(a.id, 1)
    await done(ctl, b)
    assert (a.state, b.state) == (F, b_state)
    if b_state is F:
        assert b.reason == f"Dependent job {a.id} failed"
        assert b.attempts == [] and [tid for _, tid in fake.spawned()] == [a.id]
        assert changes(ctl, b.id)[-1] == ("FAILED", f"Dependent job {a.id} failed")
    else:
        assert [tid for _, tid in fake.spawned()] == [a.id, b.id]


async def test_dependency_on_a_job_that_already_failed(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = codes([1])
    a = await done(ctl, ctl.submit(cmd()))
    b = ctl.submit(cmd(depends_on=[a.id]))
    assert (b.state, b.reason) == (F, f"Dependent job {a.id} failed")


async def test_n_to_n_child_waits_for_the_same_child(ctl: Controller, fake: FakeTransport) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=2))
    b = ctl.submit(cmd(array_size=2, depends_on=[f"{a.id}:N_TO_N"]))
    await settle()
    assert [c.state for c in b.children] == [P, P]
    fake.exit(f"{a.id}:1", 0)
    await settle()
    assert [c.state for c in b.children] == [P, RUN]
    fake.exit(f"{a.id}:0", 2)
    await settle()
    assert (b.children[0].state, b.children[0].reason) == (F, f"Dependent job {a.id}:0 failed")
    fake.exit(f"{b.id}:1", 0)
    await done(ctl, b)
    assert (a.state, a.reason) == (F, f"Array child {a.id}:0 failed")
    # a child that never ran fails the parent with its own reason
    assert (b.state, b.reason) == (F, f"Dependent job {a.id}:0 failed")


async def test_dependency_on_an_array_parent_waits_for_every_child(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=3))
    b = ctl.submit(cmd(depends_on=[a.id]))
    await settle()
    assert a.state is P and b.state is P
    for i in range(3):
        assert b.state is P
        fake.exit(f"{a.id}:{i}", 0)
        await settle()
    assert a.state is S
    fake.exit(b.id, 0)
    await done(ctl, b)
    assert b.state is S


async def test_sequential_array_runs_in_order_and_stops_at_a_failure(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=4, sequential=True))
    await settle()
    ids = [c.id for c in a.children]
    assert [tid for _, tid in fake.spawned()] == ids[:1]
    fake.exit(ids[0], 0)
    await settle()
    assert [tid for _, tid in fake.spawned()] == ids[:2]
    fake.exit(ids[1], 1)
    await done(ctl, a)
    assert [c.state for c in a.children] == [S, F, F, F]
    assert [c.reason for c in a.children[2:]] == [f"Dependent job {ids[1]} failed"] * 2
    assert (a.state, a.reason, a.exit_code) == (F, f"Array child {ids[1]} failed", 1)
    assert len(fake.spawned()) == 2


async def test_array_parallelism_caps_running_children(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=5, array_parallelism=2))
    await settle()
    ids = [c.id for c in a.children]
    assert [tid for _, tid in fake.spawned()] == ids[:2]
    assert [c.state for c in a.children] == [RUN, RUN, P, P, P]
    assert a.state is P
    fake.exit(ids[1], 0)
    await settle()
    assert [tid for _, tid in fake.spawned()] == [ids[0], ids[1], ids[2]]
    fake.handler = lambda host, msg: None
    fake.exit(ids[0], 0)
    fake.exit(ids[2], 0)
    await done(ctl, a)
    assert a.state is S and a.exit_code == 0
    assert [tid for _, tid in fake.spawned()] == ids
    parent = [(s, r) for s, r in changes(ctl, a.id)]
    assert parent == [("SUBMITTED", None), ("PENDING", None), ("SUCCEEDED", None)]


# --- multi-node -------------------------------------------------------------------


def multinode(nodes: int = 3, **props: Any) -> JobDefinition:
    groups = [{"target_nodes": ":", "command": ["true"]}]
    mn = {"num_nodes": nodes, "main_node": 0, **props, "groups": groups}
    return defn(type="multinode", multinode=mn)


def node_states(job: Job) -> list[JobState]:
    attempt = job.attempt
    assert attempt is not None
    return [n.state for n in attempt.nodes]


async def test_multinode_main_node_first_then_the_children(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = lambda host, msg: [] if msg.get("op") == "spawn" else None  # not started
    job = ctl.submit(multinode(3))
    await settle()
    main = f"{job.id}#0"
    assert [tid for _, tid in fake.spawned()] == [main]
    main_host = fake.host_of(main)
    # the main node's agent picks MASTER_PORT at the spawn: nothing is asked before it
    assert fake.ops(op="port") == []
    (spawn,) = fake.ops(op="spawn")
    assert (spawn["port_env"], spawn["port_key"]) == ("MASTER_PORT", f"{job.id}.1")
    assert "MASTER_PORT" not in spawn["env"]
    assert [f["path"] for f in spawn["files"]] == [
        f"/tmp/mnp-fake/{main_host}/{job.id}.1/hostfile",
        f"/tmp/mnp-fake/{main_host}/{job.id}.1/hostfile.ompi",
    ]
    assert spawn["env"]["MNP_NODE_INDEX"] == "0" and spawn["env"]["MNP_NUM_NODES"] == "3"
    assert job.state is ST
    fake.handler = fakemod.hold
    fake.push(main_host, started(main))
    await settle()
    spawned = fake.spawned()
    assert [tid for _, tid in spawned] == [main, f"{job.id}#1", f"{job.id}#2"]
    assert len({h for h, _ in spawned}) == 3  # distinct hosts
    assert job.state is RUN and node_states(job) == [RUN, RUN, RUN]
    # the others are wired with the port the main node's `started` said
    port = fake.agents[main_host].keyed_ports[f"{job.id}.1"]
    children = fake.ops(op="spawn")[1:]
    assert [m["env"]["MASTER_PORT"] for m in children] == [str(port)] * 2
    assert not any("port_env" in m for m in children)


async def test_master_port_is_asked_first_of_an_agent_that_cannot_pick_it(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    for conn in ctl.agents.values():  # an older agent: its `ready` lists no features
        conn.facts.pop("features")
    job = ctl.submit(multinode(3))
    await settle()
    assert job.state is RUN
    assert len(fake.ops(op="port")) == 1
    assert job.attempt is not None and job.attempt.launch is not None
    port = job.attempt.launch.master_port
    assert port is not None
    spawns = fake.ops(op="spawn")
    assert spawns and all(m["env"]["MASTER_PORT"] == str(port) for m in spawns)
    assert not any("port_env" in m for m in spawns)


async def test_multinode_main_exit_ends_the_job_and_sweeps_every_host(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    job = ctl.submit(multinode(3))
    await settle()
    fake.exit(f"{job.id}#0", 7)
    await done(ctl, job)
    assert (job.state, job.exit_code) == (F, 7)
    for host in HOSTS:
        assert fake.ops(host, "sweep") == [{"op": "sweep", "job": job.id, "grace": 10.0}]
        assert fake.ops(host, "kill") == []  # a swept host gets no kill
    assert node_states(job) == [F, F, F]
    assert all(not agent.tasks for agent in fake.agents.values())


async def test_multinode_child_failure_ignored_by_default(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    job = ctl.submit(multinode(3))
    await settle()
    fake.exit(f"{job.id}#1", 5)
    await settle()
    assert job.state is RUN and node_states(job) == [RUN, F, RUN]
    assert fake.ops(op="sweep") == []
    fake.exit(f"{job.id}#0", 0)
    await done(ctl, job)
    assert (job.state, job.exit_code, job.reason) == (S, 0, None)
    assert node_states(job) == [S, F, S]


async def test_multinode_child_failure_terminates(ctl: Controller, fake: FakeTransport) -> None:
    fake.handler = fakemod.hold
    job = ctl.submit(multinode(3, on_child_failure="terminate"))
    await settle()
    fake.exit(f"{job.id}#2", 5)
    await done(ctl, job)
    assert (job.state, job.reason, job.exit_code) == (F, "Child node 2 exited with code 5", 5)
    assert sorted(h for h, m in fake.log if m.get("op") == "sweep") == list(HOSTS)
    assert node_states(job) == [F, F, F]


# --- cancel and terminate ---------------------------------------------------------


async def test_cancel_fails_a_waiting_job_and_leaves_a_running_one(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    running = [ctl.submit(cmd(vcpus=2)) for _ in HOSTS]  # the cluster is full
    waiting = ctl.submit(cmd(vcpus=2))
    await settle()
    assert [j.state for j in running] == [RUN] * 3 and waiting.state is R
    assert ctl.cancel(waiting.id, "not needed") is waiting
    assert (waiting.state, waiting.reason, waiting.attempts) == (F, "not needed", [])
    ctl.cancel(running[0].id, "too late")
    await settle()
    assert running[0].state is RUN  # cancel never stops what runs (AWS Batch)
    fake.exit(running[0].id, 0)
    await settle()
    assert running[0].state is S
    assert len(fake.spawned()) == 3  # the cancelled job never took the freed host


async def test_terminate_kills_a_running_job_and_does_not_retry(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    job = ctl.submit(cmd(attempts=3))
    await settle()
    host = fake.host_of(job.id)
    ctl.terminate(job.id, "stop it")
    await done(ctl, job)
    assert fake.ops(host, "kill") == [{"op": "kill", "tid": job.id, "grace": 10.0}]
    assert (job.state, job.reason, len(job.attempts)) == (F, "stop it", 1)
    # the agent reported the SIGTERM, but an attempt whose end was decided first keeps
    # no exit code nor signal: only the task has them
    assert (job.exit_code, job.signal) == (None, None)
    assert (job.attempts[0].tasks[job.id].signal, job.attempts[0].tasks[job.id].exit_code) == (
        15,
        None,
    )
    assert changes(ctl, job.id)[-1] == ("FAILED", "stop it")


async def test_cancel_of_an_array_parent_cascades_to_waiting_children(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=3, array_parallelism=1))
    await settle()
    ctl.cancel(a.id, "cancelled")
    await settle()
    assert [c.state for c in a.children] == [RUN, F, F]
    assert a.state is P  # ends when its running child does
    fake.exit(f"{a.id}:0", 0)
    await done(ctl, a)
    assert (a.state, a.reason) == (F, "cancelled")
    assert len(fake.spawned()) == 1


async def test_terminate_of_an_array_parent_kills_and_fails_every_child(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=4, array_parallelism=2))
    await settle()
    ctl.terminate(a.id, "stop all")
    await done(ctl, a)
    assert [(c.state, c.reason) for c in a.children] == [(F, "stop all")] * 4
    assert sorted(m["tid"] for m in fake.ops(op="kill")) == [f"{a.id}:0", f"{a.id}:1"]
    assert a.state is F
    # the parent's reason names its first failed child that ran, not the terminate
    assert a.reason == f"Array child {a.id}:0 failed"


async def test_terminate_of_a_multinode_job_sweeps_its_hosts(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    job = ctl.submit(multinode(2, on_child_failure="terminate"))
    await settle()
    ctl.terminate(job.id, "enough")
    await done(ctl, job)
    assert (job.state, job.reason) == (F, "enough")
    assert len(fake.ops(op="sweep")) == 2 and fake.ops(op="kill") == []


# --- host loss --------------------------------------------------------------------


@pytest.mark.parametrize(("attempts", "state"), [(1, F), (2, S)])
async def test_host_lost_fails_the_attempt_and_retries_elsewhere(
    ctl: Controller, fake: FakeTransport, attempts: int, state: JobState
) -> None:
    fake.handler = fakemod.hold
    job = ctl.submit(cmd(attempts=attempts))
    await settle()
    lost = fake.host_of(job.id)
    fake.down.add(lost)  # its agent cannot come back during the test
    fake.lose(lost)
    await settle()
    assert job.attempts[0].reason == f"Host lost: {lost}"
    assert changes(ctl, job.id)[5] == (
        "FAILED" if attempts == 1 else "RUNNABLE",
        f"Host lost: {lost}",
    )
    if attempts > 1:
        again = fake.host_of(job.id)
        assert again != lost
        fake.exit(job.id, 0)
    await done(ctl, job)
    assert (job.state, len(job.attempts)) == (state, attempts)
    assert ctl.capacity[lost].up is False and lost not in ctl.agents


async def test_host_lost_under_a_multinode_job_restarts_all_its_nodes(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    job = ctl.submit(replace(multinode(2), retry=replace(multinode(2).retry, attempts=2)))
    await settle()
    child = f"{job.id}#1"
    lost = fake.host_of(child)
    survivor = fake.host_of(f"{job.id}#0")
    fake.down.add(lost)
    fake.lose(lost)
    await settle()
    first = job.attempts[0]
    assert (first.reason, first.final) == (f"Host lost: {lost}", F)
    assert fake.ops(survivor, "sweep") == [{"op": "sweep", "job": job.id, "grace": 10.0}]
    assert len(job.attempts) == 2 and job.state is RUN
    hosts = {fake.host_of(f"{job.id}#0"), fake.host_of(child)}
    assert lost not in hosts
    fake.exit(f"{job.id}#0", 0)
    await done(ctl, job)
    assert job.state is S


async def test_an_agent_that_stops_answering_is_given_up(fake: FakeTransport) -> None:
    # the one test that waits on the clock: a heartbeat of 10 ms, given up after 50 ms
    c = Controller(inventory(("h0",)), {"fake": fake}, heartbeat=(0.01, 0.05))
    await c.start()
    try:
        fake.handler = lambda host, msg: [] if msg.get("op") == "ping" else fakemod.hold(host, msg)
        job = c.submit(cmd())
        await done(c, job)
        assert job.state is F and job.reason is not None
        assert job.reason.startswith("Host lost: h0 (agent not responding")
        assert fake.ops("h0", "ping")  # pinged, never answered
    finally:
        await c.close()


# --- restore after a restart ------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_attempts", "exits", "state", "tries"),
    [
        (1, [0], S, 2),  # the lost attempt is not counted: one more run
        (1, [1], F, 2),
        (2, [1, 0], S, 3),
    ],
)
async def test_restore_retries_a_lost_attempt_without_counting_it(
    fake: FakeTransport, retry_attempts: int, exits: list[int], state: JobState, tries: int
) -> None:
    import time

    lost = Restored(
        id="7",
        defn=cmd(attempts=retry_attempts),
        seq=7,
        state=RUN,
        created=time.time(),
        attempts=1,
    )
    waiting = Restored(id="8", defn=cmd(depends_on=["7"]), seq=8, state=P, created=time.time())
    c = Controller(inventory(), {"fake": fake}, heartbeat=(3600.0, 7200.0))
    fake.handler = codes(exits, only="7")
    await c.start(restored=[lost, waiting])
    try:
        for host in HOSTS:
            first = fake.ops(host)[0]
            assert first["op"] == "stale" and first["live"] == ["7"]
        job, dep = c.jobs["7"], c.jobs["8"]
        await done(c, dep)
        assert (job.state, len(job.attempts)) == (state, tries)
        assert changes(c, "7")[0] == ("RUNNABLE", LOST_REASON)
        assert dep.state is state
        assert c.submit(cmd()).id == "9"  # ids go on after the restored ones
    finally:
        await c.close()


# --- timeouts ---------------------------------------------------------------------


async def test_attempt_timeout_kills_and_is_not_retried(
    ctl: Controller, fake: FakeTransport
) -> None:
    # waits 50 ms of wall-clock time: the controller times attempts with loop.call_later
    fake.handler = fakemod.hold
    job = ctl.submit(replace(cmd(attempts=3), timeout=TimeoutSpec(attempt_duration=0.05)))
    await settle()
    host = fake.host_of(job.id)
    assert job.state is RUN
    await done(ctl, job)
    assert (job.state, job.reason, job.timed_out, len(job.attempts)) == (
        F,
        TIMEOUT_REASON,
        True,
        1,
    )
    assert fake.ops(host, "kill") == [{"op": "kill", "tid": job.id, "grace": 10.0}]


# --- events -----------------------------------------------------------------------


async def test_on_event_gets_every_state_change_once_in_seq_order(fake: FakeTransport) -> None:
    seen: list[dict[str, Any]] = []
    c = Controller(inventory(), {"fake": fake}, on_event=seen.append, heartbeat=(3600.0, 7200.0))
    await c.start()
    try:
        a = c.submit(cmd(array_size=2))
        m = c.submit(multinode(2))
        await done(c, a)
        await done(c, m)
    finally:
        await c.close()
    assert seen == c.events
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    assert {e["array_index"] for e in seen if e["job_id"].startswith(f"{a.id}:")} == {0, 1}
    nodes = [(e["node_index"], e["status"]) for e in seen if "node_index" in e]
    # the fake's main node exits at once: the child, spawned once the main node ran, is
    # torn down before it is RUNNING and ends as the job does
    assert nodes == [(0, "RUNNING"), (0, "SUCCEEDED"), (1, "SUCCEEDED")]


# --- more multi-node and restore cases ----------------------------------------------


async def test_a_main_node_other_than_zero_is_spawned_first(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    job = ctl.submit(multinode(3, main_node=2))
    await settle()
    assert [tid for _, tid in fake.spawned()] == [f"{job.id}#{i}" for i in (2, 0, 1)]
    fake.exit(f"{job.id}#2", 0)
    await done(ctl, job)
    assert job.state is S


async def test_a_retried_multinode_job_restarts_every_node(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    base = multinode(3)
    job = ctl.submit(replace(base, retry=replace(base.retry, attempts=2)))
    await settle()
    fake.exit(f"{job.id}#0", 1)
    await settle()
    assert len(job.attempts) == 2 and job.state is RUN
    tids = [tid for _, tid in fake.spawned()]
    assert tids == [f"{job.id}#{i}" for i in (0, 1, 2)] * 2
    assert [m["env"]["MNP_JOB_ATTEMPT"] for m in fake.ops(op="spawn")] == ["1"] * 3 + ["2"] * 3
    fake.exit(f"{job.id}#0", 0)
    await done(ctl, job)
    assert (job.state, job.exit_code) == (S, 0)


async def test_a_multinode_job_never_holds_part_of_the_cluster(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    single = ctl.submit(cmd())
    job = ctl.submit(multinode(3))  # needs every host, one is busy
    await settle()
    assert job.state is R and [tid for _, tid in fake.spawned()] == [single.id]
    assert fake.ops(op="port") == []
    fake.exit(single.id, 0)
    await settle()
    assert job.state is RUN
    assert [tid for _, tid in fake.spawned()][1:] == [f"{job.id}#{i}" for i in range(3)]


async def test_restore_of_an_array_retries_the_lost_child_and_admits_the_rest(
    fake: FakeTransport,
) -> None:
    import time

    arr = cmd(array_size=3, array_parallelism=2)
    now = time.time()
    items = [
        Restored(id="10", defn=arr, seq=10, state=P, created=now),
        Restored("10:0", arr, 11, S, now, parent="10", array_index=0, attempts=1),
        Restored("10:1", arr, 12, RUN, now, parent="10", array_index=1, attempts=1),
        Restored("10:2", arr, 13, P, now, parent="10", array_index=2),
    ]
    c = Controller(inventory(), {"fake": fake}, heartbeat=(3600.0, 7200.0))
    await c.start(restored=items)
    try:
        parent = c.jobs["10"]
        await done(c, parent)
        assert [tid for _, tid in fake.spawned()] == ["10:1", "10:2"]
        assert parent.state is S
        assert [len(ch.attempts) for ch in parent.children] == [1, 2, 1]
        assert all(fake.ops(h)[0] == {**fake.ops(h)[0], "live": ["10"]} for h in HOSTS)
    finally:
        await c.close()


# --- the fake itself --------------------------------------------------------------


async def test_the_fake_is_registered_by_name_and_speaks_the_protocol() -> None:
    from mnp.transport import transports_for

    fake = transports_for(inventory())["fake"]
    assert isinstance(fake, FakeTransport)
    agent = await fake.open(inventory().host("h0"), ["--ctl", "x"])
    assert isinstance(agent, fakemod.FakeAgent)
    assert (await agent.readline()).startswith(b'{"ev":"ready"')
    fake.handler = fakemod.hold
    agent.write(b'{"op":"spawn","tid":"5:1"}\n{"op":"kill","tid":"nope"}\n')
    assert b'"ev":"started"' in await agent.readline()
    agent.write(b'{"op":"sweep","job":"5","grace":1}\n')
    lines = [json.loads(await agent.readline()) for _ in range(3)]
    assert [e["ev"] for e in lines] == ["exited", "gone", "swept"]
    assert lines[0]["signal"] == fakemod.SIGTERM
    assert fake.ops("h0", "kill") == [{"op": "kill", "tid": "nope"}] and agent.tasks == {}
    fake.lose("h0")
    assert await agent.readline() == b""


# --- admission: refusals, names, withdraw, forget ---------------------------------


async def test_submit_refuses_what_can_never_be_met_and_keeps_nothing(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd("train"))
    refusals = [
        (cmd(queue="nope"), "queue 'nope' does not exist; queues: default"),
        (cmd(depends_on=["99"]), "depends_on: job 99 does not exist"),
        (cmd(depends_on=[a.id, "train"]), f"both job {a.id}; list each job once"),
        (cmd(array_size=2, depends_on=[f"{a.id}:N_TO_N"]), "N_TO_N needs two array jobs"),
        (cmd(vcpus=64), "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT: no compute environment"),
    ]
    for definition, why in refusals:
        with pytest.raises(JobRefused, match=re.escape(why)):
            ctl.submit(definition)
    assert list(ctl.jobs) == [a.id]
    b = ctl.submit(cmd(depends_on=["train"]))  # a name is stored as the job's id
    assert b.defn.depends_on[0].job_id == a.id
    assert int(b.id) == int(a.id) + 1  # a refused job takes no id


async def test_a_job_only_unconnected_hosts_could_run_is_an_infrastructure_error(
    fake: FakeTransport,
) -> None:
    fake.down.update(("h1", "h2"))  # their agents never answer
    c = Controller(inventory(), {"fake": fake}, heartbeat=(3600.0, 7200.0))
    await c.start()
    try:
        with pytest.raises(InfraError, match=r"not usable now \(2 node.*1 of 3 hosts usable"):
            c.submit(multinode(2))
        assert c.jobs == {} and set(c.host_errors) == {"h1", "h2"}
    finally:
        await c.close()


async def test_cancel_and_terminate_take_a_name_and_refuse_an_unknown_job(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    running = ctl.submit(cmd("train"))
    await settle()
    waiting = ctl.submit(cmd("serve", depends_on=[running.id]))
    assert ctl.resolve("serve") == waiting.id and ctl.state_of(waiting.id) is P
    assert ctl.cancel("serve", "no") is waiting and waiting.state is F
    assert ctl.terminate("train", "stop") is running
    await done(ctl, running)
    assert (running.state, running.reason) == (F, "stop")
    for op in (ctl.cancel, ctl.terminate):
        with pytest.raises(JobRefused, match="job nope does not exist"):
            op("nope", "x")


async def test_withdraw_forgets_the_job_its_name_and_its_wait(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    first = ctl.submit(cmd("train"))
    await settle()
    second = ctl.submit(cmd("train", depends_on=[first.id]))
    assert ctl.resolve("train") == second.id
    with pytest.raises(ValueError, match="has started"):
        ctl.withdraw(first)
    ctl.withdraw(second)
    assert second.id not in ctl.jobs and ctl.resolve("train") == first.id
    fake.exit(first.id, 0)
    await done(ctl, first)
    await settle()
    assert second.state is P and [tid for _, tid in fake.spawned()] == [first.id]


async def test_forget_drops_finished_jobs_only(ctl: Controller, fake: FakeTransport) -> None:
    finished = await done(ctl, ctl.submit(cmd()))
    fake.handler = fakemod.hold
    running = ctl.submit(cmd())
    await settle()
    ctl.forget([finished.id, running.id])
    assert finished.id not in ctl.jobs and running.id in ctl.jobs
    assert ctl.resolve(finished.id) is None
    with pytest.raises(JobRefused, match=f"job {finished.id} does not exist"):
        ctl.submit(cmd(depends_on=[finished.id]))


async def test_continue_numbering_goes_on_after_the_last_seq(ctl: Controller) -> None:
    ctl.continue_numbering(100)
    ctl.continue_numbering(7)  # never back
    assert ctl.submit(cmd()).seq == 101


# --- attempts: hooks, failures kept to their job, the clock, closing --------------


async def test_a_task_the_start_hook_refuses_is_never_sent(
    ctl: Controller, fake: FakeTransport
) -> None:
    ctl.on_task_start = lambda job, task: "its log cannot be opened"
    job = await done(ctl, ctl.submit(cmd(attempts=2)))
    assert (job.state, job.reason) == (F, "its log cannot be opened")
    assert fake.spawned() == []
    assert all(cap.free_vcpus == cap.vcpus for cap in ctl.capacity.values())


async def test_an_error_while_handling_an_agent_event_fails_only_that_job(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    bad, good = ctl.submit(cmd()), ctl.submit(cmd())
    await settle()

    def on_output(job: Job, task: object, fd: int, data: str) -> None:
        raise RuntimeError(f"cannot write {job.id}")

    ctl.on_output = on_output
    fake.push(fake.host_of(bad.id), {"ev": "out", "tid": bad.id, "fd": 1, "data": "x"})
    await done(ctl, bad)
    assert (bad.state, bad.reason) == (F, f"Controller error: RuntimeError: cannot write {bad.id}")
    assert bad.attempts[0].retryable is False
    ctl.on_output = None
    fake.exit(good.id, 0)
    assert (await done(ctl, good)).state is S


async def test_the_clock_is_read_where_something_happens_and_passed_on(
    ctl: Controller, fake: FakeTransport
) -> None:
    ticks = iter(range(1000, 2000))
    ctl.shared.clock = lambda: float(next(ticks))
    job = await done(ctl, ctl.submit(cmd()))
    times = [e["time"] for e in ctl.events if e["job_id"] == job.id]
    # submit: one reading for SUBMITTED and PENDING and RUNNABLE; the pass one for
    # STARTING; each agent event one (started, exited, gone: the job ends on gone)
    assert times == [1000.0, 1000.0, 1000.0, 1001.0, 1002.0, 1004.0]
    assert job.attempts[0].placed_at == 1001.0 and job.attempts[0].stopped_at == 1004.0


async def test_close_ends_a_decided_attempt_as_decided_and_keeps_a_running_one(
    fake: FakeTransport,
) -> None:
    c = Controller(inventory(), {"fake": fake}, heartbeat=(3600.0, 7200.0))
    await c.start()
    fake.handler = lambda host, msg: [] if msg.get("op") == "kill" else fakemod.hold(host, msg)
    ending, running = c.submit(cmd()), c.submit(cmd())
    await settle()
    c.terminate(ending.id, "stop it")
    await settle()
    assert ending.state is RUN and ending.attempt is not None and ending.attempt.ending
    await c.close()
    assert (ending.state, ending.reason) == (F, "stop it")
    assert running.state is RUN  # retried by the next controller, uncounted (restore)
    with pytest.raises(InfraError, match="shutting down"):
        c.submit(cmd())


# --- sparse arrays ------------------------------------------------------------------


async def test_a_big_array_is_a_range_until_its_children_are_released(
    ctl: Controller, fake: FakeTransport
) -> None:
    from mnp.sched.lifecycle import AHEAD

    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=100_000))
    await settle()
    # only the window has objects and events: AHEAD waiting to be placed, and those
    # placed (3 hosts of 2 vcpus); the rest is a range of ids and seqs
    running = len(fake.spawned())
    assert running == 6
    assert (a.admitted, a.waiting) == (AHEAD + running, AHEAD)
    assert [c.array_index for c in a.held] == list(range(AHEAD + running))
    assert [c.seq for c in a.held[:3]] == [a.seq + 1, a.seq + 2, a.seq + 3]
    assert sum(1 for j in ctl.jobs if j.startswith(f"{a.id}:")) == AHEAD + running
    assert len(ctl.events) < 4 * (AHEAD + running)
    assert ctl.admission.state_of(f"{a.id}:99999") is P  # not released: waits
    assert ctl.admission.state_of(f"{a.id}:100000") is None  # no such child
    later = ctl.submit(cmd())
    assert later.seq == a.seq + 100_001  # the range's seqs stay kept: FIFO order holds
    for _, tid in fake.spawned()[:2]:  # two end: two more are placed, two released
        fake.exit(tid, 0)
    await settle()
    assert len(fake.spawned()) == running + 2
    assert (a.admitted, a.waiting) == (AHEAD + running + 2, AHEAD)
    ctl.cancel(a.id, "enough")  # every child not placed fails, each with its object
    for _, tid in fake.spawned()[2:]:
        fake.exit(tid, 0)
    await done(ctl, a)
    assert len(a.children) == 100_000  # every child ended: each has its object
    assert a.state is F


async def test_a_sparse_array_runs_every_child_once_in_index_order(
    ctl: Controller, fake: FakeTransport
) -> None:
    a = ctl.submit(cmd(array_size=1500))
    await done(ctl, a)
    tids = [tid for _, tid in fake.spawned()]
    assert sorted(tids, key=lambda t: int(t.split(":")[1])) == [f"{a.id}:{i}" for i in range(1500)]
    assert len(set(tids)) == 1500
    assert a.state is S and a.finished == 1500


async def test_n_to_n_waits_on_a_child_not_released_yet(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=1000, array_parallelism=1))
    b = ctl.submit(defn(array={"size": 1000}, depends_on=[f"{a.id}:N_TO_N"]))
    await settle()
    assert [tid for _, tid in fake.spawned()] == [f"{a.id}:0"]
    assert all(c.state is P for c in b.held)  # each waits on its peer, released or not
    fake.exit(f"{a.id}:0", 0)
    await settle()
    assert f"{b.id}:0" in [tid for _, tid in fake.spawned()]
    assert ctl.jobs[f"{b.id}:1"].state is P
