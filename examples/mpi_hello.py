"""MPI hello across the nodes of an mnp multi-node job.

Each rank prints its rank, the world size, the node it was placed on and the
host it runs on; rank 0 checks an allreduce of all ranks (sum 0..size-1).

mpiexec (MPICH Hydra) places ranks on the hosts of ``$MNP_HOSTFILE`` in order,
filling each host's slots before the next, so rank r runs on the node whose
slot range holds r. That is how a rank started by mpiexec (which carries the
main node's environment) knows its node index.

    mnp run nodegroups/mpi-hello.toml
"""

from __future__ import annotations

import os
import socket
import sys


def node_of_rank(rank: int, hostfile: str | None) -> tuple[int, str]:
    if not hostfile or not os.path.exists(hostfile):
        return int(os.environ.get("MNP_NODE_INDEX", "0")), socket.gethostname()
    first = 0
    index = 0
    addr = ""
    with open(hostfile) as f:
        for index, line in enumerate(x for x in f if x.strip()):  # noqa: B007
            addr, _, slots = line.strip().rpartition(":")
            n = int(slots) if slots.isdigit() else 1
            if rank < first + n:
                return index, addr
            first += n
    return index, addr  # more ranks than slots: mpiexec wraps around


def main() -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node, addr = node_of_rank(rank, os.environ.get("MNP_HOSTFILE"))
    host = socket.gethostname()
    # one write per line: with PYTHONUNBUFFERED, print() writes text and newline
    # separately and mpiexec's merged output could interleave ranks mid-line
    sys.stdout.write(f"hello from rank {rank} of {size} on node {node} ({addr}) host {host}\n")
    sys.stdout.flush()
    total = comm.allreduce(rank, op=MPI.SUM)
    nodes = comm.gather(node, root=0)
    if rank == 0:
        expected = size * (size - 1) // 2
        if total != expected:
            print(f"allreduce FAILED: got {total}, expected {expected}", file=sys.stderr)
            return 1
        sys.stdout.write(
            f"allreduce ok: sum of ranks = {total}; {len(set(nodes or []))} distinct nodes\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
