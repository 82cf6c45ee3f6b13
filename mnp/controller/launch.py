"""Launching: what the agents are sent for a placed attempt, and what must be asked first.

``Launcher`` turns a placement (the grants of a ``Start``) into each task's argv,
environment and files -- the pure wiring of ``mnp.wiring`` -- and asks for what the
wiring needs beforehand, all off the event loop or by message: the job's secrets
(read on threads of their own, bounded in size and time), the main node's free port
(its agent, through the ``HostPool``) and its IPv4 address (the resolver). It starts
nothing: the ``Starter`` (``starting``) registers each task and sends its spawn.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import socket
import time
from dataclasses import replace
from typing import Any

from mnp.controller.hosts import HostPool
from mnp.jobs import Attempt, Job, NodeRun, TaskRun
from mnp.model import Grant, Inventory, JobDefinition
from mnp.offloop import FileRefused, OffLoop, read_regular_file
from mnp.pmi.world import init_within, plan
from mnp.spec.fields import MAX_ARG_BYTES
from mnp.wiring import (
    Launch,
    NodePlacement,
    hostfile_mpich,
    hostfile_ompi,
    node_command,
    substitute,
    task_environment,
    task_id,
)

log = logging.getLogger("mnp")

IPV4_WITHIN = 5.0  # seconds a main node's address may take to resolve
IPV4_FRESH = 60.0  # seconds a resolved address is reused
SECRET_MAX_BYTES = MAX_ARG_BYTES
"""The largest secret: what one environment variable can hold (Linux MAX_ARG_STRLEN)."""
SECRET_READ_TIMEOUT = 10.0
"""Seconds a secret file may take to read (off the loop) before its job fails."""


class LaunchError(Exception):
    """An attempt cannot start: its message is the reason it fails with."""


def ipv4_literal(address: str) -> str | None:
    """``address`` if it is an IPv4 address as written (``10.0.0.1``), else None."""
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        return None


Spawn = tuple[TaskRun, list[str], dict[str, str], list[dict[str, Any]] | None]
"""A task to start: its record, argv, environment (secrets not yet in) and files."""


class Launcher:
    def __init__(self, inventory: Inventory, hosts: HostPool) -> None:
        self.inventory = inventory
        self.hosts = hosts
        self._ipv4: dict[str, tuple[str | None, float]] = {}  # address -> (IPv4, when)
        # what may block (secret files) runs here, never on the loop
        self._offloop = OffLoop(4, "mnp-secrets")

    def close(self) -> None:
        self._offloop.close()

    def single(self, job: Job, attempt: Attempt, grant: Grant) -> Spawn:
        """The one task of a single job or array child, placed by ``grant``."""
        defn = job.defn
        array_size = defn.array.size if defn.array is not None and job.parent else None
        launch = Launch(
            job_id=job.id,
            job_name=defn.name,
            attempt=attempt.number,
            queue=defn.queue,
            ce=attempt.ce,
            array_index=job.array_index,
            array_size=array_size,
            host=grant.host,
            gpus=grant.gpus,
            host_has_gpus=bool(self.hosts.capacity[grant.host].gpus),
            cpus=grant.cpus,
        )
        attempt.launch = launch
        env = task_environment(defn, launch)
        argv = substitute(defn.command, defn.parameters, keep=defn.secrets)
        return TaskRun(launch.job_id, grant.host), argv, env, None

    async def nodes(self, job: Job, attempt: Attempt) -> bool:
        """Prepare a multi-node attempt: its IPv4 address (``aws_batch_env``), the
        secrets and, where the main node's agent cannot pick it at the spawn, the main
        node's port, asked at once; then wire every node (``attempt``'s ``launch`` and
        ``nodes``). False when the attempt ended meanwhile.

        The main node's agent picks MASTER_PORT itself when the main node runs a command
        and the agent takes a spawn's ``port_env`` (its ``ready`` lists the feature):
        its tasks' spawns carry ``port_env``, its ``started`` says the port, and the
        other nodes are wired with it (``Attempts``), one round trip fewer before the
        main node starts. A held main node, or an older agent, is asked with ``port``."""
        defn = job.defn
        mn = defn.multinode
        assert mn is not None
        main_host = attempt.grants[mn.main_node].host
        want_ipv4 = defn.aws_batch_env and mn.num_nodes > 1
        main_group = mn.group_of(mn.main_node)[1]
        if node_command(defn, main_group, mn.main_node) is not None and self._takes(
            main_host, "port_env"
        ):
            attempt.port_key = f"{job.id}.{attempt.number}"
        port, main_ipv4, secrets = await asyncio.gather(
            _none() if attempt.port_key else self.hosts.free_port(main_host),
            self.ipv4_of(self.inventory.host(main_host).address) if want_ipv4 else _none(),
            self.secrets(defn) if defn.secrets else _no_secrets(),
        )
        attempt.secrets = secrets
        if attempt.ending or job.attempt is not attempt:
            return False
        placements = []
        for i, grant in enumerate(attempt.grants):
            gi, group = mn.group_of(i)
            placements.append(
                NodePlacement(
                    index=i,
                    host=grant.host,
                    address=self.inventory.host(grant.host).address,
                    slots=group.tasks_per_node,
                    group=gi,
                    gpus=grant.gpus,
                    host_has_gpus=bool(self.hosts.capacity[grant.host].gpus),
                    cpus=grant.cpus,
                )
            )
        attempt.launch = Launch(
            job_id=job.id,
            job_name=defn.name,
            attempt=attempt.number,
            queue=defn.queue,
            ce=attempt.ce,
            nodes=tuple(placements),
            main_node=mn.main_node,
            main_ipv4=main_ipv4,
            master_port=port,
        )
        # the ranks of its mpi = "pmi" groups (direct MPI launch): one world per attempt
        attempt.mpi = plan(
            defn,
            job.id,
            attempt.number,
            [g.host for g in attempt.grants],
            init_within(os.environ),
        )
        for p in placements:
            held = node_command(defn, mn.groups[p.group], p.index) is None
            attempt.nodes.append(NodeRun(job, p.index, p.host, p.group, held))
        return True

    def _takes(self, host: str, feature: str) -> bool:
        """Whether the agent on ``host`` lists ``feature`` in its ``ready``."""
        conn = self.hosts.agents.get(host)
        return conn is not None and feature in (conn.facts.get("features") or ())

    def node(self, job: Job, attempt: Attempt, node: NodeRun) -> list[Spawn]:
        """The tasks of one node that runs a command (``tasks_per_node`` of them); the
        first also writes the hostfiles into the node's run directory."""
        defn = job.defn
        mn = defn.multinode
        assert mn is not None and attempt.launch is not None
        group = mn.groups[node.group]
        argv = node_command(defn, group, node.index)
        assert argv is not None
        conn = self.hosts.agents.get(node.host)
        rundir = str((conn.facts if conn is not None else {}).get("rundir") or "/tmp")
        base = f"{rundir}/{job.id}.{attempt.number}"
        nodes = attempt.launch.nodes
        launch = replace(
            attempt.launch, hostfile=f"{base}/hostfile", hostfile_ompi=f"{base}/hostfile.ompi"
        )
        files = [
            {"path": launch.hostfile, "data": hostfile_mpich(nodes)},
            {"path": launch.hostfile_ompi, "data": hostfile_ompi(nodes)},
        ]
        out: list[Spawn] = []
        for t in range(group.tasks_per_node):
            env = task_environment(defn, launch, node.index, t)
            tid = task_id(launch, node.index, t, group.tasks_per_node)
            task = TaskRun(tid, node.host, node_index=node.index, task_index=t)
            out.append((task, list(argv), env, files if t == 0 else None))
        return out

    def container(self, job: Job, task: TaskRun, env: dict[str, str]) -> dict[str, Any] | None:
        """The spawn message's ``container`` for ``task`` (PROTOCOL.md), or None when
        it runs bare: the image of its node's group (the group's wins) or of the job,
        its GPUs (host indices; the agent's runtime maps them), and the node's hostfile
        directory mounted read-only at the same path, so ``$MNP_HOSTFILE`` reads inside."""
        c = job.defn.container_for(task.node_index)
        if c is None:
            return None
        mounts = [m.spec() for m in c.mounts]
        hostfile = env.get("MNP_HOSTFILE")
        if hostfile:
            folder = os.path.dirname(hostfile)
            mounts.insert(0, f"{folder}:{folder}:ro")
        gpus: list[int] = []
        cap = self.hosts.capacity.get(task.host)
        visible = env.get("CUDA_VISIBLE_DEVICES", "")
        if cap is not None and cap.gpus and visible:
            gpus = [int(g) for g in visible.split(",") if g.isdigit()]
        return {
            "image": c.image,
            "runtime": c.runtime,
            "mounts": mounts,
            "options": list(c.options),
            "gpus": gpus,
        }

    async def secrets(self, defn: JobDefinition) -> dict[str, str]:
        """The values of the job's ``[secrets]``, read now (at each launch), off the loop.

        ``LaunchError`` names the secret and its file or variable, never its value:
        a file that is not a regular file (a FIFO would block), larger than an
        environment variable can hold, not UTF-8 text, holding a NUL, or that takes
        longer than ``SECRET_READ_TIMEOUT`` to read."""
        out: dict[str, str] = {}
        for name, ref in defn.secrets.items():
            if ref.file is not None:
                path = ref.file
                where = f"secret {name}: file {path}"
                try:
                    data = await self._offloop.run(
                        functools.partial(read_regular_file, path, SECRET_MAX_BYTES),
                        SECRET_READ_TIMEOUT,
                    )
                except FileRefused as e:
                    raise LaunchError(f"{where}: cannot be read: {e}") from None
                except TimeoutError:
                    raise LaunchError(
                        f"{where}: not read within {SECRET_READ_TIMEOUT:g}s"
                    ) from None
                try:
                    value = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise LaunchError(
                        f"{where}: not UTF-8 text; a secret must be UTF-8 text"
                    ) from None
                value = value.rstrip("\n")
            elif ref.env is not None:
                where = f"secret {name}: ${ref.env}"
                if ref.env not in os.environ:
                    raise LaunchError(f"{where} is not set for the controller")
                value = os.environ[ref.env]
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise LaunchError(
                        f"{where}: not UTF-8 text; a secret must be UTF-8 text"
                    ) from None
            else:
                continue
            if "\0" in value:
                raise LaunchError(
                    f"{where}: holds a NUL byte, which no environment variable can hold"
                )
            out[name] = value
        return out

    async def ipv4_of(self, address: str) -> str | None:
        """``address`` as an IPv4 address (for AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS):
        itself if it is one, else the first IPv4 address the controller's resolver gives
        (``loop.getaddrinfo``: the loop is not blocked), remembered for ``IPV4_FRESH``
        seconds. None (and a warning, once per address) when there is none within
        ``IPV4_WITHIN`` seconds: the task then gets the address as written."""
        found = ipv4_literal(address)
        if found is not None:
            return found
        now = time.monotonic()
        cached = self._ipv4.get(address)
        if cached is not None and now - cached[1] < IPV4_FRESH:
            return cached[0]
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(
                    address, None, family=socket.AF_INET, type=socket.SOCK_STREAM
                ),
                IPV4_WITHIN,
            )
            found = str(infos[0][4][0]) if infos else None
            why = "no IPv4 address"
        except (OSError, TimeoutError, UnicodeError) as e:
            why = f"{e.__class__.__name__}: {e}"
        if found is None and address not in self._ipv4:
            log.warning(
                "%s: cannot resolve to an IPv4 address (%s); "
                "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS gets it as written",
                address,
                why,
            )
        self._ipv4[address] = (found, now)
        return found


async def _none() -> None:
    return None


async def _no_secrets() -> dict[str, str]:
    return {}
