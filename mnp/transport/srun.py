"""The srun transport: the agent as a one-task Slurm job step on a node of the allocation.

Inside a Slurm allocation (``SLURM_JOB_ID`` set) the agent on node NODE is started with::

    srun --jobid=JOB --nodelist=NODE --nodes=1 --ntasks=1 --overlap --cpu-bind=none
         [--cpus-per-task=VCPUS] --unbuffered --quiet
         --job-name=mnp-agent <python> -c BOOTSTRAP --parent-death --ctl TOKEN

and speaks the agent protocol over srun's stdin/stdout: no SSH, no sshd on the nodes.

- ``--overlap``: the agent's step shares the node with every other step of the job (another
  agent, the user's own ``srun``), so it never waits for resources and never blocks them.
- ``--cpus-per-task`` = the node's vcpus (when Slurm told them, ``SLURM_JOB_CPUS_PER_NODE``):
  where ``task/cgroup`` confines a step to its CPUs, the agent's tasks may use the whole node;
  ``--cpu-bind=none`` leaves their placement to mnp.
- ``<python>``: the Python mnp runs from (``sys.executable``, usually the submitter's venv on a
  shared file system), or ``MNP_SRUN_PYTHON``. The bootstrap is the SSH transport's: if
  ``mnp.agent`` does not import there the agent's source is sent over stdin. srun exports the
  whole environment (``--export=ALL``, its default), with that Python's ``bin`` first on
  ``PATH`` as for local nodes; a job's ``python_env`` is applied by the agent as everywhere.
- Closing stdin ends the agent (it kills its tasks, then exits); if the controller dies, srun
  dies with it and Slurm kills the step. A step that ends (node failure, ``scancel``) ends the
  stream: the host is lost, as with a dropped SSH connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence

from mnp.errors import TransportError
from mnp.model import HostSpec, Inventory
from mnp.spec.nodeset import fold_nodeset
from mnp.transport.base import MAX_LINE, AgentStream, Transport
from mnp.transport.bootstrap import SOURCE_REQUEST, agent_blob, bootstrap

STDERR_TAIL = 4096
CLOSE_WAIT = 10.0  # seconds the agent gets to tear down after its stdin closes
_SRUN_EXIT = re.compile(r"srun: error: \S+: task \d+: (Exited with exit code|Killed)")


def srun_argv(
    srun: str,
    job_id: str,
    host: HostSpec,
    python: str,
    agent_args: list[str],
    job_env: Mapping[str, str] | None = None,
) -> list[str]:
    """The command that starts the agent on ``host`` as a step of job ``job_id``."""
    argv = [
        srun,
        f"--jobid={job_id}",
        f"--nodelist={host.name}",
        "--nodes=1",
        "--ntasks=1",
        "--overlap",
        "--cpu-bind=none",
        "--unbuffered",
        "--quiet",
        "--job-name=mnp-agent",
    ]
    if host.vcpus:
        argv.append(f"--cpus-per-task={host.vcpus}")
    if job_env:  # set inside the step, after srun has set its own
        argv += ["env", *(f"{k}={v}" for k, v in sorted(job_env.items()))]
    return [*argv, python, "-c", bootstrap(), "--parent-death", *agent_args]


class _SrunStream(AgentStream):
    """srun's stdin/stdout; answers the bootstrap's source request before ``ready``."""

    def __init__(self, host: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.host = host
        self.proc = proc
        self.shipped = False  # whether the agent's source was sent (mnp not importable there)
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self._ready = False
        self._stderr = bytearray()
        self._stderr_task = asyncio.get_running_loop().create_task(self._read_stderr(proc.stderr))

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while chunk := await stream.read(STDERR_TAIL):
                self._stderr += chunk
                del self._stderr[:-STDERR_TAIL]

    def stderr_tail(self) -> str:
        """What srun and the agent said; srun's own "task 0: Exited with exit code N"
        line is left out when something else says why (execve's error, a traceback)."""
        lines = self._stderr.decode(errors="replace").strip().splitlines()
        said = [ln for ln in lines if not _SRUN_EXIT.match(ln)]
        return "\n".join(said or lines)

    async def readline(self) -> bytes:
        line = await self._stdout.readline()
        while not self._ready and line == SOURCE_REQUEST:
            self.write(agent_blob())
            await self.drain()
            self.shipped = True
            line = await self._stdout.readline()
        if not line and not self._ready:
            # let srun's last words (why the step failed) reach stderr_tail
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 1)
        self._ready = True
        return line

    def write(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as e:
            raise TransportError(f"{self.host}: srun pid {self.proc.pid}: {e}") from None

    async def drain(self) -> None:
        try:
            await self._stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise TransportError(f"{self.host}: srun pid {self.proc.pid}: {e}") from None

    async def close(self) -> None:
        if not self._stdin.is_closing():
            self._stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), CLOSE_WAIT)
        except TimeoutError:
            # srun forwards the first SIGINT/SIGTERM to the step; a second one ends it
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._stderr_task.cancel()


class SrunTransport(Transport):
    """Agents as job steps of the Slurm job ``job_id``, started by ``srun``."""

    name = "srun"

    def __init__(
        self,
        job_id: str,
        python: str | None = None,
        srun: str = "srun",
        environ: Mapping[str, str] | None = None,
        job_env: Mapping[str, str] | None = None,
    ) -> None:
        self.job_id = job_id
        self.job_env = dict(job_env or {})  # set for the agent inside its step
        self.python = python or sys.executable
        self.srun = srun
        self.environ = environ  # srun's environment; None = this process's at each open

    async def open(self, host: HostSpec, agent_args: list[str]) -> AgentStream:
        env = dict(os.environ if self.environ is None else self.environ)
        bindir = os.path.dirname(self.python)
        path = env.get("PATH", "")
        if bindir and bindir not in path.split(os.pathsep):
            env["PATH"] = bindir + (os.pathsep + path if path else "")
        argv = srun_argv(self.srun, self.job_id, host, self.python, agent_args, self.job_env)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=MAX_LINE,
                env=env,
            )
        except OSError as e:
            raise TransportError(f"{host.name}: cannot run {self.srun}: {e}") from None
        return _SrunStream(host.name, proc)


def allocation_vars(nodes: Sequence[str]) -> dict[str, str]:
    """What an agent started from outside an allocation (a managed environment's) sets
    for itself and its tasks: the whole allocation's node list and count. A step started
    from outside sees only its own node there, and an ``mpiexec`` that starts its ranks
    with ``srun`` over the allocation's nodes would be refused ("Only allocated 1 nodes
    asked for 2")."""
    nodelist = fold_nodeset(list(nodes))
    count = str(len(nodes))
    return {
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": count,
        "SLURM_NNODES": count,
    }


def job_id_from(environ: Mapping[str, str]) -> str | None:
    """The Slurm job mnp runs in, if any."""
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or ""
    return job.strip() or None


def make(inventory: Inventory, environ: Mapping[str, str] = os.environ) -> SrunTransport:
    job = job_id_from(environ)
    if job is None:
        raise TransportError(
            f"{inventory.source}: transport srun needs a Slurm allocation (SLURM_JOB_ID is not "
            'set); run mnp inside sbatch/salloc, or use transport = "ssh"'
        )
    srun = shutil.which("srun", path=environ.get("PATH")) or "srun"
    return SrunTransport(job, python=environ.get("MNP_SRUN_PYTHON") or None, srun=srun)
