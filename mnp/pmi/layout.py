"""Rank numbering and PMI environment of a direct MPI launch: pure, no I/O.

All node groups of a job that run as MPI ranks form one ``MPI_COMM_WORLD``
(MPMD, like mpiexec's ``:`` and Slurm heterogeneous jobs). Ranks are numbered in
job node order, contiguous on each node (``tasks_per_node`` of them), and each
group is one application: its ``appnum`` is its position among those groups.

A rank finds its PMI server through ``PMI_FD`` (an inherited socket, what the
agent gives a rank it forks) or ``PMI_PORT``/``PMI_ID`` (a TCP address and an
identity sent back in ``cmd=initack``, for ranks that cannot inherit a
descriptor, e.g. in a container). ``PMI_RANK``/``PMI_SIZE`` are read by MPICH's
client only with ``PMI_FD``; they are set either way, as Hydra does. MPICH asks
the rest over the wire: its application number (``get_appnum``) and which
ranks share a node, from the job attribute ``PMI_process_mapping``, which
``process_mapping`` writes in MPICH's ``(vector,(node,count,ranks),...)``.

The key-value space name must be unique per launch: MPICH names its shared
memory segments after it (``mnp.agent.pmi.shm_leftovers``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mnp.model import NodeGroup


@dataclass(frozen=True)
class Rank:
    """One MPI process: its global rank, job node index, index on that node, application."""

    rank: int
    node: int
    local: int  # the task index on its node; also MPI_LOCALRANKID
    appnum: int


@dataclass(frozen=True)
class Layout:
    """The ranks of one job's ``MPI_COMM_WORLD``, in rank order."""

    ranks: tuple[Rank, ...]

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def nodes(self) -> tuple[int, ...]:
        """The job node indices that run ranks, in rank order."""
        seen: dict[int, None] = {}
        for r in self.ranks:
            seen.setdefault(r.node, None)
        return tuple(seen)

    def node_id(self, node: int) -> int:
        """MPICH's id of a job node: its position among the nodes that run ranks."""
        return self.nodes.index(node)

    def on_node(self, node: int) -> tuple[Rank, ...]:
        return tuple(r for r in self.ranks if r.node == node)

    def process_mapping(self) -> str:
        """MPICH's ``PMI_process_mapping``: runs of (first node id, node count, ranks each).

        Node ids count the nodes that run ranks (0, 1, ...), not the job's node
        indices: a group without ranks in between does not leave a hole.
        """
        runs: list[list[int]] = []
        for node_id, node in enumerate(self.nodes):
            count = len(self.on_node(node))
            if runs and runs[-1][2] == count and runs[-1][0] + runs[-1][1] == node_id:
                runs[-1][1] += 1
            else:
                runs.append([node_id, 1, count])
        return "(vector," + ",".join(f"({a},{b},{c})" for a, b, c in runs) + ")"


def layout(groups: Sequence[NodeGroup]) -> Layout:
    """Number the ranks of the groups that run as MPI ranks (the caller picks them).

    The groups are taken in node order whatever order they are given in; they
    must not share a node and each must start at least one task per node.
    """
    ordered = sorted(groups, key=lambda g: g.start)
    for g in ordered:
        if g.end < g.start or g.start < 0:
            raise ValueError(f"node group {g.start}..{g.end}: empty or negative node range")
        if g.tasks_per_node < 1:
            raise ValueError(f"node group {g.start}..{g.end}: tasks_per_node must be at least 1")
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start <= a.end:
            raise ValueError(f"node groups {a.start}..{a.end} and {b.start}..{b.end} overlap")
    ranks: list[Rank] = []
    for appnum, g in enumerate(ordered):
        for node in range(g.start, g.end + 1):
            for local in range(g.tasks_per_node):
                ranks.append(Rank(len(ranks), node, local, appnum))
    return Layout(tuple(ranks))


def rank_env(
    lay: Layout, rank: int, *, fd: int | None = None, port: str | None = None
) -> dict[str, str]:
    """The PMI variables of one rank: exactly one of ``fd`` (inherited) or ``port`` (host:port)."""
    if (fd is None) == (port is None):
        raise ValueError("give exactly one of fd and port")
    me = lay.ranks[rank]
    env = {
        "PMI_RANK": str(rank),
        "PMI_SIZE": str(lay.size),
        "MPI_LOCALNRANKS": str(len(lay.on_node(me.node))),
        "MPI_LOCALRANKID": str(me.local),
    }
    if fd is not None:
        env["PMI_FD"] = str(fd)
    else:
        env["PMI_PORT"] = str(port)
        env["PMI_ID"] = str(rank)
    return env


def job_attributes(lay: Layout) -> Mapping[str, str]:
    """The keys every rank can ``get`` before any barrier (Hydra's ``get_jobattr``)."""
    return {"PMI_process_mapping": lay.process_mapping(), "universeSize": str(lay.size)}
