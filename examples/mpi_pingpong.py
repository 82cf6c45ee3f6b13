"""MPI ping-pong between rank 0 and rank 1: latency and bandwidth by message size.

With the hostfile mnp writes (one slot per node, node order), rank 0 runs on
node 0 and rank 1 on node 1, so this measures the path between two nodes.
Rank 0 sends a message, rank 1 sends it back; half the round trip is the
one-way time. Every message is checked on arrival. Rank 0 prints a table::

    bytes   reps   latency_us   bandwidth_MB/s

The other ranks wait in a non-blocking barrier that sleeps between tests, so
they do not steal CPU from the two that measure (MPICH's blocking calls spin).

    mnp run nodegroups/mpi-pingpong.toml
    mnp run nodegroups/mpi-pingpong.toml --param max_bytes=16777216
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mpi_hello import node_of_rank  # examples/ is on sys.path when run as a script

TAG = 7


def sizes(max_bytes: int) -> list[int]:
    """0, 1, 4, 16, ... up to ``max_bytes`` (which is always included)."""
    out, n = [0], 1
    while n < max_bytes:
        out.append(n)
        n *= 4
    return [*out, max_bytes] if max_bytes > 0 else out


def reps_for(nbytes: int, budget: int) -> int:
    """Fewer repetitions for big messages: about ``budget`` bytes each way per size."""
    return max(5, min(200, budget // max(nbytes, 1)))


def idle_barrier(comm: object) -> None:
    from mpi4py import MPI

    assert isinstance(comm, MPI.Comm)
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


def main() -> int:
    from mpi4py import MPI

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bytes", type=int, default=1 << 20, help="largest message")
    ap.add_argument("--budget", type=int, default=8 << 20, help="bytes per size and direction")
    args = ap.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node, addr = node_of_rank(rank, os.environ.get("MNP_HOSTFILE"))
    sys.stdout.write(f"rank {rank} of {size} on node {node} ({addr})\n")
    sys.stdout.flush()
    if size < 2:
        print("pingpong needs at least 2 ranks", file=sys.stderr)
        return 2
    nodes = comm.gather(node, root=0)
    errors = 0
    rows = []
    if rank in (0, 1):
        peer = 1 - rank
        for nbytes in sizes(args.max_bytes):
            reps = reps_for(nbytes, args.budget)
            pattern = bytes((nbytes + k) % 251 for k in range(min(nbytes, 251)))
            msg = bytearray((pattern * (nbytes // 251 + 1))[:nbytes]) if nbytes else bytearray()
            buf = bytearray(nbytes)
            comm.Sendrecv([msg, MPI.BYTE], peer, TAG, [buf, MPI.BYTE], peer, TAG)  # warm-up
            t0 = MPI.Wtime()
            for _ in range(reps):
                if rank == 0:
                    comm.Send([msg, MPI.BYTE], peer, TAG)
                    comm.Recv([buf, MPI.BYTE], peer, TAG)
                else:
                    comm.Recv([buf, MPI.BYTE], peer, TAG)
                    comm.Send([buf, MPI.BYTE], peer, TAG)
            one_way = (MPI.Wtime() - t0) / reps / 2
            if buf != msg:
                errors += 1
            rows.append((nbytes, reps, one_way))
    idle_barrier(comm)
    errors = comm.allreduce(errors, op=MPI.SUM)
    if rank != 0:
        return 1 if errors else 0
    if errors:
        print(f"pingpong FAILED: {errors} message(s) arrived corrupted", file=sys.stderr)
        return 1
    assert nodes is not None
    lines = [
        f"pingpong rank 0 (node {nodes[0]}) <-> rank 1 (node {nodes[1]}), "
        f"{size} ranks on {len(set(nodes))} distinct nodes",
        f"{'bytes':>9} {'reps':>6} {'latency_us':>12} {'bandwidth_MB/s':>15}",
    ]
    for nbytes, reps, t in rows:
        bw = nbytes / t / 1e6 if t > 0 else float("inf")
        lines.append(f"{nbytes:>9} {reps:>6} {t * 1e6:>12.2f} {bw:>15.1f}")
    lines.append("pingpong ok")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
