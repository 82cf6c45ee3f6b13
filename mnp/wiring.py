"""The task environment and command line (SPEC §5): pure functions, no I/O.

Given a job definition and where its attempt was placed, say exactly what one
task sees: its argv (``Ref::`` parameters substituted, protected from the
node-side ``$VAR`` expansion), its environment (``MNP_*``, hostfiles, the
torch.distributed names, CUDA, optional ``AWS_BATCH_*``) and the hostfiles'
contents. The controller only ships what this module returns.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from mnp.jobid import JobId
from mnp.model import JobDefinition, JobType, NodeGroup

_REF = re.compile(r"Ref::([A-Za-z0-9_]+)")
# what the agent's expansion takes (mnp/agent/expand.py): `$$`, `${NAME}`, `$NAME`
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class NodePlacement:
    """One node of a multi-node attempt: where it runs and what it was given."""

    index: int
    host: str
    address: str
    slots: int  # tasks started on it (its group's tasks_per_node)
    group: int
    gpus: tuple[int, ...] = ()  # allocated GPU indices on its host
    host_has_gpus: bool = False
    cpus: tuple[int, ...] = ()  # CPU ids it is pinned to (cpu_bind = "cores")


@dataclass(frozen=True)
class Launch:
    """What is fixed for one attempt of one job (or array child)."""

    job_id: str  # "42", "42:7"
    job_name: str
    attempt: int
    queue: str
    ce: str
    array_index: int | None = None
    array_size: int | None = None
    nodes: tuple[NodePlacement, ...] = ()  # multi-node only, in node order
    main_node: int = 0
    main_ipv4: str | None = None  # the main node's address as IPv4, resolved by the controller
    master_port: int | None = None
    hostfile: str | None = None  # paths on the nodes
    hostfile_ompi: str | None = None
    host: str = ""  # single/array: where it runs
    gpus: tuple[int, ...] = ()  # single/array: allocated GPU indices
    host_has_gpus: bool = False
    cpus: tuple[int, ...] = ()  # single/array: CPU ids it is pinned to (cpu_bind = "cores")


def substitute(
    command: Sequence[str], parameters: Mapping[str, str], keep: Collection[str] = ()
) -> list[str]:
    """Replace ``Ref::name`` by the parameter's value, escaped so that the agent's
    ``$VAR`` expansion leaves it as it is (``$`` → ``$$``).

    ``$NAME`` and ``${NAME}`` of a name in ``keep`` (the job's secrets) are escaped
    too: they reach the program as written, for it (or its shell) to read the value
    from its environment. A secret's value is never put into a command line, which
    every user of the node can read (``ps``, ``/proc/PID/cmdline``)."""

    def param(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in parameters:
            return m.group(0)
        return parameters[name].replace("$", "$$")

    def secret(m: re.Match[str]) -> str:
        name = m.group(2) or m.group(3)
        return "$" + m.group(0) if name in keep else m.group(0)

    out = []
    for arg in command:
        if "Ref::" in arg:
            arg = _REF.sub(param, arg)
        if keep and "$" in arg:
            arg = _VAR.sub(secret, arg)
        out.append(arg)
    return out


def node_command(defn: JobDefinition, group: NodeGroup, node_index: int) -> list[str] | None:
    """The argv a node runs, or None when it is held for the main node's use."""
    command = group.command
    if command is None and defn.multinode is not None and node_index == defn.multinode.main_node:
        command = defn.command or None
    if command is None:
        return None
    return substitute(command, defn.parameters, keep=defn.secrets)


def hostfile_mpich(nodes: Sequence[NodePlacement]) -> str:
    return "".join(f"{n.address}:{n.slots}\n" for n in nodes)


def hostfile_ompi(nodes: Sequence[NodePlacement]) -> str:
    return "".join(f"{n.address} slots={n.slots}\n" for n in nodes)


def _gpu_env(
    gpus: Sequence[int], host_has_gpus: bool, task: int, tasks: int, per_task: bool
) -> dict[str, str]:
    if not host_has_gpus:
        return {}
    if per_task and tasks > 1 and gpus:
        share = len(gpus) // tasks
        if share:
            gpus = gpus[task * share : (task + 1) * share]
        else:  # fewer GPUs than tasks: round-robin, one each
            gpus = [gpus[task % len(gpus)]]
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }


def task_environment(
    defn: JobDefinition,
    launch: Launch,
    node_index: int | None = None,
    task_index: int = 0,
) -> dict[str, str]:
    """The variables mnp adds on top of the host's environment for one task.

    Order (later wins): the definition's ``environment``, the node group's
    ``environment``, then the variables of SPEC §5.
    """
    env: dict[str, str] = dict(defn.environment)
    env.update(
        MNP_JOB_NAME=defn.name,
        MNP_JOB_ATTEMPT=str(launch.attempt),
        MNP_QUEUE=launch.queue,
        MNP_CE=launch.ce,
    )
    aws: dict[str, str] = {}
    if defn.aws_batch_env:
        aws = {
            "AWS_BATCH_JOB_ID": launch.job_id,
            "AWS_BATCH_JOB_ATTEMPT": str(launch.attempt),
            "AWS_BATCH_JQ_NAME": launch.queue,
            "AWS_BATCH_CE_NAME": launch.ce,
        }

    if defn.type is JobType.MULTINODE and defn.multinode is not None:
        assert node_index is not None
        mn = defn.multinode
        node = launch.nodes[node_index]
        group = mn.groups[node.group]
        env.update(group.environment)
        tid = task_id(launch, node_index, task_index, node.slots)
        main = launch.nodes[launch.main_node]
        world = sum(n.slots for n in launch.nodes)
        rank = sum(n.slots for n in launch.nodes[:node_index]) + task_index
        env.update(
            MNP_JOB_ID=tid,
            MNP_HOST=node.host,
            MNP_NODE_INDEX=str(node_index),
            MNP_NUM_NODES=str(len(launch.nodes)),
            MNP_MAIN_NODE_INDEX=str(launch.main_node),
            MNP_MAIN_NODE_ADDR=main.address,
            MNP_NODE_GROUP=str(node.group),
            MNP_NODELIST=",".join(n.address for n in launch.nodes),
            MASTER_ADDR=main.address,
            WORLD_SIZE=str(world),
            RANK=str(rank),
            LOCAL_RANK=str(task_index),
            LOCAL_WORLD_SIZE=str(node.slots),
            NODE_RANK=str(node_index),
            GROUP_RANK=str(node_index),
        )
        if launch.master_port is not None:
            env["MASTER_PORT"] = str(launch.master_port)
        if launch.hostfile is not None:
            env["MNP_HOSTFILE"] = launch.hostfile
        if launch.hostfile_ompi is not None:
            env["MNP_HOSTFILE_OMPI"] = launch.hostfile_ompi
        env.update(
            _gpu_env(
                node.gpus,
                node.host_has_gpus,
                task_index,
                node.slots,
                group.gpu_bind == "per-task",
            )
        )
        env.update(_limit_env(group.resources.memory // max(1, node.slots), node.cpus))
        if aws:
            aws.update(
                AWS_BATCH_JOB_NODE_INDEX=str(node_index),
                AWS_BATCH_JOB_NUM_NODES=str(len(launch.nodes)),
                AWS_BATCH_JOB_MAIN_NODE_INDEX=str(launch.main_node),
            )
            aws["AWS_BATCH_JOB_ID"] = str(JobId.parse(launch.job_id).at_node(node_index))
            if node_index != launch.main_node:  # as AWS does: children only
                # an IPv4 address, as AWS promises (scripts compare it with `hostname -I`);
                # the address as written when the controller could not resolve one
                aws["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"] = (
                    launch.main_ipv4 or main.address
                )
    else:
        env.update(MNP_JOB_ID=launch.job_id, MNP_HOST=launch.host)
        if launch.array_index is not None:
            env["MNP_ARRAY_INDEX"] = str(launch.array_index)
            env["MNP_ARRAY_SIZE"] = str(launch.array_size)
            if aws:
                aws["AWS_BATCH_JOB_ARRAY_INDEX"] = str(launch.array_index)
        env.update(_gpu_env(launch.gpus, launch.host_has_gpus, 0, 1, False))
        env.update(_limit_env(defn.resources.memory, launch.cpus))
    env.update(aws)
    return env


def _limit_env(memory: int, cpus: Sequence[int]) -> dict[str, str]:
    """``MNP_MEMORY_LIMIT`` (bytes, the task's own: a node's memory split between its
    tasks) and ``MNP_CPUS`` (the CPU ids it is pinned to): the agent enforces both
    (mnp/agent/limits.py). Absent when there is no limit or binding."""
    env: dict[str, str] = {}
    if memory > 0:
        env["MNP_MEMORY_LIMIT"] = str(memory)
    if cpus:
        env["MNP_CPUS"] = ",".join(str(c) for c in cpus)
    return env


def task_id(launch: Launch, node_index: int | None, task_index: int, slots: int) -> str:
    """The agent-side task id, equal to the task's ``MNP_JOB_ID``."""
    if node_index is None:
        return launch.job_id
    node = JobId.parse(launch.job_id).at_node(node_index)
    return str(node.at_task(task_index) if slots > 1 else node)
