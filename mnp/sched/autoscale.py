"""Managed compute environments: what capacity to acquire or give back (pure; issue 15).

``decide(spec, node_vcpus, needs, allocations, now)`` looks at the RUNNABLE work of one
MANAGED compute environment (``needs``, in the order the queues would start it) and the
allocations it holds (pending or running; ended ones are left out by the caller), and
returns actions for the provider to apply: ``Submit(nodes, time_limit)``,
``Cancel(alloc_id)``, and ``Blocked(key)`` for work that this environment can never run.
``now`` is passed in; nothing here reads a clock or does I/O.

The rules:

- Every node of an allocation has ``node_vcpus`` vCPUs. Capacity is the vCPUs of every
  pending and running allocation; it never goes above ``max_vcpus``.
- Work is placed, first fit and in order, on free vCPUs of running allocations and on
  pending ones (they will come); a multi-node job needs that many distinct nodes of
  one allocation (its tasks' own srun, an mpiexec's, reaches only that allocation).
  What does not fit gets a new allocation of ``max(allocation.nodes, job's nodes)`` nodes
  (just the job's nodes if that is all ``max_vcpus`` leaves room for), which later work of
  this pass may share. Work that fits nowhere under ``max_vcpus`` waits for capacity
  to free up.
- Time limits: with ``allocation.time_limit`` set, a job without a ``timeout`` is
  ``Blocked`` (it could be killed by the allocation's end; give it a timeout), and so is
  one whose timeout exceeds the time limit less ``margin``. A running allocation takes no
  work whose timeout exceeds what is left of it.
- A job asking more vCPUs per node than ``node_vcpus``, or more than ``max_vcpus`` in
  all, is ``Blocked``.
- Floor: ``max(min_vcpus, desired_vcpus)``: allocations are submitted until capacity
  reaches it, and idle ones are given back only above it (``desired_vcpus`` is the
  operator's "keep this much warm"; set it back to ``min_vcpus`` to let it scale down).
- A running allocation that nothing uses, idle ``idle_timeout`` or longer, is cancelled
  while capacity stays at or above the floor, the longest idle first; one that is idle
  and within ``margin`` of its time limit is cancelled regardless (the floor then asks
  for a fresh one). Pending allocations are not cancelled: once running and idle they
  follow the idle rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mnp.model import ManagedSpec

DEFAULT_MARGIN = 60.0
"""Seconds before an allocation's end when it takes no more work and, if idle, is given back."""


@dataclass(frozen=True)
class Need:
    """One runnable unit: a single job or array child (``nodes=1``), or a multi-node gang."""

    key: str
    nodes: int = 1
    vcpus: float = 1.0  # per node
    timeout: float | None = None  # seconds one attempt may run; None = no limit


@dataclass(frozen=True)
class Allocation:
    """One allocation the environment holds (not ended)."""

    alloc_id: str
    nodes: int
    state: str  # "PENDING" | "RUNNING"
    used: tuple[float, ...] = ()  # vCPUs held by work on each node now; () = none
    idle_since: float | None = None  # when it last became unused; None = in use
    ends_at: float | None = None  # when its time limit ends (running only); None = no limit


@dataclass(frozen=True)
class Submit:
    nodes: int
    time_limit: float | None
    for_keys: tuple[str, ...] = ()  # the work it is for; () = to reach the floor


@dataclass(frozen=True)
class Cancel:
    alloc_id: str
    reason: str


@dataclass(frozen=True)
class Blocked:
    key: str
    reason: str


Action = Submit | Cancel | Blocked


@dataclass
class _Node:
    alloc: str  # alloc_id, or "+N" for one submitted in this pass
    free: float
    until: float | None  # None = no end


def decide(
    spec: ManagedSpec,
    node_vcpus: int,
    needs: Sequence[Need],
    allocations: Sequence[Allocation],
    now: float,
    margin: float = DEFAULT_MARGIN,
) -> list[Action]:
    """The actions for one pass; see the module's docstring for the rules."""
    actions: list[Action] = []
    capacity = sum(a.nodes for a in allocations) * node_vcpus
    floor = max(spec.min_vcpus, spec.desired_vcpus)
    limit = spec.time_limit
    nodes: list[_Node] = []
    for a in allocations:
        if a.state == "PENDING":
            until = None if limit is None else now + limit
            nodes += [_Node(a.alloc_id, float(node_vcpus), until) for _ in range(a.nodes)]
        elif a.ends_at is None or a.ends_at - now > margin:
            used = list(a.used) + [0.0] * (a.nodes - len(a.used))
            nodes += [_Node(a.alloc_id, node_vcpus - u, a.ends_at) for u in used[: a.nodes]]
    taken: set[str] = set()  # allocations that this pass gives work to

    for need in needs:
        why = never(spec, node_vcpus, need, margin)
        if why:
            actions.append(Blocked(need.key, why))
            continue
        fit = _fit(nodes, need, now)
        if fit is None:
            size = max(spec.nodes, need.nodes)
            if capacity + size * node_vcpus > spec.max_vcpus:
                size = need.nodes
            if capacity + size * node_vcpus > spec.max_vcpus:
                continue  # waits for capacity to free up
            capacity += size * node_vcpus
            actions.append(Submit(size, limit, (need.key,)))
            until = None if limit is None else now + limit
            tag = f"+{len(actions)}"  # an allocation submitted in this pass
            nodes += [_Node(tag, float(node_vcpus), until) for _ in range(size)]
            fit = _fit(nodes, need, now)
            assert fit is not None
        for n in fit:
            n.free -= need.vcpus
            taken.add(n.alloc)

    while capacity < floor and capacity + spec.nodes * node_vcpus <= spec.max_vcpus:
        capacity += spec.nodes * node_vcpus
        actions.append(Submit(spec.nodes, limit))

    idle = sorted(
        (
            a
            for a in allocations
            if a.state == "RUNNING"
            and a.alloc_id not in taken
            and a.idle_since is not None
            and not any(a.used)
        ),
        key=lambda a: (a.idle_since, a.alloc_id),
    )
    for a in idle:
        vcpus = a.nodes * node_vcpus
        if a.ends_at is not None and a.ends_at - now <= margin:
            actions.append(Cancel(a.alloc_id, "idle, and its time limit is near"))
            capacity -= vcpus
        elif now - (a.idle_since or now) >= spec.idle_timeout and capacity - vcpus >= floor:
            actions.append(Cancel(a.alloc_id, f"idle for {spec.idle_timeout:g}s"))
            capacity -= vcpus
    return actions


def never(spec: ManagedSpec, node_vcpus: int, need: Need, margin: float) -> str | None:
    """Why this environment can never run ``need``, or None."""
    if need.vcpus > node_vcpus:
        return f"needs {need.vcpus:g} vCPUs per node; this environment's nodes have {node_vcpus}"
    if need.nodes * node_vcpus > spec.max_vcpus:
        return (
            f"needs {need.nodes} whole nodes of {node_vcpus} vCPUs; "
            f"max_vcpus ({spec.max_vcpus}) allows fewer"
        )
    if spec.time_limit is not None:
        if need.timeout is None:
            return (
                f"has no timeout, and this environment's allocations end after "
                f"{spec.time_limit:g}s; give the job a timeout"
            )
        if need.timeout > spec.time_limit - margin:
            return (
                f"timeout {need.timeout:g}s does not fit in an allocation's time limit "
                f"({spec.time_limit:g}s, less {margin:g}s)"
            )
    return None


def _fit(nodes: list[_Node], need: Need, now: float) -> list[_Node] | None:
    """``need.nodes`` distinct nodes of one allocation with room and time for ``need``,
    first fit; or None. (A gang's tasks may start their own srun, an mpiexec's, which
    reaches only the allocation it runs in.)"""
    if need.nodes > 1:
        for alloc in dict.fromkeys(n.alloc for n in nodes):
            got = _fit_in([n for n in nodes if n.alloc == alloc], need, now)
            if got is not None:
                return got
        return None
    return _fit_in(nodes, need, now)


def _fit_in(nodes: list[_Node], need: Need, now: float) -> list[_Node] | None:
    chosen = []
    for n in nodes:
        if n.free + 1e-9 < need.vcpus:
            continue
        if n.until is not None and (need.timeout is None or now + need.timeout > n.until):
            continue
        chosen.append(n)
        if len(chosen) == need.nodes:
            return chosen
    return None
