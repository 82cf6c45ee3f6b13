"""The managed-environment decision (mnp.sched.autoscale.decide), as a table of cases.

Nodes have 2 vCPUs; allocations are 2 nodes (4 vCPUs); max 16 vCPUs; idle_timeout 300 s;
no time limit unless a case says so; ``now`` is 1000.
"""

from __future__ import annotations

import dataclasses

import pytest

from mnp.model import ManagedSpec
from mnp.sched.autoscale import Action, Allocation, Blocked, Cancel, Need, Submit, decide

SPEC = ManagedSpec(provider="slurm", max_vcpus=16, nodes=2, idle_timeout=300.0)
HOUR = dataclasses.replace(SPEC, time_limit=3600.0)
NOW = 1000.0


IDLE_OLD = Allocation("11", 2, "RUNNING", idle_since=NOW - 400)
IDLE_NEW = Allocation("12", 2, "RUNNING", idle_since=NOW - 100)
BUSY = Allocation("13", 2, "RUNNING", used=(2.0, 1.0))
PENDING = Allocation("14", 2, "PENDING")

CASES: list[tuple[str, ManagedSpec, list[Need], list[Allocation], list[Action]]] = [
    ("nothing to do", SPEC, [], [], []),
    ("one job, no capacity: one allocation", SPEC, [Need("1")], [], [Submit(2, None, ("1",))]),
    ("array children share the allocation they caused",
     SPEC, [Need(f"1:{i}") for i in range(4)], [], [Submit(2, None, ("1:0",))]),
    ("a fifth child needs a second allocation",
     SPEC, [Need(f"1:{i}") for i in range(5)], [],
     [Submit(2, None, ("1:0",)), Submit(2, None, ("1:4",))]),
    ("a 3-node gang gets an allocation of 3 nodes",
     SPEC, [Need("mn", nodes=3, vcpus=2)], [], [Submit(3, None, ("mn",))]),
    ("work fits on a pending allocation: nothing submitted",
     SPEC, [Need("1"), Need("2")], [PENDING], []),
    ("work fits on an idle running one: it is not cancelled",
     SPEC, [Need("1")], [IDLE_OLD], []),
    ("busy allocation's free vCPU is used first",
     SPEC, [Need("1")], [BUSY], []),
    ("never above max_vcpus: 16 = 4 allocations, the rest waits",
     SPEC, [Need(f"j{i}", vcpus=2) for i in range(12)], [],
     [Submit(2, None, (f"j{i}",)) for i in (0, 2, 4, 6)]),
    ("10 of 16 vCPUs held: an allocation of 4 nodes would pass max, one for the gang fits",
     dataclasses.replace(SPEC, nodes=4), [Need("mn", nodes=3)],
     [Allocation("1", 5, "RUNNING", used=(2,) * 5)], [Submit(3, None, ("mn",))]),
    ("more vCPUs per node than a node has",
     SPEC, [Need("big", vcpus=4)], [],
     [Blocked("big", "needs 4 vCPUs per node; this environment's nodes have 2")]),
    ("a gang larger than max_vcpus allows",
     SPEC, [Need("mn", nodes=9)], [],
     [Blocked("mn", "needs 9 whole nodes of 2 vCPUs; max_vcpus (16) allows fewer")]),
    ("time limit: no timeout is blocked, a fitting timeout gets an allocation",
     HOUR, [Need("a"), Need("b", timeout=600)], [],
     [Blocked("a", "has no timeout, and this environment's allocations end after 3600s; "
              "give the job a timeout"), Submit(2, 3600.0, ("b",))]),
    ("time limit: a timeout longer than the limit is blocked",
     HOUR, [Need("a", timeout=3590)], [],
     [Blocked("a", "timeout 3590s does not fit in an allocation's time limit (3600s, less 60s)")]),
    ("a running allocation ending too soon for the job: a new one",
     HOUR, [Need("a", timeout=600)],
     [Allocation("5", 2, "RUNNING", used=(1.0, 0.0), ends_at=NOW + 300)],
     [Submit(2, 3600.0, ("a",))]),
    ("idle past idle_timeout is given back; idle less long is kept",
     SPEC, [], [IDLE_OLD, IDLE_NEW], [Cancel("11", "idle for 300s")]),
    ("busy and pending allocations are never cancelled",
     SPEC, [], [BUSY, PENDING], []),
    ("min_vcpus keeps an idle allocation",
     dataclasses.replace(SPEC, min_vcpus=4), [], [IDLE_OLD], []),
    ("min_vcpus with nothing held: allocations up to the floor",
     dataclasses.replace(SPEC, min_vcpus=6), [], [], [Submit(2, None), Submit(2, None)]),
    ("desired_vcpus is a floor too; above it the longest idle goes",
     dataclasses.replace(SPEC, desired_vcpus=4), [],
     [IDLE_NEW, Allocation("10", 2, "RUNNING", idle_since=NOW - 900), IDLE_OLD],
     [Cancel("10", "idle for 300s"), Cancel("11", "idle for 300s")]),
    ("idle near its time limit: cancelled even at the floor; the floor asks anew",
     dataclasses.replace(HOUR, min_vcpus=4), [],
     [Allocation("7", 2, "RUNNING", idle_since=NOW - 10, ends_at=NOW + 30)],
     [Cancel("7", "idle, and its time limit is near")]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "needs", "allocations", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decide(
    spec: ManagedSpec, needs: list[Need], allocations: list[Allocation], expected: list[Action]
) -> None:
    assert decide(spec, 2, needs, allocations, NOW) == expected


def test_scale_up_run_scale_down_to_zero() -> None:
    """A 2-node job and an array on an empty environment: allocations come, the work
    runs, and once idle past idle_timeout everything is given back (min_vcpus = 0)."""
    needs = [Need("mpi", nodes=2, vcpus=2), *(Need(f"arr:{i}") for i in range(4))]
    first = decide(SPEC, 2, needs, [], NOW)
    assert first == [Submit(2, None, ("mpi",)), Submit(2, None, ("arr:0",))]
    held = [Allocation("1", 2, "PENDING"), Allocation("2", 2, "PENDING")]
    assert decide(SPEC, 2, needs, held, NOW + 5) == []  # the pending ones will do
    running = [Allocation("1", 2, "RUNNING", used=(2, 2)), Allocation("2", 2, "RUNNING",
               used=(2, 2))]  # fmt: skip
    assert decide(SPEC, 2, [], running, NOW + 10) == []
    done = [Allocation(a.alloc_id, 2, "RUNNING", idle_since=NOW + 60) for a in running]
    assert decide(SPEC, 2, [], done, NOW + 200) == []
    assert decide(SPEC, 2, [], done, NOW + 360) == [
        Cancel("1", "idle for 300s"),
        Cancel("2", "idle for 300s"),
    ]


def test_a_gang_is_not_split_over_two_allocations() -> None:
    spec = ManagedSpec(provider="slurm", max_vcpus=16, nodes=1)
    running = [
        Allocation("1", 1, "RUNNING", (0.0,), idle_since=0.0),
        Allocation("2", 1, "RUNNING", (0.0,), idle_since=0.0),
    ]
    actions = decide(spec, 2, [Need("g", 2, 1.0)], running, now=1.0)
    assert actions == [Submit(2, None, ("g",))]  # 2 idle single nodes do not make a gang
    # a single job after it takes one of the idle nodes: nothing more is submitted
    actions = decide(spec, 2, [Need("g", 2, 2.0), Need("s", 1, 2.0)], running, now=1.0)
    assert actions == [Submit(2, None, ("g",))]
