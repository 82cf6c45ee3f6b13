"""Which runnable jobs start where: a pure function of (requests, queues, hosts).

Rules (SPEC §6 "Scheduling"):

- queues by priority, higher first; FIFO (``seq``) within a queue; a queue's
  compute environments in its order; DISABLED compute environments take
  nothing new (a DISABLED queue still runs what it holds);
- a multi-node job is placed on distinct hosts, all nodes at once or none
  (gang allocation); exclusive nodes take their whole host;
- a job that does not fit reserves the hosts it will use as they free up;
  later jobs may start on other hosts only, so a stream of small tasks cannot
  starve a large multi-node job (a conservative backfill: without run-time
  estimates, reserved hosts are never lent).

``decide`` mutates the capacities it is given (the caller passes a copy or
applies the same grants) and returns ``Start`` actions in decision order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mnp.model import ComputeEnvironment, Grant, Queue, Request, Resources
from mnp.sched.alloc import HostCapacity

MAX_RESERVATIONS = 16
QUEUE_DEPTH = 256
"""Requests a pass may find blocked in one queue before it moves on (Slurm's
``default_queue_depth``): a 100,000-child array costs a pass what its head costs."""


@dataclass(frozen=True, slots=True)
class Start:
    key: str
    ce: str
    grants: tuple[Grant, ...]  # one per node, in node order


class _Members:
    """A compute environment's hosts during one pass, with a cursor past the leading
    hosts that can take nothing more (down, held whole, no free vCPU, or reserved):
    within a pass capacity only shrinks and reservations only grow, so first fit need
    not look at them again."""

    __slots__ = ("hosts", "start")

    def __init__(self, hosts: list[HostCapacity]) -> None:
        self.hosts = hosts
        self.start = 0

    def open(self, reserved: set[str]) -> list[HostCapacity]:
        hosts, i = self.hosts, self.start
        while i < len(hosts) and _spent(hosts[i], reserved):
            i += 1
        self.start = i
        return hosts if i == 0 else hosts[i:]


def _spent(h: HostCapacity, reserved: set[str]) -> bool:
    return (
        not h.up
        or h.exclusive
        or h.drained is not None
        or h.free_vcpus <= 1e-9
        or h.name in reserved
    )


def _place(req: Request, members: _Members, reserved: set[str]) -> tuple[Grant, ...] | None:
    hosts = members.open(reserved)
    if len(req.nodes) == 1:
        res = req.nodes[0]
        for h in hosts:
            if h.name not in reserved and h.fits(res, req.exclusive):
                return (h.take(res, req.exclusive),)
        return None
    if any(h.group is not None for h in hosts):
        # hosts of managed allocations: a gang stays within one allocation (its tasks'
        # own srun, an mpiexec's, reaches only the allocation they run in)
        groups: dict[str | None, list[HostCapacity]] = {}
        for h in hosts:
            groups.setdefault(h.group, []).append(h)
        for members_of_one in groups.values():
            grants = _gang(req, members_of_one, reserved)
            if grants is not None:
                return grants
        return None
    return _gang(req, hosts, reserved)


def _gang(
    req: Request, hosts: Sequence[HostCapacity], reserved: set[str]
) -> tuple[Grant, ...] | None:
    """Each node on a distinct host; the most demanding nodes are tried first."""
    order = sorted(range(len(req.nodes)), key=lambda i: (-req.nodes[i].gpus, -req.nodes[i].vcpus))
    chosen: dict[int, HostCapacity] = {}
    used: set[str] = set()
    for i in order:
        res = req.nodes[i]
        for h in hosts:
            if h.name in used or h.name in reserved:
                continue
            if h.fits(res, req.exclusive):
                chosen[i] = h
                used.add(h.name)
                break
        else:
            return None
    return tuple(chosen[i].take(req.nodes[i], req.exclusive) for i in range(len(req.nodes)))


def _reserve(req: Request, hosts: Sequence[HostCapacity], reserved: set[str]) -> set[str]:
    """Hosts this blocked request will take as they free up: prefer the least busy."""
    n = len(req.nodes)
    candidates = [
        h
        for h in hosts
        if h.up
        and h.drained is None
        and h.name not in reserved
        and h.could_ever_fit(max(req.nodes, key=_weight), True)
    ]
    if len(candidates) < n:
        return set()
    candidates.sort(key=lambda h: (h.tasks + (1 if h.exclusive else 0), h.vcpus - h.free_vcpus))
    return {h.name for h in candidates[:n]}


def _weight(r: Resources) -> tuple[int, float, int]:
    return (r.gpus, r.vcpus, r.memory)


TIME_MARGIN = 60.0
"""Seconds an attempt's timeout must leave before a managed allocation's time limit
(``mnp.sched.autoscale.DEFAULT_MARGIN``)."""


def fits_time_limit(req: Request, ce: ComputeEnvironment) -> bool:
    """Whether ``req`` may run on ``ce``'s capacity: a managed environment whose
    allocations end after ``time_limit`` takes only work whose ``timeout`` fits in it
    (less ``TIME_MARGIN``); work without a timeout never goes there."""
    limit = ce.managed.time_limit if ce.managed is not None else None
    if limit is None:
        return True
    return req.timeout is not None and req.timeout <= limit - TIME_MARGIN


def could_ever_run(
    req: Request,
    queue: Queue,
    ces: Mapping[str, ComputeEnvironment],
    hosts: Mapping[str, HostCapacity],
) -> bool:
    """Whether some compute environment of the queue, empty, could take the request."""
    for ce_name in queue.compute_environments:
        ce = ces.get(ce_name)
        if ce is None or not fits_time_limit(req, ce):
            continue
        members = [hosts[h] for h in ce.hosts if h in hosts]
        if len(members) < len(req.nodes):
            continue
        # each node needs a distinct host that could take it; greedy on sorted demand
        free = list(members)
        ok = True
        for res in sorted(req.nodes, key=_weight, reverse=True):
            for i, h in enumerate(free):
                if h.could_ever_fit(res, req.exclusive):
                    del free[i]
                    break
            else:
                ok = False
                break
        if ok:
            return True
    return False


def decide(
    requests: Iterable[Request] | Mapping[str, Iterable[Request]],
    queues: Mapping[str, Queue],
    ces: Mapping[str, ComputeEnvironment],
    hosts: Mapping[str, HostCapacity],
    *,
    depth: int = QUEUE_DEPTH,
) -> list[Start]:
    """Place what can be placed now.

    ``requests`` is either any iterable (grouped and sorted here) or, from the
    controller, each queue's requests already in ``seq`` order.
    """
    if isinstance(requests, Mapping):
        by_queue = requests
    else:
        grouped: dict[str, list[Request]] = {}
        for r in requests:
            grouped.setdefault(r.queue, []).append(r)
        by_queue = {q: sorted(rs, key=lambda r: r.seq) for q, rs in grouped.items()}
    ce_hosts: dict[str, list[HostCapacity]] = {
        name: [hosts[h] for h in ce.hosts if h in hosts]
        for name, ce in ces.items()
        if ce.state == "ENABLED"
    }
    cursors = {name: _Members(members) for name, members in ce_hosts.items() if members}
    starts: list[Start] = []
    reserved: set[str] = set()
    reservations = 0
    for qname in sorted(by_queue, key=lambda q: (-queues[q].priority if q in queues else 0, q)):
        queue = queues.get(qname)
        if queue is None:
            continue
        blocked: set[int] = set()
        misses = 0
        for req in by_queue[qname]:
            if req.signature in blocked:
                misses += 1
                if misses >= depth:
                    break
                continue
            placed = False
            for ce_name in queue.compute_environments:
                members = cursors.get(ce_name)
                if members is None or not fits_time_limit(req, ces[ce_name]):
                    continue
                grants = _place(req, members, reserved)
                if grants is not None:
                    starts.append(Start(req.key, ce_name, grants))
                    placed = True
                    break
            if placed:
                continue
            misses += 1
            blocked.add(req.signature)
            if reservations < MAX_RESERVATIONS:
                for ce_name in queue.compute_environments:
                    if not fits_time_limit(req, ces[ce_name]):
                        continue
                    got = _reserve(req, ce_hosts.get(ce_name, []), reserved)
                    if got:
                        reserved |= got
                        reservations += 1
                        break
            if misses >= depth or not _any_room(ce_hosts, reserved):
                break
        if not _any_room(ce_hosts, reserved):
            return starts
    return starts


def _any_room(ce_hosts: Mapping[str, list[HostCapacity]], reserved: set[str]) -> bool:
    """Whether any usable host still has a free vCPU (else the pass can stop)."""
    return any(
        h.up and not h.exclusive and h.free_vcpus > 1e-9 and h.name not in reserved
        for members in ce_hosts.values()
        for h in members
    )
