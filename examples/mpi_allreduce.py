"""MPI allreduce of a vector across the nodes of an mnp multi-node job (no numpy).

Every rank fills a vector of doubles with ``rank + i``; after ``MPI_Allreduce``
(sum) element ``i`` must be ``size * i + size * (size - 1) / 2`` on every rank
(exact: the values are small integers). Each rank checks its copy; rank 0
prints the vector size, the mean time of one allreduce and the algorithm
bandwidth, and the job exits non-zero if any rank saw a wrong value.

    mnp run nodegroups/mpi-allreduce.toml
    mnp run nodegroups/mpi-allreduce.toml --param length=1000000 --param repeat=50
"""

from __future__ import annotations

import argparse
import os
import sys
from array import array

from mpi_hello import node_of_rank  # examples/ is on sys.path when run as a script


def main() -> int:
    from mpi4py import MPI

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=100_000, help="doubles in the vector")
    ap.add_argument("--repeat", type=int, default=10, help="timed allreduces")
    args = ap.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node, addr = node_of_rank(rank, os.environ.get("MNP_HOSTFILE"))
    n = args.length
    send = array("d", (float(rank + i) for i in range(n)))
    recv = array("d", bytes(8 * n))

    comm.Allreduce([send, MPI.DOUBLE], [recv, MPI.DOUBLE], op=MPI.SUM)  # warm-up, checked
    base = size * (size - 1) / 2
    bad = next((i for i in range(n) if recv[i] != size * i + base), None)

    comm.Barrier()
    t0 = MPI.Wtime()
    for _ in range(args.repeat):
        comm.Allreduce([send, MPI.DOUBLE], [recv, MPI.DOUBLE], op=MPI.SUM)
    elapsed = (MPI.Wtime() - t0) / max(args.repeat, 1)

    sys.stdout.write(f"rank {rank} of {size} on node {node} ({addr}) checked {n} elements\n")
    sys.stdout.flush()
    failures = comm.gather(None if bad is None else (rank, bad, recv[bad]), root=0)
    nodes = comm.gather(node, root=0)
    if rank != 0:
        return 0
    wrong = [f for f in failures or [] if f is not None]
    if wrong:
        r, i, got = wrong[0]
        print(
            f"allreduce FAILED on {len(wrong)} rank(s): rank {r} element {i} = {got}, "
            f"expected {size * i + base}",
            file=sys.stderr,
        )
        return 1
    mbps = 8 * n / elapsed / 1e6 if elapsed > 0 else float("inf")
    sys.stdout.write(
        f"allreduce ok: {size} ranks on {len(set(nodes or []))} distinct nodes, "
        f"{n} doubles, {elapsed * 1e3:.3f} ms per allreduce ({mbps:.1f} MB/s)\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
