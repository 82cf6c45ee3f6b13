"""The controller's side of a PMI barrier: one exchange per barrier, pure.

Each node's agent serves its local ranks (``mnp/agent/pmi.py``) and, when all
of them are in ``barrier_in``, sends the puts it collected for that barrier
(its *epoch*: 0 for the first barrier of the job, then 1, ...). When every node
that runs ranks has arrived at the epoch, the merged puts go back to all of
them, and each answers ``barrier_out`` to its ranks. One ``Exchange`` per job;
it does no I/O and keeps no clock: the bound on a barrier is the caller's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Waiting:
    """Recorded; other nodes are still to arrive at this epoch."""

    missing: tuple[int, ...]


@dataclass(frozen=True)
class Complete:
    """Every node arrived: send ``kvs`` (this epoch's merged puts) to every node."""

    epoch: int
    kvs: Mapping[str, str]


@dataclass(frozen=True)
class Rejected:
    """The arrival is not part of the protocol (the job is broken: fail it with ``reason``)."""

    reason: str


Arrival = Waiting | Complete | Rejected


@dataclass
class Exchange:
    """The barriers of one job's ranks, across its nodes (job node indices)."""

    nodes: frozenset[int]
    epoch: int = 0
    arrived: dict[int, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, nodes: Iterable[int]) -> Exchange:
        found = frozenset(nodes)
        if not found:
            raise ValueError("a PMI exchange needs at least one node")
        return cls(found)

    def arrive(self, node: int, epoch: int, puts: Mapping[str, str]) -> Arrival:
        """Node ``node`` is in barrier ``epoch`` with the puts of its ranks."""
        if node not in self.nodes:
            return Rejected(f"node {node} runs no rank of this job")
        if epoch < self.epoch:
            return Rejected(f"node {node} is late: barrier {epoch} already completed")
        if epoch > self.epoch:
            return Rejected(f"node {node} is ahead: barrier {epoch} while {self.epoch} is open")
        if node in self.arrived:
            return Rejected(f"node {node} arrived twice at barrier {epoch}")
        self.arrived[node] = dict(puts)
        if len(self.arrived) < len(self.nodes):
            return Waiting(tuple(sorted(self.nodes - self.arrived.keys())))
        merged: dict[str, str] = {}
        owner: dict[str, int] = {}
        for n in sorted(self.arrived):
            for key, value in self.arrived[n].items():
                if key in merged and merged[key] != value:
                    return Rejected(
                        f"key {key!r} put with different values on nodes {owner[key]} and {n}"
                    )
                merged[key] = value
                owner.setdefault(key, n)
        done = Complete(self.epoch, merged)
        self.epoch += 1
        self.arrived = {}
        return done
