"""Container start overhead: a task `true` in a podman container against a bare `true`.

    python benchmarks/containers.py [--reps 7]

Two rows, each the median (min-max) of ``--reps`` runs, interleaved so a slow moment
of the machine hits both:

- ``podman run``: ``podman run --rm --init --network host IMAGE true`` (the command
  line the agent builds, less labels and variables) against ``true``, both as one
  child process: what the runtime itself costs.
- ``mnp run``: ``mnp run --image IMAGE -- true`` against ``mnp run -- true`` (one
  single job on the local default, the controller hosted by ``mnp run``): the
  overhead a task sees end to end.

Needs podman (``apt-get install podman runc``); uses a ``containers.conf`` of its own
(LAB.md "Podman") and builds the image with ``examples/container_image.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/mnp-hello:main"
CONF = """\
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t0


def spread(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.0f} ms ({min(ms):.0f}-{max(ms):.0f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7, help="repetitions (at least 5)")
    args = p.parse_args()
    reps = max(5, args.reps)
    with tempfile.TemporaryDirectory(prefix="mnp-bench-containers-") as tmp:
        conf = Path(tmp) / "containers.conf"
        conf.write_text(CONF)
        env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf),
            "MNP_HOME": str(Path(tmp) / "home"),
            "PYTHONPATH": str(ROOT),
        }
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "container_image.py"), IMAGE],
            env=env,
            check=True,
            capture_output=True,
        )
        mnp = [sys.executable, "-m", "mnp", "run"]
        pairs = {
            "podman run": (
                ["podman", "run", "--rm", "--init", "--network", "host", IMAGE, "true"],
                ["true"],
            ),
            "mnp run": ([*mnp, "--image", IMAGE, "--", "true"], [*mnp, "--", "true"]),
        }
        for argv in (a for pair in pairs.values() for a in pair):  # warm the caches
            timed(argv, env)
        rows = []
        for name, (container, bare) in pairs.items():
            c: list[float] = []
            b: list[float] = []
            for _ in range(reps):
                c.append(timed(container, env))
                b.append(timed(bare, env))
            extra = statistics.median(c) - statistics.median(b)
            rows.append((name, spread(c), spread(b), f"{extra * 1000:+.0f} ms"))
    print(f"container start overhead, median (min-max) of {reps}, nproc {os.cpu_count()}")
    print("| run | in a container | bare | overhead |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
