"""The controller puts a task's container into its spawn message (issue 14): the image of
its node's group (the group's wins), the hostfile directory mounted read-only first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mnp.controller import Controller
from mnp.model import ComputeEnvironment, HostSpec, Inventory, Queue
from mnp.spec import definition_from_command, parse_definition
from mnp.transport import fake as fakemod
from mnp.transport.fake import FakeTransport, started

HOSTS = ("h0", "h1", "h2")


def inventory(gpus: int = 0) -> Inventory:
    specs = tuple(
        HostSpec(name=h, address=h, vcpus=2, memory=1 << 33, gpus=gpus, transport="fake")
        for h in HOSTS
    )
    return Inventory(
        "fake",
        specs,
        {"default": ComputeEnvironment("default", HOSTS)},
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
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_bare_job_has_no_container(ctl: Controller, fake: FakeTransport) -> None:
    fake.handler = fakemod.hold
    ctl.submit(definition_from_command(["true"]))
    await settle()
    (spawn,) = fake.ops(op="spawn")
    assert "container" not in spawn


async def test_single_job_spawn_carries_its_container(ctl: Controller, fake: FakeTransport) -> None:
    fake.handler = fakemod.hold
    ctl.submit(definition_from_command(["true"], image="localhost/a:1", mounts=("/d:/d:ro",)))
    await settle()
    (spawn,) = fake.ops(op="spawn")
    assert spawn["container"] == {
        "image": "localhost/a:1",
        "runtime": "auto",
        "mounts": ["/d:/d:ro"],
        "options": [],
        "gpus": [],  # the fake hosts have none
    }


async def test_each_node_gets_its_groups_image_and_the_hostfile_folder(
    ctl: Controller, fake: FakeTransport
) -> None:
    defn = parse_definition(
        {
            "name": "c",
            "command": ["true"],
            "container": {"image": "localhost/main:1"},
            "multinode": {
                "num_nodes": 3,
                "groups": [
                    {"target_nodes": "0", "command": ["true"]},
                    {
                        "target_nodes": "1:2",
                        "command": ["true"],
                        "container": {"image": "localhost/worker:1", "runtime": "podman"},
                    },
                ],
            },
        },
        "c.toml",
    )
    fake.handler = fakemod.hold
    job = ctl.submit(defn)
    await settle()
    fake.push(fake.host_of(f"{job.id}#0"), started(f"{job.id}#0"))
    await settle()
    spawns = {m["tid"]: m for m in fake.ops(op="spawn")}
    assert sorted(spawns) == [f"{job.id}#{i}" for i in range(3)]
    for i in range(3):
        msg = spawns[f"{job.id}#{i}"]
        c = msg["container"]
        assert c["image"] == ("localhost/main:1" if i == 0 else "localhost/worker:1")
        assert c["runtime"] == ("auto" if i == 0 else "podman")
        folder = msg["env"]["MNP_HOSTFILE"].rsplit("/", 1)[0]
        assert c["mounts"] == [f"{folder}:{folder}:ro"]


async def test_gpus_are_the_tasks_host_indices(fake: FakeTransport) -> None:
    c = Controller(inventory(gpus=4), {"fake": fake}, heartbeat=(3600.0, 7200.0))
    await c.start()
    try:
        fake.handler = fakemod.hold
        c.submit(definition_from_command(["true"], image="img", gpus=2))
        c.submit(definition_from_command(["true"], image="img", gpus=2))
        c.submit(definition_from_command(["true"], image="img", gpus=1))
        await settle()
        spawns = fake.ops(op="spawn")
        assert len(spawns) == 3
        for msg in spawns:
            visible = msg["env"]["CUDA_VISIBLE_DEVICES"]
            assert msg["container"]["gpus"] == [int(g) for g in visible.split(",")]
        # two jobs on one host never share a GPU
        by_host: dict[str, list[int]] = {}
        for msg in spawns:
            host = fake.host_of(msg["tid"])
            by_host.setdefault(host, []).extend(msg["container"]["gpus"])
        for held in by_host.values():
            assert len(held) == len(set(held))
    finally:
        await c.close()
