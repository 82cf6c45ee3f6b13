#!/usr/bin/env python3
"""mnp against mpiexec, pdsh, GNU parallel and xargs: one command, one table.

    python benchmarks/run.py            # the full run (~10 minutes on 2 cores)
    python benchmarks/run.py --quick    # fewer repetitions and sizes (~2-3 minutes)
    python benchmarks/run.py --only warm,cold --reps 7

It starts its own OpenSSH servers on loopback (tests/integration/sshd.py, as the
tests do), uses a temporary MNP_HOME for everything, stops every controller and
sshd it started, and installs missing peers (apt-get for pdsh and parallel when
root, pip for the mpich wheel). benchmarks/README.md explains every figure; the
table also goes to benchmarks/results.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import compileall
import contextlib
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
FLOOR = REPO / "benchmarks" / "asyncssh_floor.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GiB = 1024**3
SETTLE = 0.5  # seconds between the samples of the warm launch (see phase_warm)
PHASES = ("warm", "cold", "arrays", "query", "scale", "pmi")


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table: mnp's samples, a peer's samples on the same work, a goal."""

    name: str
    kind: str  # "time" (seconds), "rate" (per second) or "bytes"
    mnp: list[float] = field(default_factory=list)
    peer: str = "-"
    peer_values: list[float] = field(default_factory=list)
    goal: str = ""
    check: Callable[[Row], bool | None] | None = None
    note: str = ""
    error: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.mnp) if self.mnp else None

    @property
    def peer_median(self) -> float | None:
        return statistics.median(self.peer_values) if self.peer_values else None

    @property
    def ratio(self) -> float | None:
        m, p = self.median, self.peer_median
        if m is None or p is None or p == 0:
            return None
        return m / p

    @property
    def met(self) -> bool | None:
        if self.error or self.check is None or not self.mnp:
            return None
        return self.check(self)


def fmt(kind: str, v: float | None) -> str:
    if v is None:
        return "-"
    if kind == "time":
        if v < 0.01:
            return f"{v * 1000:.1f} ms"
        if v < 10:
            return f"{v * 1000:.0f} ms"
        return f"{v:.1f} s"
    if kind == "rate":
        return f"{v:,.0f}/s"
    if kind == "bytes":
        return f"{v / 1e6:.1f} MB"
    return f"{v:g}"


def fmt_spread(kind: str, values: Sequence[float]) -> str:
    """``median (min-max)``: spread over the repetitions."""
    if not values:
        return "-"
    med = fmt(kind, statistics.median(values))
    if len(values) == 1:
        return med
    lo, hi = fmt(kind, min(values)), fmt(kind, max(values))
    unit = lo.split(" ", 1)[1] if " " in lo else ""
    if unit and hi.endswith(" " + unit):  # 120-135 ms, not 120 ms-135 ms
        lo = lo[: -len(unit) - 1]
        hi = hi[: -len(unit) - 1]
    elif kind == "rate":
        lo, hi = lo.removesuffix("/s"), hi.removesuffix("/s")
    return f"{med} ({lo}-{hi})"


def table_cells(n: int, row: Row) -> list[str]:
    met = {True: "yes", False: "NO", None: "-"}[row.met]
    if row.error:
        return [str(n), row.name, "error: " + row.error[:60], row.peer, "-", "-", row.goal, "-"]
    ratio = row.ratio
    return [
        str(n),
        row.name,
        fmt_spread(row.kind, row.mnp),
        row.peer,
        fmt_spread(row.kind, row.peer_values) if row.peer_values else "-",
        f"{ratio:.2f}x" if ratio is not None else "-",
        row.goal or "-",
        met,
    ]


HEADERS = ["#", "benchmark", "mnp median (min-max)", "peer", "peer median (min-max)", "ratio"]
HEADERS += ["goal", "met?"]


def text_table(rows: list[Row]) -> str:
    cells = [HEADERS] + [table_cells(n, r) for n, r in enumerate(rows, 1)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for n, r in enumerate(rows, 1):
        out.append("| " + " | ".join(esc(c) for c in table_cells(n, r)) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------- helpers


def at_most(limit: float) -> Callable[[Row], bool | None]:
    return lambda r: r.median is not None and r.median <= limit


def at_least(limit: float) -> Callable[[Row], bool | None]:
    return lambda r: r.median is not None and r.median >= limit


def ratio_at_most(limit: float) -> Callable[[Row], bool | None]:
    return lambda r: None if r.ratio is None else r.ratio <= limit


def ratio_at_least(limit: float) -> Callable[[Row], bool | None]:
    return lambda r: None if r.ratio is None else r.ratio >= limit


def both(*checks: Callable[[Row], bool | None]) -> Callable[[Row], bool | None]:
    def check(r: Row) -> bool | None:
        found = [c(r) for c in checks]
        return None if None in found else all(found)

    return check


TIMINGS = re.compile(r"attempt (\d+): (\{.*\})\s*$", re.M)


def attempt_timings(stderr: str) -> dict[str, Any]:
    """The last attempt's timings that ``mnp run --verbose`` prints (JSON or a dict repr)."""
    found = TIMINGS.findall(stderr)
    if not found:
        return {}
    text = found[-1][1]
    try:
        return dict(json.loads(text))
    except ValueError:
        return dict(ast.literal_eval(text))


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "mnp"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if dirty:
            commit += " (+ uncommitted changes in mnp/)"
    mem = psutil.virtual_memory().total
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": f"{mem / GiB:.0f} GiB",
        "python": f"{platform.python_version()} ({sys.executable})",
        "kernel": platform.release(),
        "mnp": commit,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.reps: int = args.reps or (3 if self.quick else 5)
        self.hosts: int = args.hosts or (8 if self.quick else 16)
        self.array_size = 1000 if self.quick else 10000
        self.array_hosts = 4
        self.submit_size = 10000
        self.stored_jobs = 100_000
        self.mem_array = 100_000
        self.sim_hosts = 1000
        self.sim_queued = 100_000
        self.fake_array = 5000 if self.quick else 20000
        self.phases: list[str] = args.only.split(",") if args.only else list(PHASES)
        self.ssh_transport: str | None = args.ssh_transport  # None: the inventory's default
        self.root = Path(tempfile.mkdtemp(prefix="mnp-bench-"))
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.stack = contextlib.ExitStack()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MNP_")}
        self.env.pop("HYDRA_LAUNCHER_EXEC", None)
        # Python's default: modules compiled once into __pycache__ and loaded from there
        # (pip compiles them at install). With PYTHONDONTWRITEBYTECODE inherited from a
        # shell every mnp command would compile its modules from source (~30 ms each).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        # the mnp of this checkout, whatever an editable install elsewhere points at
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
        )
        self.cluster: Any = None
        self.mnp: list[str] = []
        self.tools: dict[str, str | None] = {}
        self.out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results.md"
        self.argv: list[str] = list(getattr(args, "argv", []) or [])

    # --- plumbing -----------------------------------------------------------

    def home(self, name: str) -> Path:
        path = self.root / "homes" / name
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def run(
        self,
        argv: Sequence[str],
        *,
        home: Path | None = None,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float = 600,
        check: bool = True,
    ) -> tuple[float, subprocess.CompletedProcess[str]]:
        """Run a command, return (wall seconds, result). perf_counter around the whole
        subprocess: fork, exec, interpreter start, the work, exit."""
        full = dict(self.env)
        if home is not None:
            full["MNP_HOME"] = str(home)
        full.update(env or {})
        t0 = time.perf_counter()
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            env=full,
            cwd=self.root,
            timeout=timeout,
            check=False,
        )
        wall = time.perf_counter() - t0
        out = subprocess.CompletedProcess(
            proc.args,
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, argv))[:200]} exited {proc.returncode}: "
                f"{out.stderr.strip()[-600:]}"
            )
        return wall, out

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        ok = {True: "met", False: "NOT met", None: ""}[row.met]
        peer = f" | {row.peer} {fmt_spread(row.kind, row.peer_values)}" if row.peer_values else ""
        log(f"{row.name}: {fmt_spread(row.kind, row.mnp)}{peer} {ok}")
        return row

    # --- tools and peers ----------------------------------------------------

    def find_tools(self) -> None:
        bindir = Path(sys.executable).parent
        script = bindir / "mnp"
        self.mnp = [str(script)] if script.exists() else [sys.executable, "-m", "mnp"]
        mpiexec = bindir / "mpiexec"
        if not mpiexec.exists() and not shutil.which("mpiexec"):
            log("mpiexec missing: pip install mpich")
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "mpich"], check=False, timeout=600
            )
        self.tools["mpiexec"] = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
        missing = [p for p in ("pdsh", "parallel") if not shutil.which(p)]
        if missing and os.geteuid() == 0 and shutil.which("apt-get"):
            log(f"installing {' '.join(missing)} with apt-get")
            apt = ["apt-get", "install", "-y", "-qq", *missing]
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            if subprocess.run(apt, env=env, check=False, capture_output=True).returncode:
                subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
                subprocess.run(apt, env=env, check=False, capture_output=True)
        for p in ("pdsh", "parallel", "xargs", "seq"):
            self.tools[p] = shutil.which(p)
        for name, path in self.tools.items():
            log(f"peer {name}: {path or 'unavailable'}")

    def peer(self, name: str) -> str | None:
        return self.tools.get(name)

    # --- sshd hosts -----------------------------------------------------------

    def start_cluster(self) -> None:
        from tests.integration.sshd import SshdCluster

        n = max(self.hosts, self.array_hosts)
        net = 200 + os.getpid() % 50  # 127.0.200-249.x: apart from the tests' 127.0.0/127.0.n
        log(f"starting {n} sshd servers on 127.0.{net}.2-{n + 1}")
        cluster = SshdCluster.start(self.root / "sshd", n, net=net)
        self.stack.callback(cluster.close)
        self.cluster = cluster.with_transport(self.ssh_transport or cluster.ssh_transport)
        log(f"SSH transport: {self.cluster.ssh_transport}")
        hosts = self.cluster.hosts
        self.inv_all = self._inventory("inventory-launch.toml", hosts[: self.hosts])
        self.inv_array = self._inventory("inventory-array.toml", hosts[: self.array_hosts])
        self.hostfile = self.root / "hosts"
        self.hostfile.write_text("".join(f"{h.address}:1\n" for h in hosts[: self.hosts]))
        self.hydra_exec = self._hydra_ssh()

    def _inventory(self, name: str, hosts: Sequence[Any]) -> Path:
        text = self.cluster.toml()
        header = text.split("\n[[hosts]]", 1)[0]
        blocks = [f'\n[[hosts]]\nnames = "{h.name}"\naddress = "{h.address}"\n' for h in hosts]
        path = self.root / name
        path.write_text(header + "\n" + "".join(blocks))
        return path

    def _hydra_ssh(self) -> Path:
        """ssh for Hydra and pdsh: by address, with the cluster's keys (as the tests'
        ``hydra_ssh`` fixture in tests/integration/fixtures_jobs.py)."""
        c = self.cluster
        config = self.root / "peer_ssh_config"
        blocks = []
        for h in c.hosts:
            blocks.append(
                f"Host {h.address}\n    Port {h.port}\n    User root\n"
                f"    IdentityFile {c.identity}\n    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {c.known_hosts}\n    StrictHostKeyChecking yes\n"
                "    BatchMode yes\n\n"
            )
        blocks.append(f"Include {c.ssh_config}\n")
        config.write_text("".join(blocks))
        self.peer_ssh_config = config
        wrapper = self.root / "hydra-ssh"
        wrapper.write_text(f'#!/bin/sh\nexec ssh -F {config} -o BatchMode=yes "$@"\n')
        wrapper.chmod(0o755)
        return wrapper

    def host_procs(self) -> list[psutil.Process]:
        """Everything the cluster's sshds run that is not sshd (agents, tasks)."""
        out: list[psutil.Process] = []
        for h in self.cluster.hosts:
            out += self.cluster.agents(h.name)
        return out

    def agents(self) -> list[psutil.Process]:
        found = []
        for p in self.host_procs():
            with contextlib.suppress(psutil.Error):
                if "--ctl" in p.cmdline():
                    found.append(p)
        return found

    def leftover_sleeps(self) -> int:
        n = 0
        for p in self.host_procs():
            with contextlib.suppress(psutil.Error):
                if p.cmdline() == ["sleep", "1000"]:
                    n += 1
        return n

    # --- controllers ----------------------------------------------------------

    def controller_start(self, home: Path, *extra: str) -> int:
        wall, out = self.run([*self.mnp, "controller", "start", *extra], home=home, timeout=120)
        log(f"controller for {home.name} up in {wall:.2f}s: {out.stdout.strip()}")
        m = re.search(r"pid (\d+)", out.stdout)
        return int(m.group(1)) if m else 0

    def controller_stop(self, home: Path) -> None:
        from mnp import daemon

        with contextlib.suppress(Exception):
            daemon.stop(home, timeout=60)

    @contextlib.contextmanager
    def controller(self, home: Path, *extra: str) -> Iterator[int]:
        try:
            yield self.controller_start(home, *extra)
        finally:
            self.controller_stop(home)

    def api(self, home: Path) -> Any:
        from mnp.api import ApiClient

        client = ApiClient.connect(home)
        if client is None:
            raise RuntimeError(f"no controller answers for {home}")
        return client

    # --- peers' commands ------------------------------------------------------

    def mpiexec_argv(self) -> list[str] | None:
        mpiexec = self.peer("mpiexec")
        if mpiexec is None:
            return None
        n = str(self.hosts)
        return [mpiexec, "-f", str(self.hostfile), "-n", n, "-launcher", "ssh"] + [
            "-launcher-exec",
            str(self.hydra_exec),
            "true",
        ]

    def pdsh_argv(self) -> list[str] | None:
        pdsh = self.peer("pdsh")
        if pdsh is None:
            return None
        names = ",".join(h.address for h in self.cluster.hosts[: self.hosts])
        return [pdsh, "-R", "ssh", "-w", names, "true"]

    # ======================================================================= phases

    def phase_warm(self) -> None:
        """Warm 16-node launch, teardown and memory, all against one running controller."""
        n = self.hosts
        home = self.home("warm")
        mpiexec, pdsh = self.mpiexec_argv(), self.pdsh_argv()
        pdsh_env = {"PDSH_SSH_ARGS_APPEND": f"-F {self.peer_ssh_config}"}
        run_true = [*self.mnp, "run", "--verbose", "--nodes", str(n), "--", "true"]
        with self.controller(home, "--inventory", str(self.inv_all)) as pid:
            self.run(run_true, home=home)  # warm-up: not counted
            warm: list[float] = []
            mpi: list[float] = []
            pds: list[float] = []
            inside: list[float] = []
            for _ in range(self.reps):
                # each sample starts once the one before has wound down (a peer's 16
                # sshd sessions close after it exits): none is charged for another's tail
                time.sleep(SETTLE)
                wall, out = self.run(run_true, home=home)
                if "agent(s) ready" in out.stderr:
                    raise RuntimeError("mnp run did not use the running controller")
                warm.append(wall)
                span = self.job_span(home, out.stderr)
                if span is not None:
                    inside.append(span)
                if mpiexec:
                    time.sleep(SETTLE)
                    mpi.append(self.run(mpiexec)[0])
                if pdsh:
                    time.sleep(SETTLE)
                    pds.append(self.run(pdsh, env=pdsh_env)[0])
            self.add(
                Row(
                    f"warm launch: {n} nodes `true` (wall)",
                    "time",
                    warm,
                    "mpiexec -launcher ssh" if mpiexec else "mpiexec unavailable",
                    mpi,
                    "<= 5% of mpiexec",
                    ratio_at_most(0.05),
                    "of which inside the controller (job created -> stopped, from the store): "
                    + fmt_spread("time", inside)
                    + "; the rest is the `mnp run` process (interpreter, imports, socket)",
                )
            )
            self.add(
                Row(
                    f"warm launch: {n} nodes `true` (wall)",
                    "time",
                    warm,
                    "pdsh -R ssh" if pdsh else "pdsh unavailable",
                    pds,
                    "- (shown for reference)",
                )
            )
            self._teardown(home, n)
            self._memory(home, pid, n)

    def phase_pmi(self) -> None:
        """Direct MPI launch (issue 16), against one warm controller: mpi4py's hello on
        every host (one rank each) started by mnp itself, by mpiexec over ssh, and by
        mnp running that mpiexec (the path before issue 16); then 4 ranks per host,
        launch to every rank past MPI_Init."""
        n = self.hosts
        home = self.home("pmi")
        mpiexec = self.peer("mpiexec")
        hello = [sys.executable, "-m", "mpi4py.bench", "helloworld"]
        direct = [*self.mnp, "run", "--nodes", str(n), "--mpi", "pmi", "--", *hello]
        hydra = [
            mpiexec or "mpiexec", "-f", str(self.hostfile), "-n", str(n),
            "-launcher", "ssh", "-launcher-exec", str(self.hydra_exec), *hello,
        ]  # fmt: skip
        via_mnp = self.root / "mpiexec-hello.toml"
        command = ", ".join(
            f'"{a}"'
            for a in [
                mpiexec or "mpiexec", "-f", "$MNP_HOSTFILE", "-n", str(n),
                "-launcher", "ssh", "-launcher-exec", str(self.hydra_exec), *hello,
            ]
        )  # fmt: skip
        via_mnp.write_text(
            f'name = "mpiexec-hello"\ntype = "multinode"\n[multinode]\nnum_nodes = {n}\n'
            f'[[multinode.groups]]\ntarget_nodes = "0"\ncommand = [{command}]\n'
            '[[multinode.groups]]\ntarget_nodes = "1:"\n'
        )
        mnp_mpiexec = [*self.mnp, "run", str(via_mnp)]

        def said_hello(out: subprocess.CompletedProcess[str], size: int) -> None:
            found = len(re.findall(r"Hello, World! I am process +\d+ of +(\d+) ", out.stdout))
            if found != size:
                raise RuntimeError(f"{found} of {size} ranks said hello: {out.stdout[-400:]}")

        wide = 4
        stamp = (
            "import time; t0 = time.time(); from mpi4py import rc; rc.initialize = False; "
            "from mpi4py import MPI; t1 = time.time(); MPI.Init(); t2 = time.time(); "
            "print('init', t1, t2 - t1, flush=True); MPI.Finalize()"
        )
        wide_run = [
            *self.mnp, "run", "--nodes", str(n), "--tasks-per-node", str(wide), "--mpi", "pmi",
            "--", sys.executable, "-c", stamp,
        ]  # fmt: skip
        with self.controller(home, "--inventory", str(self.inv_all)):
            self.run(direct, home=home)  # warm-up: not counted
            ours: list[float] = []
            hyd: list[float] = []
            both: list[float] = []
            to_init: list[float] = []
            in_init: list[float] = []
            for _ in range(self.reps):
                wall, out = self.run(direct, home=home)
                said_hello(out, n)
                ours.append(wall)
                if mpiexec:
                    wall, out = self.run(hydra)
                    said_hello(out, n)
                    hyd.append(wall)
                    wall, out = self.run(mnp_mpiexec, home=home)
                    said_hello(out, n)
                    both.append(wall)
                t0 = time.time()
                _, out = self.run(wide_run, home=home)
                stamps = [line.split() for line in out.stdout.splitlines() if ": init " in line]
                if len(stamps) != n * wide:
                    raise RuntimeError(f"{len(stamps)} of {n * wide} ranks past MPI_Init")
                to_init.append(max(float(s[2]) + float(s[3]) for s in stamps) - t0)
                in_init.append(statistics.median(float(s[3]) for s in stamps))
        peer = "mpiexec -launcher ssh" if mpiexec else "mpiexec unavailable"
        self.add(
            Row(
                f"direct MPI: {n} hosts x 1 rank, mpi4py hello (wall)",
                "time",
                ours,
                peer,
                hyd,
                "<= 10% of mpiexec",
                ratio_at_most(0.10),
                "`mnp run --nodes N --mpi pmi -- python -m mpi4py.bench helloworld` with a "
                "warm controller: the agents start the ranks and serve PMI-1, no ssh",
            )
        )
        self.add(
            Row(
                f"direct MPI: {n} hosts x 1 rank, mpi4py hello (wall)",
                "time",
                ours,
                "mnp running mpiexec" if mpiexec else "mpiexec unavailable",
                both,
                "<= 50% of mnp running mpiexec",
                ratio_at_most(0.50),
                "the peer: `mnp run` of a definition whose node 0 runs "
                "`mpiexec -f $MNP_HOSTFILE -launcher ssh` and whose other nodes are held "
                "(the path before issue 16), same warm controller",
            )
        )
        self.add(
            Row(
                f"direct MPI: {n} hosts x {wide} ranks, launch to all past MPI_Init",
                "time",
                to_init,
                note=f"from `mnp run` starting to the last of {n * wide} ranks leaving "
                "MPI_Init (the ranks' own clocks; includes the run process, the main node "
                "first, then the others, and each rank's Python and mpi4py import)",
            )
        )
        self.add(
            Row(
                f"direct MPI: {n} hosts x {wide} ranks, MPI_Init per rank (median)",
                "time",
                in_init,
                note="each rank's MPI_Init alone: PMI init, its puts, the barriers "
                "(the agents' per-node merge, one exchange through the controller) and gets; "
                "it waits for the slowest rank of the world, so this is the exchange cost "
                "per rank as a rank sees it",
            )
        )

    def job_span(self, home: Path, stderr: str) -> float | None:
        """created -> stopped of the job that ``mnp run --verbose`` reported, from the store."""
        from mnp.store import Store

        m = re.search(r"^mnp: job (\S+) attempt", stderr, re.M)
        if m is None:
            return None
        for _ in range(50):  # the controller commits every 20 ms
            with Store(home / "mnp.db", readonly=True) as store:
                job = store.get_job(m.group(1))
            if job and job.get("stopped") and job.get("created"):
                return float(job["stopped"]) - float(job["created"])
            time.sleep(0.02)
        return None

    def _teardown(self, home: Path, n: int) -> None:
        definition = self.root / "teardown.toml"
        definition.write_text(
            f'name = "teardown"\ntype = "multinode"\n[multinode]\nnum_nodes = {n}\n'
            '[[multinode.groups]]\ntarget_nodes = "0"\ncommand = ["sleep", "0.5"]\n'
            '[[multinode.groups]]\ntarget_nodes = "1:"\ncommand = ["sleep", "1000"]\n'
        )
        reaped: list[float] = []
        running: list[float] = []
        left = 0
        for _ in range(self.reps):
            _, out = self.run([*self.mnp, "run", "--verbose", str(definition)], home=home)
            t = attempt_timings(out.stderr)
            if t.get("main_exit_to_reaped") is not None:
                reaped.append(float(t["main_exit_to_reaped"]))
            if t.get("placement_to_running") is not None:
                running.append(float(t["placement_to_running"]))
            left += self.leftover_sleeps()
        self.add(
            Row(
                f"warm: placement -> {n} nodes RUNNING",
                "time",
                running,
                goal="<= 15 ms",
                check=at_most(0.015),
                note="placement_to_running of the teardown job (main `sleep 0.5`, children "
                "`sleep 1000`): a job of `true` ends before its children are RUNNING",
            )
        )
        self.add(
            Row(
                f"teardown: main exit -> {n - 1} children reaped",
                "time",
                reaped,
                goal="<= 40 ms",
                check=at_most(0.040),
                note=f"main_exit_to_reaped; `sleep 1000` left on the hosts after all runs: {left}",
            )
        )

    def _memory(self, home: Path, pid: int, n: int) -> None:
        proc = psutil.Process(pid)
        idle = proc.memory_info().rss
        size = self.mem_array
        wall, out = self.run(
            [*self.mnp, "submit", "--array-size", str(size), "--array-parallelism", str(n)]
            + ["--", "sleep", "1000"],
            home=home,
        )
        job_id = out.stdout.strip().splitlines()[-1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sleeping = sum(1 for p in self.host_procs() if _is_sleep(p))
            if sleeping >= n:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        rss = []
        for _ in range(max(self.reps, 5)):
            rss.append(float(proc.memory_info().rss))
            time.sleep(0.2)
        agent_rss = []
        for a in self.agents():
            with contextlib.suppress(psutil.Error):
                agent_rss.append(float(a.memory_info().rss))
        self.add(
            Row(
                f"memory: controller, {size:,} jobs, {n} hosts",
                "bytes",
                rss,
                goal="<= 100 MB",
                check=at_most(100e6),
                note=f"an array of {size:,} `sleep 1000` ({n} running, the rest queued) held by "
                f"the daemon; RSS before it: {idle / 1e6:.1f} MB; `mnp submit` of it took "
                f"{wall:.2f}s",
            )
        )
        self.add(
            Row(
                "memory: one agent (spread: across hosts)",
                "bytes",
                agent_rss,
                goal="<= 30 MB",
                check=at_most(30e6),
                note=f"{len(agent_rss)} agents, while that array runs {n} `sleep 1000` on them",
            )
        )
        t0 = time.perf_counter()
        with self.api(home) as client:
            client.request("terminate", job_id=job_id, reason="benchmark done")
            client.timeout = 300
            client.request("wait", job_id=job_id)
        self.notes.append(
            f"terminating the {size:,}-child array (cascade to every child) took "
            f"{time.perf_counter() - t0:.2f}s"
        )

    def phase_cold(self) -> None:
        n = self.hosts
        home = self.home("cold")
        mpiexec = self.mpiexec_argv()
        cold, mpi, ready, floor, least = [], [], [], [], []
        argv = [*self.mnp, "run", "--verbose", "--inventory", str(self.inv_all)]
        argv += ["--nodes", str(n), "--", "true"]
        # the floor under both: one OpenSSH login per host running `true`, all at once
        addresses = " ".join(h.address for h in self.cluster.hosts[:n])
        logins = ["sh", "-c", f"for a in {addresses}; do {self.hydra_exec} $a true & done; wait"]
        for _ in range(self.reps):
            wall, out = self.run(argv, home=home)
            cold.append(wall)
            m = re.search(r"agent\(s\) ready in ([\d.]+)s", out.stderr)
            if m:
                ready.append(float(m.group(1)))
            if mpiexec:
                mpi.append(self.run(mpiexec)[0])
            floor.append(self.run(logins)[0])
            least.append(self.run([sys.executable, str(FLOOR), str(self.inv_all)])[0])
        note = ""
        if ready:
            note = f"of which connecting to {n} hosts and starting their agents: " + fmt_spread(
                "time", ready
            )
        self.add(
            Row(
                f"cold launch: {n} nodes `true` (wall)",
                "time",
                cold,
                "mpiexec -launcher ssh" if mpiexec else "mpiexec unavailable",
                mpi,
                "<= 0.9x mpiexec",
                ratio_at_most(0.9),
                note,
            )
        )
        self.add(
            Row(
                f"cold launch: {n} nodes `true` (wall)",
                "time",
                cold,
                f"{n} x `ssh HOST true` at once",
                floor,
                "- (shown for reference)",
                note="the SSH floor: one OpenSSH login per host and nothing else (each login "
                "runs the host's shell start-up, as mnp's agent and mpiexec's proxy do)",
            )
        )
        self.add(
            Row(
                f"cold launch: {n} nodes `true` (wall)",
                "time",
                cold,
                "asyncssh_floor.py",
                least,
                "- (shown for reference)",
                note="benchmarks/asyncssh_floor.py: import asyncssh, connect to every host, "
                "start the agent, wait for `ready`, close; no controller, store or job",
            )
        )

    def phase_arrays(self) -> None:
        size = self.array_size
        local_home, ssh_home = self.home("array-local"), self.home("array-ssh")
        local_argv = [*self.mnp, "run", "--array-size", str(size), "--", "true"]
        ssh_argv = [*self.mnp, "run", "--inventory", str(self.inv_array)]
        ssh_argv += ["--array-size", str(size), "--", "true"]
        lines = "".join(f"{i}\n" for i in range(size)).encode()
        xargs, par = self.peer("xargs"), self.peer("parallel")
        local, ssh, xa, pa = [], [], [], []
        fixed: dict[str, list[float]] = {"local": [], "ssh": []}
        one = ["--", "true"]
        for _ in range(self.reps):
            local.append(size / self.run(local_argv, home=local_home)[0])
            ssh.append(size / self.run(ssh_argv, home=ssh_home)[0])
            # what a 1-task run costs: start-up and shutdown, paid once per command
            fixed["local"].append(self.run([*self.mnp, "run", *one], home=local_home)[0])
            argv = [*self.mnp, "run", "--inventory", str(self.inv_array), *one]
            fixed["ssh"].append(self.run(argv, home=ssh_home)[0])
            if xargs:
                xa.append(size / self.run([xargs, "-P", "2", "-n", "1", "true"], stdin=lines)[0])
            if par:
                argv = [par, "--will-cite", "-j", "2", "true"]
                pa.append(size / self.run(argv, stdin=lines)[0])
        local_name = f"array {size:,} x `true`: local default"
        ssh_name = f"array {size:,} x `true`: {self.array_hosts} sshd hosts"
        for name, values, limit, key in (
            (local_name, local, 0.95, "local"),
            (ssh_name, ssh, 0.85, "ssh"),
        ):
            once = statistics.median(fixed[key])
            steady = [size / max(size / v - once, 1e-3) for v in values]
            note = (
                "children/s = size / wall time of the whole command; a 1-task run takes "
                f"{fmt_spread('time', fixed[key])}; without that: {fmt_spread('rate', steady)}"
            )
            for peer, peer_values, goal, check in (
                ("xargs -P 2", xa, f">= {limit}x xargs -P 2", ratio_at_least(limit)),
                ("parallel -j 2", pa, "- (shown for reference)", None),
            ):
                self.add(
                    Row(
                        name,
                        "rate",
                        values,
                        peer if peer_values else f"{peer.split()[0]} unavailable",
                        peer_values,
                        goal,
                        check,
                        note,
                    )
                )

    def phase_query(self) -> None:
        # submit of a 10,000-child array to a running controller (local inventory)
        home = self.home("submit")
        size = self.submit_size
        submits: list[float] = []
        big: list[float] = []
        floor: list[float] = []
        with self.controller(home):
            for i in range(self.reps + 1):
                for n, into in ((size, submits), (10 * size, big)):
                    argv = [*self.mnp, "submit", "--array-size", str(n), "--", "true"]
                    wall, out = self.run(argv, home=home)
                    job_id = out.stdout.strip().splitlines()[-1]
                    if i:  # the first one warms the page cache: not counted
                        into.append(wall)
                    with self.api(home) as client:
                        client.request("terminate", job_id=job_id, reason="benchmark done")
                        client.timeout = 300
                        client.request("wait", job_id=job_id)
                floor.append(self.run([*self.mnp, "--version"])[0])
        self.add(
            Row(
                f"submit --array-size {size:,}",
                "time",
                submits,
                "mnp --version (CLI start)",
                floor,
                "<= 150 ms and <= 2x CLI start",
                both(at_most(0.150), ratio_at_most(2.0)),
                "peer column: the same CLI doing nothing, i.e. the floor of any mnp command",
            )
        )
        self.add(
            Row(
                f"submit --array-size {10 * size:,}",
                "time",
                big,
                "mnp --version (CLI start)",
                floor,
                "<= 1 s",
                at_most(1.0),
                "then terminated and waited for, as the row above",
            )
        )
        # list and describe with 100,000 jobs stored
        home = self.home("store")
        target = self.populate(home, self.stored_jobs)
        lists, describes = [], []
        for _ in range(self.reps):
            wall, out = self.run([*self.mnp, "list"], home=home)
            lists.append(wall)
            rows = out.stdout.count("\n") - 1
            wall, _ = self.run([*self.mnp, "describe", target], home=home)
            describes.append(wall)
        self.add(
            Row(
                f"list: {self.stored_jobs:,} jobs stored",
                "time",
                lists,
                "mnp --version (CLI start)",
                floor,
                "<= 300 ms",
                at_most(0.300),
                f"`mnp list` printed {rows:,} rows",
            )
        )
        self.add(
            Row(
                f"describe: {self.stored_jobs:,} jobs stored",
                "time",
                describes,
                "mnp --version (CLI start)",
                floor,
                "<= 300 ms",
                at_most(0.300),
                f"`mnp describe {target}`: a {self.hosts}-node job, 2 attempts",
            )
        )

    def populate(self, home: Path, count: int) -> str:
        """``count`` finished top-level jobs, written with ``Store.add_jobs``: 80% single,
        20% multi-node (with attempts and nodes). Returns the id of a multi-node job."""
        from mnp.spec import definition_from_command, definition_to_dict
        from mnp.store import Store

        t0 = time.perf_counter()
        single = definition_to_dict(definition_from_command(["true"], cwd=str(self.root)))
        multi = definition_to_dict(
            definition_from_command(["true"], nodes=self.hosts, cwd=str(self.root))
        )
        now = time.time() - 86400
        target = str(count // 2 // 5 * 5)  # every 5th job is multi-node
        with Store(home / "mnp.db") as store:
            store.set_meta("controller_token", "0123456789abcdef")
            rows = []
            for i in range(1, count + 1):
                mn = i % 5 == 0
                t = now + i * 0.01
                failed = i % 17 == 0
                rows.append(
                    {
                        "id": str(i),
                        "seq": i,
                        "name": "mpi" if mn else "true",
                        "queue": "default",
                        "type": "multinode" if mn else "single",
                        "state": "FAILED" if failed else "SUCCEEDED",
                        "reason": "Essential container in task exited" if failed else None,
                        "created": t,
                        "started": t + 0.001,
                        "stopped": t + 0.5,
                        "exit_code": 1 if failed else 0,
                        "attempt_count": 2 if mn else 1,
                        "definition": multi if mn else single,
                        "depends_on": [],
                        "num_nodes": self.hosts if mn else None,
                    }
                )
            store.add_jobs(rows)
            hosts = [h.name for h in self.cluster.hosts[: self.hosts]] if self.cluster else []
            hosts = hosts or [f"node{i:02d}" for i in range(self.hosts)]
            for i in range(1, count + 1):
                mn = i % 5 == 0
                t = now + i * 0.01
                for number in (1, 2) if mn else (1,):
                    store.upsert_attempt(
                        str(i),
                        number,
                        ce="default",
                        hosts=hosts if mn else hosts[:1],
                        placed_at=t,
                        running_at=t + 0.005,
                        main_exit_at=t + 0.4,
                        reaped_at=t + 0.41,
                        stopped_at=t + 0.5,
                        exit_code=0,
                        final_state="SUCCEEDED",
                    )
                if mn:
                    for k in range(self.hosts):
                        store.upsert_node(
                            str(i), 2, k, host=hosts[k], grp=0, state="SUCCEEDED", exit_code=0
                        )
            store.flush()
        log(f"stored {count:,} jobs in {time.perf_counter() - t0:.1f}s")
        return target

    def phase_scale(self) -> None:
        self._decide()
        self._fake_controller(with_store=False)
        self._fake_controller(with_store=True)

    # --- simulated scale ------------------------------------------------------

    def _decide(self) -> None:
        from mnp.model import ComputeEnvironment, Queue, Resources
        from mnp.sched.alloc import HostCapacity
        from mnp.sched.decide import Request, decide
        from mnp.sched.runqueue import RunQueue

        nh, nq = self.sim_hosts, self.sim_queued

        def hosts() -> dict[str, HostCapacity]:
            return {
                f"h{i:04d}": HostCapacity(
                    f"h{i:04d}", 8.0, 64 * GiB, tuple(range(4)) if i % 10 == 0 else ()
                )
                for i in range(nh)
            }

        names = tuple(hosts())
        ces = {"all": ComputeEnvironment("all", names)}
        queues = {"default": Queue("default", 1, ("all",)), "high": Queue("high", 10, ("all",))}
        rng = random.Random(42)
        task = Resources(1.0, 512 * 1024**2, 0)
        singles = [
            Resources(1.0, 1 * GiB, 0),
            Resources(2.0, 4 * GiB, 0),
            Resources(4.0, 8 * GiB, 0),
            Resources(1.0, 2 * GiB, 1),
        ]
        node = Resources(4.0, 16 * GiB, 0)
        requests = []
        kinds = {"array": 0, "single": 0, "multinode": 0}
        for seq in range(1, nq + 1):
            x = rng.random()
            q = "high" if rng.random() < 0.1 else "default"
            if x < 0.6:
                requests.append(Request(f"1:{seq}", "default", seq, (task,)))
                kinds["array"] += 1
            elif x < 0.9:
                requests.append(Request(str(seq), q, seq, (rng.choice(singles),)))
                kinds["single"] += 1
            else:
                nodes = (node,) * rng.choice([2, 4, 8, 16])
                requests.append(Request(str(seq), q, seq, nodes, exclusive=True))
                kinds["multinode"] += 1
        mix = ", ".join(f"{v:,} {k}" for k, v in kinds.items())

        def runq(skip: set[str]) -> RunQueue:
            rq = RunQueue()
            for r in requests:
                if r.key not in skip:
                    rq.add(r)
            return rq

        rq = runq(set())
        empty, freed, placed = [], [], 0
        for _ in range(self.reps):
            caps = hosts()
            t0 = time.perf_counter()
            starts = decide(rq.by_queue(), queues, ces, caps)
            empty.append(time.perf_counter() - t0)
            placed = len(starts)
        rest = runq({s.key for s in starts})
        by_key = {r.key: r for r in requests}
        for i in range(self.reps):
            grant = starts[i * 7 % len(starts)].grants[0]
            caps[grant.host].give(grant)  # one task ended: the pass that follows
            t0 = time.perf_counter()
            again = decide(rest.by_queue(), queues, ces, caps)
            freed.append(time.perf_counter() - t0)
            for s in again:  # what it placed leaves the queue, as in the controller
                rest.discard(by_key[s.key])
        self.add(
            Row(
                f"decide(): {nh:,} hosts, {nq:,} queued, empty",
                "time",
                empty,
                goal="<= 50 ms a pass",
                check=at_most(0.050),
                note=f"queued: {mix}; the pass placed {placed:,}; includes RunQueue.by_queue()",
            )
        )
        self.add(
            Row(
                f"decide(): {nh:,} hosts, {nq:,} queued, full, 1 freed",
                "time",
                freed,
                goal="<= 50 ms a pass",
                check=at_most(0.050),
                note="the pass that runs after every task end while the queue is deep",
            )
        )

    def _fake_controller(self, *, with_store: bool) -> None:
        rates = []
        dispatched = 0
        for _ in range(self.reps):
            n, wall = asyncio.run(self._fake_run(with_store))
            rates.append(n / wall)
            dispatched = n
        what = "daemon (SQLite)" if with_store else "Controller"
        self.add(
            Row(
                f"fake {self.sim_hosts:,} hosts: dispatch rate, {what}",
                "rate",
                rates,
                goal=">= 2,000/s",
                check=at_least(2000.0),
                note=f"{dispatched:,} spawns a run: an array of {self.fake_array:,}, "
                f"{self.fake_array // 200} x 8-node jobs, {self.fake_array // 20:,} single jobs; "
                "submit to last job done",
            )
        )

    async def _fake_run(self, with_store: bool) -> tuple[int, float]:
        """As a controller process runs it: ``tune_gc()`` first (the collector's settings
        are put back after)."""
        import gc

        threshold = gc.get_threshold()
        try:
            return await self._fake_run_tuned(with_store)
        finally:
            gc.unfreeze()
            gc.set_threshold(*threshold)

    async def _fake_run_tuned(self, with_store: bool) -> tuple[int, float]:
        from mnp.controller import Controller, tune_gc
        from mnp.model import ComputeEnvironment, HostSpec, Inventory, Queue
        from mnp.spec import definition_from_command
        from mnp.transport.fake import FakeTransport

        hosts = tuple(
            HostSpec(
                name=f"fake-{i:04d}",
                address=f"fake-{i:04d}",
                vcpus=2,
                memory=8 * GiB,
                gpus=0,
                transport="fake",
            )
            for i in range(self.sim_hosts)
        )
        names = tuple(h.name for h in hosts)
        inventory = Inventory(
            "fake",
            hosts,
            {"default": ComputeEnvironment("default", names)},
            {"default": Queue("default", 1, ("default",))},
        )
        transport = FakeTransport(keep=False)
        tune_gc()
        service: Any = None
        if with_store:
            from mnp.daemon import prepare_home
            from mnp.service import Service

            home = prepare_home(tempfile.mkdtemp(dir=self.root, prefix="fake-home-"))
            service = Service(home, inventory)
            service.controller.hosts.transports = {"fake": transport}
            await service.start()
            controller = service.controller
        else:
            controller = Controller(inventory, {"fake": transport})
            await controller.start()
        cwd = str(self.root)
        array = definition_from_command(["true"], array_size=self.fake_array, cwd=cwd)
        multi = definition_from_command(["true"], nodes=8, cwd=cwd)
        single = definition_from_command(["true"], cwd=cwd)
        try:
            t0 = time.perf_counter()
            jobs = [controller.submit(array)]
            for i in range(self.fake_array // 20):
                if i % 10 == 0:
                    jobs.append(controller.submit(multi))
                jobs.append(controller.submit(single))
            if service is not None:
                service.flush()  # as op_submit does before it answers
            for job in jobs:
                await controller.wait(job)
            wall = time.perf_counter() - t0
            failed = [j.id for j in jobs if j.state.value != "SUCCEEDED"]
            if failed:
                raise RuntimeError(f"fake run: jobs {failed[:5]} did not succeed")
            return transport.spawns, wall
        finally:
            if service is not None:
                await service.shutdown()
            else:
                await controller.close()

    # ======================================================================= driver

    def main(self) -> int:
        started = time.perf_counter()
        info = machine()
        log(f"scratch directory {self.root}; phases: {', '.join(self.phases)}")
        compiled = compileall.compile_dir(str(REPO / "mnp"), quiet=1)
        info["bytecode"] = (
            "mnp/ compiled before the run (as pip does at install)"
            if compiled
            else "mnp/ could not be compiled: commands compile from source"
        )
        try:
            self.find_tools()
            if any(p in self.phases for p in ("warm", "cold", "arrays", "pmi")):
                self.start_cluster()
            for phase in self.phases:
                fn = getattr(self, f"phase_{phase}", None)
                if fn is None:
                    raise SystemExit(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
                log(f"phase {phase}")
                try:
                    fn()
                except Exception as e:  # one broken phase must not hide the others
                    traceback.print_exc()
                    self.rows.append(Row(f"{phase} (failed)", "time", error=str(e)))
        finally:
            self.stack.close()
            shutil.rmtree(self.root, ignore_errors=True)
        info["load after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        elapsed = time.perf_counter() - started
        print()
        print(text_table(self.rows))
        notes = self.footnotes()
        if notes:
            print()
            print("\n".join(notes))
        print(f"\n{self.describe_run()}; {elapsed:.0f}s in all")
        self.write_markdown(info, elapsed, notes)
        return 0

    def describe_run(self) -> str:
        mode = "--quick" if self.quick else "full"
        transport = f", SSH transport {self.ssh_transport}" if self.ssh_transport else ""
        return (
            f"mode {mode}: {self.reps} repetitions, {self.hosts} sshd hosts for launches, "
            f"{self.array_size:,}-child arrays on {self.array_hosts} hosts{transport}"
        )

    def footnotes(self) -> list[str]:
        out = []
        seen: set[str] = set()
        for i, r in enumerate(self.rows, 1):
            if r.note and r.note not in seen:
                seen.add(r.note)
                out.append(f"{i}. {r.name}: {r.note}")
        for n in self.notes:
            out.append(f"- {n}")
        return out

    def write_markdown(self, info: dict[str, str], elapsed: float, notes: list[str]) -> None:
        command = " ".join(["python benchmarks/run.py", *self.argv])
        lines = [
            "# mnp benchmark results",
            "",
            f"Written by `{command}` in {elapsed:.0f}s "
            f"({self.describe_run()}). What each figure means: [README.md](README.md).",
            "",
            "| machine | |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v} |" for k, v in info.items()]
        lines += ["", markdown_table(self.rows), ""]
        if notes:
            lines += ["Notes (numbered by row):", ""]
            lines += [n if n.startswith("-") else f"- {n}" for n in notes]
            lines.append("")
        lines += ["<details><summary>raw samples</summary>", "", "```"]
        for r in self.rows:
            m = ", ".join(f"{v:.6g}" for v in r.mnp)
            p = ", ".join(f"{v:.6g}" for v in r.peer_values)
            lines.append(f"{r.name}\n  mnp: [{m}]\n  {r.peer}: [{p}]")
        lines += ["```", "", "</details>", ""]
        self.out.write_text("\n".join(lines))
        log(f"wrote {self.out}")


def _is_sleep(p: psutil.Process) -> bool:
    try:
        return p.cmdline() == ["sleep", "1000"]
    except psutil.Error:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 reps, 8 hosts, 1,000-child arrays")
    ap.add_argument("--reps", type=int, help="repetitions (default 5, 3 with --quick)")
    ap.add_argument("--hosts", type=int, help="sshd hosts for launches (default 16, 8 quick)")
    ap.add_argument("--only", help=f"comma-separated phases: {','.join(PHASES)}")
    ap.add_argument("--out", help="Markdown results file (default benchmarks/results.md)")
    ap.add_argument(
        "--ssh-transport",
        choices=("asyncssh", "openssh"),
        help="the sshd inventories' [ssh] transport (default: mnp's default)",
    )
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # so that every controller and sshd is stopped

    signal.signal(signal.SIGTERM, on_term)
    return Bench(args).main()


if __name__ == "__main__":
    sys.exit(main())
