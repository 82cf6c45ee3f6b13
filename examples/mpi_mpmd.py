"""MPMD: two programs in one ``MPI_COMM_WORLD`` (direct launch: ``mpi = "pmi"`` groups).

Each group of ``nodegroups/pmi-mpmd.toml`` runs this script with its own role; mnp
starts every rank itself and numbers them in node order, one MPI application
(``MPI.APPNUM``) per group. Every rank says who it is; rank 0 checks that the
ranks of each application share one role and that an allreduce spans them all.

    mnp run nodegroups/pmi-mpmd.toml
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    from mpi4py import MPI

    role = sys.argv[1] if len(sys.argv) > 1 else "?"
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    appnum = comm.Get_attr(MPI.APPNUM)
    node = int(os.environ.get("MNP_NODE_INDEX", "0"))
    total = comm.allreduce(rank)
    sys.stdout.write(f"{role} rank {rank} of {size} app {appnum} on node {node}\n")
    sys.stdout.flush()
    seen = comm.gather((role, appnum), root=0)
    if rank != 0:
        return 0
    roles: dict[int, set[str]] = {}
    for r, a in seen or []:
        roles.setdefault(a, set()).add(r)
    if total != size * (size - 1) // 2 or any(len(v) != 1 for v in roles.values()):
        print(f"mpmd FAILED: sum {total}, roles by app {roles}", file=sys.stderr)
        return 1
    apps = ", ".join(f"{a}={next(iter(v))}" for a, v in sorted(roles.items()))
    sys.stdout.write(f"mpmd ok: {size} ranks, apps {apps}, sum of ranks {total}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
