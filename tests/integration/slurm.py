"""A real Slurm 22.05 cluster of 4 nodes on this one machine, for the integration tests.

``SlurmCluster.start(root)`` runs, all under ``root`` and in the foreground (so the
test session owns every daemon by its pid):

- ``munged -F --force`` on its own socket with a key made for it (1024 random bytes),
  so the machine's own munged (if any) and other test sessions are untouched;
- ``slurmctld -D`` with ``SLURM_CONF=root/slurm.conf``: ``ClusterName`` unique to this
  process, ports found free at start, state, spool, logs and pid files under ``root``,
  ``AuthInfo=socket=...`` pointing at that munged;
- ``slurmd -D -N nX`` for ``n1..n4`` (Slurm's multiple-slurmd mode: every node is
  ``localhost`` on its own port, ``$SLURMD_NODENAME`` tells them apart),

then waits until ``sinfo -N`` shows every node idle. ``env`` is ``os.environ`` plus
``SLURM_CONF``: pass it to ``sbatch``/``srun``/``squeue``. ``close()`` cancels every
job, stops the daemons (TERM, then KILL) and the ``slurmstepd`` left by their steps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

NODES = 4
CPUS_PER_NODE = 2
START_TIMEOUT = 60.0  # seconds for every node to show idle (a 2-core CI machine is slow)


class SlurmUnavailable(Exception):
    """This machine cannot run the cluster (slurm-wlm or munge not installed)."""


def _free_ports(n: int) -> list[int]:
    """``n`` TCP ports nobody listens on now (the kernel's choice, kept apart)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _which(name: str) -> str:
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    found = shutil.which(name)
    if not found:
        raise SlurmUnavailable(f"{name} not found; install slurm-wlm and munge")
    return found


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    nodes: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def start(cls, root: Path, nodes: int = NODES) -> SlurmCluster:
        progs = {n: _which(n) for n in ("munged", "slurmctld", "slurmd", "sinfo", "srun")}
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # munged wants its socket's folders searchable by all
        names = [f"n{i}" for i in range(1, nodes + 1)]
        for n in names:
            (root / "spool" / n).mkdir(parents=True, exist_ok=True)
        (root / "state").mkdir(exist_ok=True)
        sock = root / "munge.sock"
        if len(str(sock)) > 100:
            raise SlurmUnavailable(f"{root}: path too long for a unix socket")
        key = root / "munge.key"
        # a munge key is random bytes (mungekey -c writes 1024 of them); no tool needed
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        ctld_port, *node_ports = _free_ports(1 + nodes)
        conf = root / "slurm.conf"
        conf.write_text(_slurm_conf(root, sock, ctld_port, names, node_ports))
        env = dict(os.environ, SLURM_CONF=str(conf))
        for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del env[var]
        cluster = cls(root=root, conf=conf, env=env, nodes=names)
        try:
            cluster._spawn(
                "munged",
                [
                    progs["munged"],
                    "-F",
                    "--force",
                    f"--socket={sock}",
                    f"--key-file={key}",
                    f"--pid-file={root / 'munged.pid'}",
                    f"--log-file={root / 'munged.log'}",
                    f"--seed-file={root / 'munged.seed'}",
                ],
            )
            cluster._wait(lambda: sock.exists(), 20, "munged did not create its socket")
            cluster._spawn("slurmctld", [progs["slurmctld"], "-D"])
            for n in names:
                cluster._spawn(n, [progs["slurmd"], "-D", "-N", n])
            cluster._wait(cluster._all_idle, START_TIMEOUT, "nodes did not all become idle")
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - kept open for the daemon
        with log:
            self.procs[name] = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}): {self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout:g}s: {self.logs()}")

    def wait_idle(self, timeout: float = 60) -> None:
        """Until every node is idle again (what earlier tests held is given back)."""
        self._wait(self._all_idle, timeout, "nodes did not all become idle")

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-N", "-h", "-o", "%N %t", check=False).stdout
        states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
        return all(states.get(n) == "idle" for n in self.nodes)

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        return subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )

    def sbatch(self, *args: str) -> str:
        """``sbatch --parsable ARGS``: the job id."""
        out = self.run("sbatch", "--parsable", *args).stdout.strip()
        return out.split(";")[0]

    def wait_job(self, job_id: str, timeout: float = 120) -> str:
        """Wait until the job leaves the queue; its final state (``scontrol show job``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
            state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")
            if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                return state
            time.sleep(0.3)
        raise TimeoutError(f"slurm job {job_id} still running after {timeout:g}s")

    def logs(self) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            with contextlib.suppress(OSError):
                tail = f.read_text(errors="replace").strip().splitlines()[-5:]
                parts.append(f"[{f.name}] " + " | ".join(tail))
        return "\n".join(parts)

    def close(self) -> None:
        """Cancel every job, stop every daemon and step this cluster started."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False, timeout=20)
            with contextlib.suppress(Exception):
                deadline = time.monotonic() + 10
                while (
                    time.monotonic() < deadline
                    and self.run("squeue", "-h", check=False, timeout=20).stdout.strip()
                ):
                    time.sleep(0.3)
        # slurmstepd of this cluster's nodes: they run with our spool dir in their argv/cwd
        spool = str(self.root / "spool")
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        for proc in psutil.process_iter(["name", "cwd"]):
            with contextlib.suppress(psutil.Error):
                if proc.info["name"] == "slurmstepd" and (proc.info["cwd"] or "").startswith(spool):
                    proc.kill()


def _slurm_conf(root: Path, sock: Path, ctld_port: int, names: list[str], ports: list[int]) -> str:
    lines = [
        f"ClusterName=mnptest{os.getpid()}",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={sock}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SchedulerParameters=sched_interval=1",
        "MinJobAge=30",
        "KillWait=5",
        "SlurmdTimeout=60",
        "InactiveLimit=0",
    ]
    for n, port in zip(names, ports, strict=True):
        lines.append(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={CPUS_PER_NODE} RealMemory=2000 State=UNKNOWN"
        )
    lines.append(
        f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP"
    )
    return "\n".join(lines) + "\n"
