"""Direct MPI launch inside a real Slurm allocation (issue 16): ``srun --mpi=pmi2``,
``mnp run --mpi pmi`` (agents as srun steps) and mnp running ``mpiexec`` (the path
before issue 16), on the 4-node Slurm 22.05 of tests/integration/slurm.py.

    python benchmarks/mpi_slurm.py [--reps 5] [--out benchmarks/results-mpi-slurm.md]

One ``sbatch -N4 --exclusive`` allocation runs this script again (``--inside``); there,
repetition by repetition and for 4 nodes x 1 and 4 nodes x 2 ranks, the same rank
program (mpi4py with ``rc.initialize = False``: the time before and after
``MPI.Init()``, then rank and size printed, ``MPI.Finalize()``; an mpi4py hello that
stamps its ``MPI_Init``) is started by

- ``srun -N4 --ntasks-per-node K --mpi=pmi2`` (Slurm's pmi2 plugin also serves the
  PMI-1 wire protocol that the ``mpich`` wheel's client speaks; ``pmix`` has no PMIx
  library on this Slurm, ``none`` gives singletons);
- ``mnp run --nodes 4 --tasks-per-node K --mpi pmi`` with a warm controller
  (``mnp controller start --inventory slurm``: its agents are srun steps);
- the same without a controller (``--inventory slurm``: the run starts its agents);
- ``mnp run`` of a definition whose node 0 runs ``mpiexec -f $MNP_HOSTFILE -n 4K
  -ppn K`` (Hydra starts its proxies with srun) and whose nodes 1-3 are held.

Per run: the wall time (fork to exit), launch to the last rank past ``MPI_Init`` (the
ranks' clocks, same machine) and the median of the ranks' own ``MPI_Init``. The floor
under the launchers, no MPI: ``srun -N4 true`` and ``mnp run --nodes 4 -- true``
(warm), wall time only, in the same repetitions' loop before the MPI runs. Then one
run per launcher not timed, each rank behind a counting relay on ``PMI_FD``
(``--relay``): the PMI lines and bytes a rank exchanges with its server.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODES = 4
STAMP = (
    "import time; t0 = time.time(); from mpi4py import rc; rc.initialize = False; "
    "from mpi4py import MPI; t1 = time.time(); MPI.Init(); t2 = time.time(); "
    "w = MPI.COMM_WORLD; import os; "
    "os.write(1, f'init {w.Get_rank()} {w.Get_size()} {t1} {t2 - t1}\\n'.encode()); "
    "MPI.Finalize()"
)


# ---- the counting relay: one rank's PMI connection, lines and bytes each way


def relay(argv: list[str]) -> int:
    """Run ``argv`` with ``PMI_FD`` pointing at a socketpair this process relays to the
    real ``PMI_FD``; print ``pmi RANK lines_out bytes_out lines_in bytes_in`` at exit."""
    upstream = socket.socket(fileno=int(os.environ["PMI_FD"]))
    mine, theirs = socket.socketpair()
    theirs.set_inheritable(True)
    counts = {"out": [0, 0], "in": [0, 0]}

    def pump(src: socket.socket, dst: socket.socket, key: str) -> None:
        while data := src.recv(65536):
            counts[key][0] += data.count(b"\n")
            counts[key][1] += len(data)
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)

    env = dict(os.environ, PMI_FD=str(theirs.fileno()))
    proc = subprocess.Popen(argv, env=env, pass_fds=[theirs.fileno()])
    theirs.close()
    up = threading.Thread(target=pump, args=(mine, upstream, "out"), daemon=True)
    down = threading.Thread(target=pump, args=(upstream, mine, "in"), daemon=True)
    up.start()
    down.start()
    rc = proc.wait()
    up.join(5)
    (o_lines, o_bytes), (i_lines, i_bytes) = counts["out"], counts["in"]
    rank = os.environ.get("PMI_RANK", "?")
    os.write(1, f"pmi {rank} {o_lines} {o_bytes} {i_lines} {i_bytes}\n".encode())
    return rc


# ---- inside the allocation


def inside(reps: int, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    work = Path(tempfile.mkdtemp(prefix="mnp-bench-mpi-"))
    warm_home, cold_home = work / "warm", work / "cold"
    mnp = [sys.executable, "-m", "mnp"]
    rank = [sys.executable, "-c", STAMP]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")

    def run(argv: list[str], home: Path | None = None) -> tuple[float, str]:
        e = dict(env, MNP_HOME=str(home)) if home else env
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=e, capture_output=True, text=True, timeout=300, cwd=work)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)[:200]} exited {p.returncode}: {p.stderr[-800:]}")
        return wall, p.stdout

    def definition(k: int, prog: list[str]) -> Path:
        path = work / f"mpiexec-{k}-{len(prog)}.toml"
        argv = [mpiexec, "-f", "$MNP_HOSTFILE", "-n", str(NODES * k), "-ppn", str(k), *prog]
        path.write_text(
            f'name = "mpiexec-stamp"\ntype = "multinode"\n[multinode]\nnum_nodes = {NODES}\n'
            f'[[multinode.groups]]\ntarget_nodes = "0"\ncommand = {json.dumps(argv)}\n'
            '[[multinode.groups]]\ntarget_nodes = "1:"\n'
        )
        return path

    def launchers(k: int, prog: list[str]) -> dict[str, tuple[list[str], Path | None]]:
        per = ["--nodes", str(NODES), "--tasks-per-node", str(k), "--mpi", "pmi", "--", *prog]
        return {
            "srun --mpi=pmi2": (
                ["srun", f"-N{NODES}", f"--ntasks-per-node={k}", "--mpi=pmi2", *prog],
                None,
            ),
            "mnp --mpi pmi, warm": ([*mnp, "run", *per], warm_home),
            "mnp --mpi pmi, cold": ([*mnp, "run", "--inventory", "slurm", *per], cold_home),
            "mnp running mpiexec": ([*mnp, "run", str(definition(k, prog))], warm_home),
        }

    results: dict[str, Any] = {"reps": reps, "shapes": {}, "floor": {}}
    run([*mnp, "controller", "start", "--inventory", "slurm"], warm_home)
    try:
        floors = {  # the launch alone, no MPI: 4 nodes x 1 `true`
            "srun": (["srun", f"-N{NODES}", "true"], None),
            "mnp, warm": ([*mnp, "run", "--nodes", str(NODES), "--", "true"], warm_home),
        }
        for argv, home in floors.values():
            run(argv, home)
        for name in floors:
            results["floor"][name] = []
        for _ in range(reps):
            for name, (argv, home) in floors.items():
                results["floor"][name].append(run(argv, home)[0])
        for k in (1, 2):
            size = NODES * k
            cases = launchers(k, rank)
            for argv, home in cases.values():  # warm-up, not counted
                run(argv, home)
            samples: dict[str, dict[str, list[float]]] = {
                name: {"wall": [], "to_init": [], "in_init": []} for name in cases
            }
            for _ in range(reps):
                for name, (argv, home) in cases.items():
                    t0 = time.time()
                    wall, stdout = run(argv, home)
                    words = [ln.split() for ln in stdout.splitlines()]
                    stamps = [w[w.index("init") :] for w in words if "init" in w]
                    ranks = sorted(int(s[1]) for s in stamps)
                    if ranks != list(range(size)) or any(int(s[2]) != size for s in stamps):
                        raise RuntimeError(f"{name}: ranks {ranks} of {size}: {stdout[-400:]}")
                    samples[name]["wall"].append(wall)
                    samples[name]["to_init"].append(
                        max(float(s[3]) + float(s[4]) for s in stamps) - t0
                    )
                    samples[name]["in_init"].append(statistics.median(float(s[4]) for s in stamps))
            counted: dict[str, list[list[int]]] = {}
            relayed = [sys.executable, str(Path(__file__).resolve()), "--relay", "--", *rank]
            for name, (argv, home) in launchers(k, relayed).items():
                if name == "mnp running mpiexec":
                    argv = [*mnp, "run", str(definition(k, relayed))]
                _, stdout = run(argv, home)
                words = [ln.split() for ln in stdout.splitlines()]
                rows = [w[w.index("pmi") + 1 :] for w in words if "pmi" in w]
                counted[name] = [[int(x) for x in r[1:]] for r in rows if len(r) == 5]
                if len(counted[name]) != size:
                    raise RuntimeError(f"{name}: {len(counted[name])} relays of {size}")
            results["shapes"][f"{NODES}x{k}"] = {"samples": samples, "pmi": counted}
    finally:
        subprocess.run([*mnp, "controller", "stop"], env=dict(env, MNP_HOME=str(warm_home)))
        shutil.rmtree(work, ignore_errors=True)
    out.write_text(json.dumps(results))


# ---- outside: the cluster, the allocation, the table


def spread(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"{statistics.median(ms):.0f} ms ({ms[0]:.0f}-{ms[-1]:.0f})"


def table(results: dict[str, Any]) -> str:
    def over_ranks(pmi: list[list[int]], i: int, unit: str = "") -> str:
        v = sorted(row[i] for row in pmi)
        return f"{statistics.mean(v):.0f}{unit} ({v[0]}-{v[-1]})"  # mean: total / ranks

    lines = [
        "| ranks | launcher | wall, launch → exit | launch → last rank past MPI_Init "
        "| MPI_Init per rank (median of ranks) | PMI lines per rank (mean, min-max), sent; "
        "received | PMI bytes per rank (mean, min-max), sent; received |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, r in results["shapes"].items():
        for name, s in r["samples"].items():
            pmi = r["pmi"][name]
            lines.append(
                f"| {shape.replace('x', ' × ')} | {name} | {spread(s['wall'])} | "
                f"{spread(s['to_init'])} | {spread(s['in_init'])} | "
                f"{over_ranks(pmi, 0)}; {over_ranks(pmi, 2)} | "
                f"{over_ranks(pmi, 1, ' B')}; {over_ranks(pmi, 3, ' B')} |"
            )
    for name, walls in results.get("floor", {}).items():
        lines.append(f"| 4 × 1 `true`, no MPI | {name} | {spread(walls)} | | | | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-mpi-slurm.md"))
    ap.add_argument("--inside", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--relay", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.relay:
        return relay(args.argv)
    if args.inside:
        inside(args.reps, Path(args.inside))
        return 0
    from tests.integration.slurm import SlurmCluster

    tmp = Path(tempfile.mkdtemp(prefix="mnp-bench-mpi-slurm-"))
    cluster = SlurmCluster.start(tmp / "slurm")
    try:
        script = tmp / "job.sh"
        result = tmp / "result.json"
        script.write_text(
            "#!/bin/bash\n"
            f"exec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} "
            f"--reps {args.reps} --inside {shlex.quote(str(result))}\n"
        )
        started = time.time()
        job = cluster.sbatch(
            f"-N{NODES}", "--exclusive", f"--output={tmp / 'job.out'}", f"--chdir={tmp}",
            str(script),
        )  # fmt: skip
        state = cluster.wait_job(job, timeout=600 + 120 * args.reps)
        if state != "COMPLETED" or not result.exists():
            out = (tmp / "job.out").read_text(errors="replace")[-3000:]
            print(f"mnp-bench: allocation {job} {state}:\n{out}", file=sys.stderr)
            return 1
        results = json.loads(result.read_text())
    finally:
        cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (
        f"# Direct MPI launch inside a Slurm allocation: srun --mpi=pmi2, mnp --mpi pmi, "
        f"mnp running mpiexec\n\n{when}, {args.reps} repetitions (medians, min-max), one "
        f"`sbatch -N{NODES}` allocation of the 4-node Slurm 22.05 on one machine "
        f"(tests/integration/slurm.py), nproc {os.cpu_count()}, load average "
        f"{os.getloadavg()[0]:.1f}, {time.time() - started:.0f} s in all\n\n"
        + table(results)
        + "\n"
    )
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
