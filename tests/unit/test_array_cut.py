"""Cancel, terminate and a failed SEQUENTIAL child end an array's unreleased children
in one step (``Job.cut``): no object, row or event per child; the store reads them
back (``mnp.store.gaps``) and ``mnp events`` shows each child's FAILED event."""

from __future__ import annotations

import time
from typing import Any

from mnp.controller import Controller, Restored
from mnp.jobs import ARRAY_CUT
from mnp.model import JobState
from mnp.store import gaps
from mnp.transport import fake as fakemod
from mnp.transport.fake import FakeTransport
from tests.unit.test_controller_core import RUN, F, P, cmd, ctl, done, fake, settle

__all__ = ["ctl", "fake"]  # the fixtures, used by name

N = 100_000


def cut_events(c: Controller, job_id: str) -> list[dict[str, Any]]:
    return [e for e in c.events if e["type"] == ARRAY_CUT and e["job_id"] == job_id]


async def test_cancel_of_a_100k_array_ends_the_rest_in_one_event(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=N, array_parallelism=2))
    await settle()
    before = len(ctl.events)
    ctl.cancel(a.id, "enough")
    await settle()
    assert len(a.held) == 2  # only the two released: no object for the others
    assert len(ctl.events) - before == 1  # the one event, nothing per child
    (ev,) = cut_events(ctl, a.id)
    assert (ev["array_range"], ev["count"], ev["status"], ev["reason"]) == (
        [2, N - 1],
        N - 2,
        "FAILED",
        "enough",
    )
    assert ctl.state_of(f"{a.id}:2") is F and ctl.state_of(f"{a.id}:{N - 1}") is F
    assert a.state is P  # its running children go on (AWS Batch)
    kids = a.children  # made up for a reader
    assert [c.state for c in kids[:3]] == [RUN, RUN, F] and len(kids) == N
    assert kids[-1].reason == "enough" and kids[-1].id == f"{a.id}:{N - 1}"
    fake.exit(f"{a.id}:0", 0)
    fake.exit(f"{a.id}:1", 0)
    await done(ctl, a)
    assert (a.state, a.reason) == (F, "enough")


async def test_terminate_of_an_array_waiting_on_a_dependency_ends_at_once(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    gate = ctl.submit(cmd("sleep", "60"))
    a = ctl.submit(cmd(array_size=N, depends_on=[gate.id]))
    await settle()
    ctl.terminate(a.id, "stop")
    await settle()
    assert (a.state, a.reason, a.held) == (F, "stop", [])
    assert [e["array_range"] for e in cut_events(ctl, a.id)] == [[0, N - 1]]


async def test_dependents_of_children_that_ended_unreleased_fail(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=4, array_parallelism=1))
    b = ctl.submit(cmd(array_size=4, depends_on=[f"{a.id}:N_TO_N"]))
    c = ctl.submit(cmd(depends_on=[f"{a.id}:3"]))
    await settle()
    ctl.cancel(a.id, "enough")
    await settle()
    assert [k.state for k in b.children[1:]] == [F, F, F]
    assert c.state is F


async def test_a_failed_sequential_child_ends_the_rest_in_one_event(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    a = ctl.submit(cmd(array_size=N, sequential=True))
    await settle()
    fake.exit(f"{a.id}:0", 3)
    await done(ctl, a)
    assert len(a.held) == 1
    (ev,) = cut_events(ctl, a.id)
    assert ev["reason"] == f"Dependent job {a.id}:0 failed" and ev["count"] == N - 1
    assert a.state is F


async def test_restore_never_releases_children_that_ended_unreleased(
    ctl: Controller, fake: FakeTransport
) -> None:
    fake.handler = fakemod.hold
    defn = cmd(array_size=10, array_parallelism=2)
    parent = Restored("7", defn, 1, P, 0.0, released=2, ended=1, cut=2, cut_reason="x")
    ctl.restore(
        [
            parent,
            Restored("7:0", defn, 2, JobState.RUNNING, 0.0, parent="7", array_index=0),
            Restored("7:1", defn, 3, JobState.SUCCEEDED, 0.0, parent="7", array_index=1),
        ],
        time.time(),
    )
    await settle()
    a = ctl.jobs["7"]
    assert [c.id for c in a.held] == ["7:0", "7:1"]
    assert ctl.state_of("7:5") is F
    fake.exit("7:0", 0)
    await done(ctl, a)
    assert (a.state, a.reason) == (F, "x")
    assert len(fake.spawned()) == 1  # 7:0 again (its attempt was lost); none of 2..9


def test_child_ends_reads_one_event_as_each_childs() -> None:
    ev = {
        "seq": 9,
        "time": 1.0,
        "type": ARRAY_CUT,
        "job_id": "4",
        "name": "n",
        "queue": "q",
        "status": "FAILED",
        "reason": "r",
        "array_range": [2, 4],
        "count": 3,
        "tags": {"t": "1"},
    }
    ends = gaps.child_ends(ev)
    assert [(e["job_id"], e["seq"], e["status"], e["reason"]) for e in ends] == [
        ("4:2", 9, "FAILED", "r"),
        ("4:3", 9, "FAILED", "r"),
        ("4:4", 9, "FAILED", "r"),
    ]
    assert all(e["type"] == "job-state-change" and e["tags"] == {"t": "1"} for e in ends)
    assert [e["job_id"] for e in gaps.child_ends(ev, 3)] == ["4:3"]
    assert gaps.child_ends(ev, 1) == []
    other = {"seq": 8, "type": "job-state-change", "job_id": "4"}
    assert [e["job_id"] for e in gaps.per_child_ends([other, ev], [], None)] == [
        "4",
        "4:2",
        "4:3",
        "4:4",
    ]
    assert [e["job_id"] for e in gaps.per_child_ends([], [other, ev], 4)] == ["4:4"]
    assert (gaps.child_index("4:7"), gaps.child_index("4"), gaps.child_index(None)) == (
        7,
        None,
        None,
    )
