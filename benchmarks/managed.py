"""Submit to RUNNING when capacity must be acquired: mnp's managed Slurm environment
against ``sbatch`` + ``srun`` of the same work, on the 4-node Slurm of
tests/integration/slurm.py.

    python benchmarks/managed.py [--reps 5] [--out benchmarks/results-managed.md]

The work: a 2-node job whose every node prints its name. Each repetition starts from
no capacity at all (mnp: ``min_vcpus = 0``, every allocation given back before the
next; Slurm: idle nodes).

- mnp: a controller (in this process) with a managed environment (``idle_timeout =
  1s``, passes every 0.5 s); from ``submit`` to the job's RUNNING event (the
  allocation submitted, started, its two agents started over srun from outside it,
  the job placed and its main node's task started), and to SUCCEEDED.
- peer: ``sbatch -N2 --wrap 'srun -N2 sh -c "date +%s.%N"'``; from ``sbatch`` to the
  first task's own clock reading (the step started), and to the job's end seen by
  ``squeue``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mnp.controller import Controller  # noqa: E402
from mnp.model import JobState, ManagedSpec  # noqa: E402
from mnp.provider.slurm import SlurmProvider  # noqa: E402
from mnp.spec import parse_definition, parse_inventory  # noqa: E402
from mnp.transport.srun import SrunTransport, allocation_vars  # noqa: E402
from tests.integration.slurm import SlurmCluster  # noqa: E402

JOB = {
    "name": "two",
    "type": "multinode",
    "timeout": {"attempt_duration": "5m"},
    "multinode": {
        "num_nodes": 2,
        "exclusive": True,
        "groups": [{"target_nodes": "0:1", "command": ["sh", "-c", "echo $SLURMD_NODENAME"]}],
    },
}


def inventory() -> object:
    return parse_inventory(
        {
            "compute_environments": {
                "burst": {
                    "type": "MANAGED",
                    "provider": "slurm",
                    "max_vcpus": 8,
                    "idle_timeout": "1s",
                    "allocation": {"nodes": 1, "time_limit": "30m", "vcpus_per_node": 2},
                }
            },
            "queues": {"default": {"compute_environments": ["burst"]}},
        },
        "<bench>",
    )


async def back_to_zero(c: Controller) -> None:
    """Until every allocation has been given back (polling the controller's view)."""
    for _ in range(600):
        if not c.inventory.hosts and all(
            a["state"] == "ENDED" for e in c.managed.views() for a in e["allocations"]
        ):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the managed environment did not scale back to zero in 120 s")


async def mnp_reps(cluster: SlurmCluster, reps: int) -> tuple[list[float], list[float]]:
    def providers(_n: str, spec: ManagedSpec) -> SlurmProvider:
        return SlurmProvider(spec.options, environ=cluster.env)

    def transport(_p: object, alloc: str, nodes: object) -> SrunTransport:
        return SrunTransport(alloc, environ=cluster.env, job_env=allocation_vars(list(nodes)))  # type: ignore[call-overload]

    c = Controller(
        inventory(),  # type: ignore[arg-type]
        {},
        providers=providers,  # type: ignore[arg-type]
        managed_transport=transport,  # type: ignore[arg-type]
        managed_interval=0.5,
    )
    await c.start()
    running, done = [], []
    try:
        defn = parse_definition(JOB, "<bench>")
        for _ in range(reps):
            await back_to_zero(c)
            cluster.wait_idle()
            t0 = time.time()
            job = c.submit(defn)
            await asyncio.wait_for(c.wait(job), 120)
            assert job.state is JobState.SUCCEEDED, job.reason
            t_run = next(
                e["time"]
                for e in c.events
                if e.get("job_id") == job.id and e.get("status") == "RUNNING"
            )
            running.append(t_run - t0)
            done.append((job.stopped_at or time.time()) - t0)
    finally:
        await c.close()
    return running, done


def sbatch_reps(cluster: SlurmCluster, reps: int, tmp: Path) -> tuple[list[float], list[float]]:
    running, done = [], []
    for i in range(reps):
        cluster.wait_idle()
        out = tmp / f"peer-{i}.out"
        t0 = time.time()
        job = cluster.sbatch(
            "-N2",
            "--exclusive",
            f"--output={out}",
            "--wrap",
            'srun -N2 sh -c "date +%s.%N"',
        )
        cluster.wait_job(job, timeout=120)
        t_end = time.time()
        stamps = [float(x) for x in out.read_text().split() if x.replace(".", "").isdigit()]
        running.append(min(stamps) - t0)
        done.append(t_end - t0)
    return running, done


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-managed.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnp-bench-managed-"))
    cluster = SlurmCluster.start(tmp / "slurm")
    try:
        peer_run, peer_done = sbatch_reps(cluster, args.reps, tmp)
        mnp_run, mnp_done = asyncio.run(mnp_reps(cluster, args.reps))
    finally:
        cluster.close()
    rows = [
        ("submit → RUNNING, capacity acquired", spread(mnp_run), spread(peer_run)),
        ("submit → done (2 nodes print)", spread(mnp_done), spread(peer_done)),
    ]
    table = [
        "| benchmark | mnp median (min-max) | sbatch + srun median (min-max) |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (
        f"# Managed capacity: mnp against sbatch + srun\n\n{when}, {args.reps} repetitions, "
        "4-node Slurm 22.05 on one machine (tests/integration/slurm.py)\n\n"
        + "\n".join(table)
        + "\n"
    )
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
