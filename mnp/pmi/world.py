"""Direct MPI launch, the controller's part (issue 16): one MPI world per attempt, pure.

``plan`` numbers the ranks of an attempt's ``mpi = "pmi"`` groups (``mnp.pmi.layout``)
and names the launch (a kvsname of its own per attempt: MPICH names its shared memory
after it); ``rank_part`` is what a rank's spawn carries (PROTOCOL.md: ``pmi``). The
agents serve PMI to their ranks and send each barrier's puts (``pmi_barrier``);
``World.barrier`` merges them (``mnp.pmi.exchange``) and says which hosts get the
merged key-value space back (``pmi_release``). A ``pmi_fail`` (an abort, a rank lost
before finalize, one that never reached init) ends the job; ``Attempts`` does that.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mnp.model import JobDefinition
from mnp.pmi.exchange import Complete, Exchange, Rejected
from mnp.pmi.layout import Layout, job_attributes, layout, rank_env

INIT_WITHIN = 60.0
"""Seconds a rank may take from its start to PMI ``init`` (``MPI_Init``) before its job
fails; ``MNP_PMI_INIT_TIMEOUT`` in the controller's environment overrides it."""


def init_within(env: Mapping[str, str]) -> float:
    """The bound on reaching ``init``, from ``MNP_PMI_INIT_TIMEOUT`` in ``env`` if valid."""
    try:
        value = float(env.get("MNP_PMI_INIT_TIMEOUT", ""))
    except ValueError:
        return INIT_WITHIN
    return value if 0 < value < 1e6 else INIT_WITHIN


@dataclass
class World:
    """One attempt's ``MPI_COMM_WORLD``: its ranks, name and barrier exchange."""

    kvsname: str
    lay: Layout
    exchange: Exchange
    hosts: dict[int, str]  # job node index -> host, for the nodes that run ranks
    within: float = INIT_WITHIN
    attrs: Mapping[str, str] = field(default_factory=dict)

    def rank_of(self, node: int, task: int) -> int | None:
        for r in self.lay.on_node(node):
            if r.local == task:
                return r.rank
        return None

    def rank_env(self, rank: int) -> dict[str, str]:
        """The PMI variables the controller sets (the agent adds ``PMI_FD``)."""
        env = rank_env(self.lay, rank, fd=0)
        del env["PMI_FD"]
        env["MNP_MPI_KVSNAME"] = self.kvsname  # what MPICH names its /dev/shm segments after
        return env

    def rank_part(self, rank: int) -> dict[str, Any]:
        """The ``pmi`` part of this rank's spawn (PROTOCOL.md)."""
        me = self.lay.ranks[rank]
        return {
            "kvsname": self.kvsname,
            "node": me.node,
            "node_id": self.lay.node_id(me.node),
            "rank": rank,
            "size": self.lay.size,
            "appnums": {str(r.rank): r.appnum for r in self.lay.on_node(me.node)},
            "attrs": dict(self.attrs),
            "init_within": self.within,
        }

    def barrier(
        self, node: int, epoch: int, puts: Mapping[str, str]
    ) -> list[dict[str, Any]] | str | None:
        """A node's arrival: the ``pmi_release`` messages to send (host in ``"host"``)
        when the barrier completes, None while others are missing, or why the job fails."""
        result = self.exchange.arrive(node, epoch, puts)
        if isinstance(result, Rejected):
            return f"MPI barrier failed: {result.reason}"
        if not isinstance(result, Complete):
            return None
        by_host: dict[str, list[int]] = {}
        for n, host in sorted(self.hosts.items()):
            by_host.setdefault(host, []).append(n)
        return [
            {
                "host": host,
                "op": "pmi_release",
                "kvsname": self.kvsname,
                "nodes": nodes,
                "epoch": result.epoch,
                "kvs": dict(result.kvs),
            }
            for host, nodes in by_host.items()
        ]


def plan(
    defn: JobDefinition,
    job_id: str,
    attempt: int,
    hosts: Sequence[str],
    within: float = INIT_WITHIN,
) -> World | None:
    """The MPI world of an attempt whose nodes run on ``hosts`` (by job node index);
    None when no group has ``mpi = "pmi"``."""
    mn = defn.multinode
    if mn is None:
        return None
    groups = [g for g in mn.groups if g.mpi == "pmi" and g.command is not None]
    if not groups:
        return None
    lay = layout(groups)
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", job_id)
    kvsname = f"mnp-{safe}-{attempt}-{secrets.token_hex(4)}"
    return World(
        kvsname=kvsname,
        lay=lay,
        exchange=Exchange.of(lay.nodes),
        hosts={n: hosts[n] for n in lay.nodes},
        within=within,
        attrs=job_attributes(lay),
    )
