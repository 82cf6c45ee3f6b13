"""The Slurm provider against the real 4-node Slurm of slurm.py: an allocation is
submitted, runs, takes an agent started by the srun transport from outside it, and is
cancelled; a pending one says why; Slurm's own refusal comes back as a ProviderError."""

from __future__ import annotations

import asyncio
import time

import pytest

from mnp.model import HostSpec
from mnp.provider.slurm import AllocationStatus, ProviderError, SlurmProvider
from mnp.transport.base import AgentConnection
from mnp.transport.srun import SrunTransport
from tests.integration.slurm import SlurmCluster

pytestmark = pytest.mark.timeout(240)


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
