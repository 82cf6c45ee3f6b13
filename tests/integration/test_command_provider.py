"""Managed compute environments with ``provider = "command"`` (issue 15): the start
program brings up real OpenSSH servers on loopback (the sshd.py servers, stopped first)
and prints their names and addresses; the stop program stops the hosts it is given. The
controller starts hosts for a 2-node job and an array, runs them there over SSH, gives
the hosts back after idle_timeout; a failing start shows in ``mnp ce``."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mnp.controller import Controller
from mnp.model import ComputeEnvironment, Inventory, JobState, ManagedSpec, Queue
from mnp.spec import apply_overrides, parse_definition
from tests.helpers import allocs, until
from tests.integration.conftest import SSH_TRANSPORTS, SshdFactory
from tests.integration.sshd import SSHD, SshdCluster

pytestmark = [pytest.mark.timeout(180)]
SERVERS = 3  # 127.0.3.2-4

START = r"""
import json, os, signal, socket, subprocess, sys, time
state = json.load(open(sys.argv[1]))
nodes = int(os.environ["MNP_NODES"])
with open(state["log"], "a") as log:
    log.write("start %d %s\n" % (nodes, os.environ["MNP_ALLOCATION"]))
if state.get("fail"):
    sys.exit("no capacity in this region")
up = []
for h in state["hosts"]:
    pid = os.path.join(state["dir"], h["name"] + ".pid")
    if os.path.exists(pid) or len(up) == nodes:
        continue
    quiet = subprocess.DEVNULL
    p = subprocess.Popen([state["sshd"], "-D", "-e", "-f", h["config"]], stdin=quiet,
                         stdout=quiet, stderr=quiet, start_new_session=True)
    open(pid, "w").write(str(p.pid))
    up.append(h)
for h in up:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((h["address"], h["port"]), 1).recv(4)
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("sshd on %s does not answer" % h["address"])
            time.sleep(0.05)
    print(h["name"], h["address"])
"""

STOP = r"""
import json, os, signal, sys
state = json.load(open(sys.argv[1]))
for name in sys.argv[2:]:
    pid = os.path.join(state["dir"], name + ".pid")
    try:
        os.killpg(int(open(pid).read()), signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.unlink(pid)
    with open(state["log"], "a") as log:
        log.write("stop %s %s\n" % (name, os.environ["MNP_ALLOCATION"]))
"""


@pytest.fixture(params=SSH_TRANSPORTS)
def servers(sshd_factory: SshdFactory, request: pytest.FixtureRequest) -> Iterator[SshdCluster]:
    """The servers, stopped: the start program brings them up (hosts reached with each
    SSH client in turn)."""
    cluster = sshd_factory(SERVERS).with_transport(request.param)
    for h in cluster.hosts:
        cluster.stop(h.name)
    try:
        yield cluster
    finally:
        for h in cluster.hosts:
            cluster.start_host(h.name)


def programs(cluster: SshdCluster, tmp: Path, fail: bool = False) -> tuple[Path, Path, Path]:
    state = {
        "dir": str(tmp),
        "log": str(tmp / "calls.log"),
        "sshd": SSHD,
        "fail": fail,
        "hosts": [
            {"name": h.name, "address": h.address, "port": h.port, "config": str(h.config)}
            for h in cluster.hosts
        ],
    }
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "start.py").write_text(START)
    (tmp / "stop.py").write_text(STOP)
    return tmp / "state.json", tmp / "start.py", tmp / "stop.py"


def inventory(cluster: SshdCluster, tmp: Path, fail: bool = False) -> Inventory:
    state, start, stop = programs(cluster, tmp, fail)
    spec = ManagedSpec(
        provider="command",
        max_vcpus=6,
        min_vcpus=0,
        idle_timeout=2.0,
        nodes=1,
        vcpus_per_node=2,
        start=(sys.executable, str(start), str(state)),
        stop=(sys.executable, str(stop), str(state)),
    )
    return Inventory(
        source="<test>",
        hosts=(),
        compute_environments={"cloud": ComputeEnvironment("cloud", (), managed=spec)},
        queues={"default": Queue("default", 1, ("cloud",))},
        ssh=cluster.ssh_options(),
    )


def running(cluster: SshdCluster, tmp: Path) -> list[str]:
    return sorted(h.name for h in cluster.hosts if (tmp / f"{h.name}.pid").exists())


async def test_scales_up_for_a_gang_and_an_array_then_back_to_zero(
    servers: SshdCluster, tmp_path: Path
) -> None:
    changes: list[dict[str, Any]] = []
    c = Controller(inventory(servers, tmp_path), {}, managed_interval=0.5, on_change=changes.append)
    out: list[str] = []
    c.on_output = lambda _j, _t, _fd, text: out.append(text)
    await c.start()
    try:
        assert c.inventory.hosts == () and running(servers, tmp_path) == []
        gang = apply_overrides(
            parse_definition(
                {"name": "gang", "command": ["sh", "-c", "echo node $MNP_NODE_INDEX up"]},
                "<test>",
            ),
            nodes=2,
        )
        gjob = c.submit(gang)
        array = c.submit(
            parse_definition(
                {
                    "name": "arr",
                    "command": ["sh", "-c", 'echo "child $MNP_ARRAY_INDEX"'],
                    "array": {"size": 3},
                },
                "<test>",
            )
        )
        for job in (gjob, array):
            await asyncio.wait_for(c.wait(job), 120)
        text = "".join(out)
        assert gjob.state is JobState.SUCCEEDED, (gjob.reason, text, c.managed.errors)
        assert array.state is JobState.SUCCEEDED, (array.reason, text)
        assert all(f"child {i}" in text for i in range(3)), text
        started = [a for a in allocs(c) if a["started"] is not None]
        assert started and all(a["id"].startswith("cmd-cloud-") for a in started), allocs(c)
        used = {n for a in started for n in a["nodes"]}
        assert used <= set(servers.names) and len(used) >= 2, used
        # idle for idle_timeout: each allocation is stopped with its own hosts
        await until(
            lambda: all(a["state"] == "ENDED" for a in allocs(c)) and not c.inventory.hosts,
            60,
            f"back to zero: {allocs(c)}",
        )
        assert running(servers, tmp_path) == []
        calls = (tmp_path / "calls.log").read_text().splitlines()
        stops = sorted(line.split()[1:] for line in calls if line.startswith("stop "))
        given = sorted([n, a["id"]] for a in started for n in a["nodes"])
        assert stops == given, (calls, allocs(c))
        assert any(line.startswith("start ") for line in calls), calls
        ended = {a["id"]: a for a in allocs(c)}
        for a in started:
            assert ended[a["id"]]["scheduler_state"] == "STOPPED", ended[a["id"]]
    finally:
        await c.close()


async def test_failing_start_is_shown_and_the_controller_keeps_going(
    servers: SshdCluster, tmp_path: Path
) -> None:
    c = Controller(inventory(servers, tmp_path, fail=True), {}, managed_interval=0.3)
    await c.start()
    try:
        job = c.submit(parse_definition({"name": "one", "command": ["true"]}, "<test>"))
        await until(lambda: bool(c.managed.errors.get("cloud")), 30, "start error shown")
        view = c.managed.views()[0]
        assert "start failed" in view["error"] and "no capacity in this region" in view["error"]
        assert job.state is JobState.RUNNABLE, job.state
        # backoff: the next try waits (5 s), not every pass
        await asyncio.sleep(2)
        calls = (tmp_path / "calls.log").read_text().splitlines()
        assert len(calls) == 1, calls
        # capacity comes back: the job runs on the next try
        state = json.loads((tmp_path / "state.json").read_text())
        state["fail"] = False
        (tmp_path / "state.json").write_text(json.dumps(state))
        await asyncio.wait_for(c.wait(job), 60)
        assert job.state is JobState.SUCCEEDED, job.reason
        assert "cloud" not in c.managed.errors
    finally:
        await c.close()
    assert running(servers, tmp_path) == []
