"""The managed environments' pure rules (mnp.controller.managed): which environment a
job asks capacity of, and whether one could ever run it."""

from __future__ import annotations

import pytest

from mnp.controller.managed import could_run_managed, owner_ce
from mnp.model import ComputeEnvironment, Inventory, ManagedSpec, Queue
from mnp.sched.autoscale import Need

SLURM = ManagedSpec(provider="slurm", max_vcpus=8, vcpus_per_node=2, time_limit=3600.0)
OPEN = ManagedSpec(provider="slurm", max_vcpus=4)


def inventory(burst_state: str = "ENABLED") -> Inventory:
    return Inventory(
        source="<test>",
        hosts=(),
        compute_environments={
            "own": ComputeEnvironment("own", ()),
            "burst": ComputeEnvironment("burst", (), state=burst_state, managed=SLURM),
            "open": ComputeEnvironment("open", (), managed=OPEN),
        },
        queues={
            "mixed": Queue("mixed", 1, ("own", "burst", "open")),
            "plain": Queue("plain", 1, ("own",)),
            "openonly": Queue("openonly", 1, ("open",)),
        },
    )


@pytest.mark.parametrize(
    ("state", "queue", "owner"),
    [
        ("ENABLED", "mixed", "burst"),  # the first managed one in the queue's order
        ("DISABLED", "mixed", "open"),  # a DISABLED one asks for nothing
        ("ENABLED", "plain", None),
        ("ENABLED", "nosuch", None),
    ],
)
def test_owner(state: str, queue: str, owner: str | None) -> None:
    assert owner_ce(inventory(state), queue) == owner


@pytest.mark.parametrize(
    ("queue", "need", "known", "ok"),
    [
        ("mixed", Need("a", 2, 1.0, 600.0), {}, True),
        ("mixed", Need("a", 1, 1.0, None), {}, True),  # burst: no timeout; open takes it
        ("mixed", Need("a", 3, 1.0, None), {"open": 2}, False),  # burst: no timeout; open: too big
        ("openonly", Need("a", 1, 1.0, None), {}, True),  # no time limit: no timeout needed
        ("openonly", Need("a", 1, 3.0, None), {}, True),  # node size not known yet
        ("openonly", Need("a", 1, 3.0, None), {"open": 2}, False),  # 2 vCPU nodes
        ("openonly", Need("a", 3, 1.0, None), {"open": 2}, False),  # 3 nodes > max_vcpus 4
        ("mixed", Need("a", 1, 1.0, 3600.0), {}, True),  # too long for burst; open takes it
        ("plain", Need("a", 1, 1.0, 60.0), {}, False),
    ],
)
def test_could_run_managed(queue: str, need: Need, known: dict[str, int], ok: bool) -> None:
    assert could_run_managed(inventory(), queue, need, known) is ok
