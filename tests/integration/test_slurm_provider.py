"""The Slurm provider against the real 4-node Slurm of slurm.py: an allocation is
submitted, runs, takes an agent started by the srun transport from outside it, and is
cancelled; a pending one says why; Slurm's own refusal comes back as a ProviderError."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from mnp.model import HostSpec, ManagedSpec
from mnp.provider.slurm import AllocationStatus, ProviderError, SlurmProvider, as_allocation
from mnp.sched.autoscale import Action, Allocation, Cancel, Need, Submit, decide
from mnp.transport.base import AgentConnection
from mnp.transport.srun import SrunTransport
from tests.integration.slurm import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]


async def _until(
    provider: SlurmProvider, alloc: str, phase: str, within: float = 60
) -> AllocationStatus:
    deadline = time.monotonic() + within
    while True:
        status = (await provider.poll([alloc]))[alloc]
        if status.phase == phase or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.3)


def test_allocation_lifecycle_with_an_agent_over_srun(slurm_cluster: SlurmCluster) -> None:
    slurm_cluster.wait_idle()
    provider = SlurmProvider(options=["--partition=debug"], environ=slurm_cluster.env)

    async def scenario() -> None:
        first = await provider.submit(2, 600, name="mnp-test-a")
        status = await _until(provider, first, "RUNNING")
        assert status.phase == "RUNNING", status
        assert len(status.nodes) == 2 and set(status.nodes) <= set(slurm_cluster.nodes)
        assert status.time_left is not None and 0 < status.time_left <= 600

        # the other two nodes: held by a second allocation; a third must wait for resources
        second = await provider.submit(2, None, name="mnp-test-b")
        assert (await _until(provider, second, "RUNNING")).phase == "RUNNING"
        third = await provider.submit(1, None, name="mnp-test-c")
        waiting = (await provider.poll([third]))[third]
        assert waiting.phase == "PENDING" and waiting.reason, waiting

        # an agent on the first allocation's node, as a step started from outside it
        node = status.nodes[1]
        transport = SrunTransport(first, environ=slurm_cluster.env)
        stream = await transport.open(HostSpec(name=node, address=node), ["--ctl", "t0k"])
        conn = AgentConnection(node, stream)
        facts = await conn.handshake(60)
        assert facts["ev"] == "ready"
        steps = slurm_cluster.run("squeue", "-s", "-h", "-j", first, "-o", "%j %N").stdout
        assert f"mnp-agent {node}" in steps

        await provider.cancel(first)
        ended = await _until(provider, first, "ENDED")
        assert ended.phase == "ENDED" and ended.state in ("CANCELLED", "COMPLETING", "GONE"), ended
        # the step died with its allocation: the agent's stream ends (host lost)
        assert await asyncio.wait_for(stream.readline(), 30) == b""
        await conn.close()
        # the freed nodes go to the waiting allocation
        assert (await _until(provider, third, "RUNNING")).phase == "RUNNING"
        for alloc in (second, third):
            await provider.cancel(alloc)
        await provider.cancel(first)  # already ended: not an error
        gone = await provider.poll([second, third, "999999"])
        assert all(s.phase in ("ENDED", "PENDING") for s in gone.values()), gone
        assert gone["999999"].state == "GONE"

    asyncio.run(scenario())
    slurm_cluster.wait_idle()


def test_slurm_refusal_is_a_provider_error(slurm_cluster: SlurmCluster) -> None:
    provider = SlurmProvider(options=["--partition=nosuch"], environ=slurm_cluster.env)
    with pytest.raises(ProviderError, match=r"^sbatch: .*(partition|Partition)"):
        asyncio.run(provider.submit(1, None))
    # Slurm accepts an allocation larger than the partition; it pends and says why
    too_big = SlurmProvider(environ=slurm_cluster.env)

    async def pending_forever() -> AllocationStatus:
        alloc = await too_big.submit(9, None)
        await asyncio.sleep(2)
        status = (await too_big.poll([alloc]))[alloc]
        await too_big.cancel(alloc)
        return status

    status = asyncio.run(pending_forever())
    assert status.phase == "PENDING" and status.reason.startswith("Partition"), status


def test_decisions_applied_to_slurm_scale_up_and_back_to_zero(
    slurm_cluster: SlurmCluster,
) -> None:
    """``autoscale.decide`` driving the real provider (as the controller will): a 2-node
    MPI job and 2 array children on an empty environment (nodes of 2 vCPUs, allocations
    of 1 node, max 8) get allocations; once they run and the work is done, idle past
    idle_timeout, everything is given back. ``now`` is a counter the test moves."""
    slurm_cluster.wait_idle()
    spec = ManagedSpec(provider="slurm", max_vcpus=8, nodes=1, idle_timeout=300.0)
    provider = SlurmProvider(environ=slurm_cluster.env)
    needs = [Need("mpi", nodes=2, vcpus=2), Need("arr:0"), Need("arr:1")]

    async def apply(actions: list[Action], held: list[str]) -> None:
        for act in actions:
            if isinstance(act, Submit):
                held.append(await provider.submit(act.nodes, act.time_limit, "mnp-auto"))
            elif isinstance(act, Cancel):
                await provider.cancel(act.alloc_id)
                held.remove(act.alloc_id)

    async def allocations(held: list[str], now: float, **kw: Any) -> list[Allocation]:
        polled = await provider.poll(held)
        return [a for s in polled.values() if (a := as_allocation(s, now, **kw))]

    async def scenario() -> None:
        held: list[str] = []
        first = decide(spec, 2, needs, [], 0.0)
        assert first == [Submit(2, None, ("mpi",)), Submit(1, None, ("arr:0",))]
        await apply(first, held)
        # what is pending or running covers the work: nothing more is submitted
        assert decide(spec, 2, needs, await allocations(held, 1.0), 1.0) == []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            polled = await provider.poll(held)
            if all(s.phase == "RUNNING" for s in polled.values()):
                break
            await asyncio.sleep(0.3)
        nodes = sorted(n for s in polled.values() for n in s.nodes)
        assert len(nodes) == 3 and set(nodes) <= set(slurm_cluster.nodes), polled
        # the work ran and ended at t=10: idle, but not for long enough
        idle = await allocations(held, 100.0, idle_since=10.0)
        assert [a.state for a in idle] == ["RUNNING", "RUNNING"]
        assert decide(spec, 2, [], idle, 100.0) == []
        # idle past idle_timeout: given back, down to zero
        late = decide(spec, 2, [], idle, 400.0)
        assert sorted(a.alloc_id for a in late if isinstance(a, Cancel)) == sorted(held)
        gone = list(held)
        await apply(late, held)
        assert held == []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(s.phase == "ENDED" for s in (await provider.poll(gone)).values()):
                break
            await asyncio.sleep(0.3)
        assert await allocations(gone, 500.0) == []

    asyncio.run(scenario())
    slurm_cluster.wait_idle()
