"""Managed compute environments on the real 4-node Slurm of slurm.py: the controller
submits allocations for RUNNABLE work, runs the work on the allocations' nodes over the
srun transport, gives them back after idle_timeout, and treats an allocation cancelled
under a job as host loss (the job is retried on another allocation)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mnp.controller import Controller
from mnp.controller.managed import Provider
from mnp.jobs import Job
from mnp.model import JobState, ManagedSpec
from mnp.provider.slurm import SlurmProvider
from mnp.spec import apply_overrides, load_definition, parse_definition, parse_inventory
from mnp.transport.base import Transport
from mnp.transport.srun import SrunTransport, allocation_vars
from tests.helpers import allocs, until
from tests.integration.slurm import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def inventory(idle: str = "3s", time_limit: str = "30m") -> Any:
    return parse_inventory(
        {
            "compute_environments": {
                "burst": {
                    "type": "MANAGED",
                    "provider": "slurm",
                    "min_vcpus": 0,
                    "max_vcpus": 8,
                    "idle_timeout": idle,
                    "allocation": {
                        "nodes": 1,
                        "time_limit": time_limit,
                        "vcpus_per_node": 2,
                        "options": ["--partition=debug"],
                    },
                }
            },
            "queues": {"default": {"compute_environments": ["burst"]}},
        },
        "<test>",
    )


def controller(cluster: SlurmCluster, changes: list[dict[str, Any]]) -> Controller:
    def providers(_name: str, spec: ManagedSpec) -> Provider:
        return SlurmProvider(spec.options, environ=cluster.env)

    def transport(_p: Provider, alloc: str, nodes: Sequence[str]) -> Transport:
        return SrunTransport(alloc, environ=cluster.env, job_env=allocation_vars(nodes))

    return Controller(
        inventory(),
        {},
        providers=providers,
        managed_transport=transport,
        managed_interval=0.5,
        on_change=changes.append,
    )


@pytest.fixture
async def managed(slurm_cluster: SlurmCluster) -> AsyncIterator[tuple[Controller, list[Any]]]:
    slurm_cluster.wait_idle()
    changes: list[dict[str, Any]] = []
    c = controller(slurm_cluster, changes)
    await c.start()
    try:
        yield c, changes
    finally:
        await c.close()
        slurm_cluster.wait_idle()


async def done(c: Controller, job: Job, within: float = 120) -> Job:
    try:
        return await asyncio.wait_for(c.wait(job), within)
    except TimeoutError:
        raise AssertionError(
            f"job {job.id} {job.state} {job.reason}: {c.changes} {c.host_errors} {c.managed.errors}"
        ) from None


def squeue(cluster: SlurmCluster) -> str:
    return cluster.run("squeue", "-h", "-o", "%i %j %T %N").stdout


async def test_scales_up_for_mpi_and_an_array_then_back_to_zero(
    managed: tuple[Controller, list[Any]], slurm_cluster: SlurmCluster
) -> None:
    c, changes = managed
    assert c.inventory.hosts == () and allocs(c) == []
    mpi = apply_overrides(load_definition(ROOT / "nodegroups/mpi-hello.toml"), nodes=2)
    mpi = dataclasses.replace(mpi, cwd=str(ROOT))
    out: list[str] = []
    c.on_output = lambda _j, _t, _fd, text: out.append(text)
    mjob = c.submit(mpi)
    array = c.submit(
        parse_definition(
            {
                "name": "arr",
                "command": ["sh", "-c", 'echo "child $MNP_ARRAY_INDEX on $SLURMD_NODENAME"'],
                "array": {"size": 4},
                "timeout": {"attempt_duration": "5m"},
            },
            "<test>",
        )
    )
    try:
        await done(c, mjob, 40)
    except AssertionError as e:
        raise AssertionError(f"{e}\noutput: {''.join(out)}") from None
    await done(c, array, 180)
    text = "".join(out)
    assert mjob.state is JobState.SUCCEEDED, (mjob.reason, text)
    assert array.state is JobState.SUCCEEDED, (array.reason, text)
    assert "allreduce ok: sum of ranks = 1; 2 distinct nodes" in text, text
    assert all(f"child {i} on n" in text for i in range(4)), text
    started = [a for a in allocs(c) if a["started"] is not None]
    assert started and all(a["id"].isdigit() for a in started), allocs(c)
    # idle for idle_timeout (3 s): every allocation is given back, the hosts go
    await until(
        lambda: all(a["state"] == "ENDED" for a in allocs(c)) and not c.inventory.hosts,
        60,
        f"back to zero: {allocs(c)}",
    )
    assert "mnp-burst" not in squeue(slurm_cluster)
    states = [(ch["allocation"], ch["state"]) for ch in changes if ch["kind"] == "allocation"]
    assert {s for _a, s in states} >= {"PENDING", "RUNNING", "CANCELLING", "ENDED"}, states


async def test_allocation_cancelled_mid_job_is_host_loss_and_retried(
    managed: tuple[Controller, list[Any]], slurm_cluster: SlurmCluster
) -> None:
    c, _changes = managed
    job = c.submit(
        parse_definition(
            {
                "name": "longish",
                "command": ["sh", "-c", "echo on $SLURMD_NODENAME; sleep 6"],
                "retry": {"attempts": 5},  # Slurm may kill the task before the step ends
                "timeout": {"attempt_duration": "5m"},
            },
            "<test>",
        )
    )
    await until(lambda: job.state is JobState.RUNNING, 120, "first attempt running")
    first = [a for a in allocs(c) if a["state"] == "RUNNING"]
    assert len(first) == 1, allocs(c)
    slurm_cluster.run("scancel", first[0]["id"])
    await done(c, job, 180)
    assert job.state is JobState.SUCCEEDED, job.reason
    reasons = [a.reason for a in job.attempts]
    assert len(job.attempts) >= 2, reasons
    assert any("Host lost: n" in (r or "") for r in reasons[:-1]), reasons
    ended = next(a for a in allocs(c) if a["id"] == first[0]["id"])
    # COMPLETING: Slurm's view of a cancelled job while its nodes are cleaned up (seen
    # on a loaded machine); the allocation holds no nodes for mnp either way
    assert ended["state"] == "ENDED"
    assert ended["scheduler_state"] in ("CANCELLED", "COMPLETING", "GONE"), ended
    assert len({a["id"] for a in allocs(c)}) >= 2


async def test_stop_cancels_owned_allocations(slurm_cluster: SlurmCluster) -> None:
    slurm_cluster.wait_idle()
    c = controller(slurm_cluster, [])
    await c.start()
    c.update_ce("burst", desired_vcpus=4)  # keep 2 nodes warm
    await until(lambda: sum(a["state"] == "RUNNING" for a in allocs(c)) == 2, 90, "warm")
    ids = [a["id"] for a in allocs(c)]
    await c.close()
    out = slurm_cluster.run("squeue", "-h", "-j", ",".join(ids), "-o", "%i %T").stdout
    assert "RUNNING" not in out and "PENDING" not in out, out
    slurm_cluster.wait_idle()
