"""The validated model: what ``mnp.spec`` builds from TOML and everything else reads.

Definitions and inventories are frozen dataclasses (immutable once parsed).
Sizes are bytes, durations seconds, node ranges inclusive ``(start, end)``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class JobState(enum.StrEnum):
    """A job's (or a node's, or an array child's) place in its life, as in AWS Batch."""

    SUBMITTED = "SUBMITTED"
    """Accepted and stored; not yet looked at by the scheduler."""
    PENDING = "PENDING"
    """Waiting on dependencies (or, for an array parent, on its children)."""
    RUNNABLE = "RUNNABLE"
    """Ready to run; waiting for resources in its queue's compute environments."""
    STARTING = "STARTING"
    """Placed on hosts; its processes are being started."""
    RUNNING = "RUNNING"
    """Its (main) process runs."""
    SUCCEEDED = "SUCCEEDED"
    """Ended with exit code 0."""
    FAILED = "FAILED"
    """Ended otherwise: non-zero exit, signal, timeout, cancelled, terminated, dependency failed."""

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED})
ACTIVE = frozenset({JobState.STARTING, JobState.RUNNING})


class JobType(enum.StrEnum):
    SINGLE = "single"
    MULTINODE = "multinode"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Resources:
    """Per task (single/array) or per node (multinode)."""

    vcpus: float = 1.0
    memory: int = 0  # bytes; 0 = not accounted; enforced per task (agent/limits.py)
    gpus: int = 0
    cpu_bind: str = "none"  # "none" | "cores": pinned to ceil(vcpus) cores of its own


@dataclass(frozen=True)
class RetryRule:
    """One ``evaluate_on_exit`` entry. Patterns are globs (``*``, ``?``)."""

    action: str  # "RETRY" | "EXIT"
    on_exit_code: str = "*"
    on_reason: str = "*"
    on_status_reason: str = "*"  # the attempt's status reason (AWS Batch onStatusReason)


@dataclass(frozen=True)
class RetryStrategy:
    attempts: int = 1  # 1..10
    evaluate_on_exit: tuple[RetryRule, ...] = ()


@dataclass(frozen=True)
class Timeout:
    attempt_duration: float | None = None  # seconds; None = no limit
    kill_grace: float = 10.0  # seconds between SIGTERM and SIGKILL


@dataclass(frozen=True)
class ArrayProperties:
    size: int  # 2..100000
    parallelism: int | None = None  # at most this many children running
    sequential: bool = False  # children run in index order (SEQUENTIAL)


@dataclass(frozen=True)
class SecretRef:
    """Where the controller reads a secret at launch: exactly one of file/env."""

    file: str | None = None
    env: str | None = None


CONTAINER_RUNTIMES = ("auto", "podman", "docker", "apptainer")
"""``auto``: the first of podman, docker, apptainer found on the node."""


@dataclass(frozen=True)
class Mount:
    """A bind mount: ``host`` (absolute) at ``container`` (absolute)."""

    host: str
    container: str
    read_only: bool = False

    def spec(self) -> str:
        """``HOST:CONTAINER[:ro]``, as written in a definition."""
        return f"{self.host}:{self.container}" + (":ro" if self.read_only else "")


@dataclass(frozen=True)
class Container:
    """The image a task runs in (``[container]``, or a node group's ``container``)."""

    image: str
    runtime: str = "auto"  # one of CONTAINER_RUNTIMES
    mounts: tuple[Mount, ...] = ()
    options: tuple[str, ...] = ()  # extra runtime arguments, before the image


@dataclass(frozen=True)
class NodeGroup:
    """Nodes ``start..end`` (inclusive) of a multi-node job."""

    start: int
    end: int
    command: tuple[str, ...] | None = None  # None: the nodes are held, nothing runs
    tasks_per_node: int = 1
    resources: Resources = field(default_factory=Resources)
    environment: Mapping[str, str] = field(default_factory=dict)
    gpu_bind: str = "per-node"  # "per-node" | "per-task"
    mpi: str = "none"  # "none" | "pmi": its tasks are MPI ranks mnp starts (issue 16)
    container: Container | None = None  # None: the job's (if any)

    def contains(self, index: int) -> bool:
        return self.start <= index <= self.end


@dataclass(frozen=True)
class MultiNodeProperties:
    num_nodes: int
    groups: tuple[NodeGroup, ...]
    main_node: int = 0
    exclusive: bool = True
    on_child_failure: str = "ignore"  # "ignore" | "terminate"

    def group_of(self, index: int) -> tuple[int, NodeGroup]:
        for i, g in enumerate(self.groups):
            if g.contains(index):
                return i, g
        raise KeyError(index)


@dataclass(frozen=True)
class Dependency:
    job_id: str
    type: str | None = None  # None (plain: SUCCEEDED), "N_TO_N", "afterany"


@dataclass(frozen=True)
class JobDefinition:
    """A job definition after parameters and command-line overrides.

    ``command`` keeps ``Ref::name`` placeholders; ``wiring`` substitutes them.
    For a multinode job, a group without a command holds its nodes, except the
    main node's group, which falls back to the top-level ``command``.
    """

    name: str
    command: tuple[str, ...] = ()
    type: JobType = JobType.SINGLE
    queue: str = "default"
    parameters: Mapping[str, str] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, SecretRef] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    retry: RetryStrategy = field(default_factory=RetryStrategy)
    timeout: Timeout = field(default_factory=Timeout)
    array: ArrayProperties | None = None
    multinode: MultiNodeProperties | None = None
    depends_on: tuple[Dependency, ...] = ()
    tasks_per_node: int = 1  # default for groups; single/array jobs always start one task
    gpu_bind: str = "per-node"
    mpi: str = "none"  # default for groups: "none" | "pmi"
    aws_batch_env: bool = False
    cwd: str | None = None
    python_env: str | None = None
    """The submitter's Python environment (a venv or conda prefix, absolute): tasks find its
    ``bin/`` first on ``PATH`` on every host where it exists. ``"none"``: leave ``PATH`` as
    the host has it. ``None``: not decided yet (``mnp submit``/``run`` fill it in)."""
    export_env: bool = False  # --export: forward the submitting shell's environment
    container: Container | None = None  # [container]: tasks run in this image

    def container_for(self, node_index: int | None = None) -> Container | None:
        """The image node ``node_index``'s tasks (a single job's: None) run in: its
        group's ``container`` when it has one (the group's wins), else the job's."""
        if node_index is not None and self.multinode is not None:
            _, group = self.multinode.group_of(node_index)
            if group.container is not None:
                return group.container
        return self.container

    tags: Mapping[str, str] = field(default_factory=dict)
    """Labels for people and tools (``mnp list --tag K=V``, events); no effect on the run."""
    source: str = "<command line>"  # file the definition came from, for messages


# --- inventory ------------------------------------------------------------


@dataclass(frozen=True)
class SshOptions:
    user: str | None = None
    port: int | None = None
    known_hosts: str | None = "~/.ssh/known_hosts"  # "none" disables checking
    identity: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    python: str = "python3"
    config: tuple[str, ...] = ()  # extra ssh_config files; ~/.ssh/config is read by default
    transport: str = "asyncssh"  # SSH_CLIENTS: the client that carries the agents' streams
    agent_cache: str = ""  # the host's agent cache folder; "" = XDG default, "none" = off


SSH_CLIENTS = ("asyncssh", "openssh")
"""``[ssh] transport``: asyncssh in the controller's process, or one OpenSSH ``ssh`` per host."""


@dataclass(frozen=True)
class HostSpec:
    name: str
    address: str  # what other nodes use to reach it (hostfiles, MASTER_ADDR)
    vcpus: int | None = None  # None = auto (probed by the agent)
    memory: int | None = None  # bytes; None = auto
    gpus: int | None = None  # None = auto (NVML count)
    labels: tuple[str, ...] = ()
    transport: str = "ssh"  # "ssh" | "local"
    ssh: SshOptions = field(default_factory=SshOptions)


@dataclass(frozen=True)
class ManagedSpec:
    """How a MANAGED compute environment acquires capacity (issue 15;
    ``mnp.controller.managed``). vCPU counts are whole numbers, as in AWS Batch."""

    provider: str  # "slurm" | "pbs" | "command"
    max_vcpus: int
    min_vcpus: int = 0
    desired_vcpus: int = 0
    idle_timeout: float = 300.0  # seconds idle before capacity above the floor is given back
    nodes: int = 1  # nodes per allocation (a multi-node job gets at least its gang)
    time_limit: float | None = None  # seconds; None = the scheduler's default
    vcpus_per_node: int | None = None  # None = learned from the first allocation
    options: tuple[str, ...] = ()  # passed to sbatch / qsub as given
    start: tuple[str, ...] = ()  # provider "command": argv that brings hosts up
    stop: tuple[str, ...] = ()  # provider "command": argv that takes hosts down


@dataclass(frozen=True)
class ComputeEnvironment:
    name: str
    hosts: tuple[str, ...]  # host names, in inventory order
    state: str = "ENABLED"  # "ENABLED" | "DISABLED"
    managed: ManagedSpec | None = None  # None = UNMANAGED: the hosts listed


@dataclass(frozen=True)
class Queue:
    name: str
    priority: int = 1
    compute_environments: tuple[str, ...] = ()
    state: str = "ENABLED"


@dataclass(frozen=True)
class Notification:
    """An inventory ``[[notifications]]`` hook: ``command`` (the event's JSON on its
    stdin) or ``url`` (the JSON POSTed), for the events whose ``status`` is in
    ``states``, ``queue`` in ``queues`` and ``name`` matches the glob ``job_name``
    (None: any)."""

    command: tuple[str, ...] | None = None
    url: str | None = None
    states: tuple[str, ...] | None = None
    queues: tuple[str, ...] | None = None
    job_name: str | None = None


@dataclass(frozen=True)
class Inventory:
    source: str  # file path, "local", "slurm", "pbs", "hostfile:PATH"
    hosts: tuple[HostSpec, ...]
    compute_environments: Mapping[str, ComputeEnvironment]
    queues: Mapping[str, Queue]
    ssh: SshOptions = field(default_factory=SshOptions)
    notifications: tuple[Notification, ...] = ()

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)


# --- what the scheduler places --------------------------------------------------

_SIGNATURES: dict[tuple[str, tuple[Resources, ...], bool, float | None], int] = {}


def _signature(
    queue: str, nodes: tuple[Resources, ...], exclusive: bool, timeout: float | None = None
) -> int:
    """A small int per distinct (queue, nodes, exclusive, timeout), so a pass compares ints."""
    key = (queue, nodes, exclusive, timeout)
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = len(_SIGNATURES)
    return sig


@dataclass(frozen=True, slots=True)
class Request:
    """A runnable unit: a single job, an array child, or a whole multi-node job."""

    key: str
    queue: str
    seq: int
    nodes: tuple[Resources, ...]  # one entry per node; a single job has one
    exclusive: bool = False
    timeout: float | None = None  # seconds one attempt may run (time-limited capacity)
    signature: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        sig = _signature(self.queue, self.nodes, self.exclusive, self.timeout)
        object.__setattr__(self, "signature", sig)


@dataclass(frozen=True)
class Grant:
    """What one node or task holds on one host."""

    host: str
    vcpus: float
    memory: int
    gpus: tuple[int, ...]
    exclusive: bool = False
    cpus: tuple[int, ...] = ()  # CPU ids it is pinned to (cpu_bind = "cores"); () = unbound
