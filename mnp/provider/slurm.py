"""Slurm allocations for a managed compute environment: ``sbatch``, ``squeue``, ``scancel``.

An allocation is a batch job that holds whole nodes and does nothing::

    sbatch --parsable --job-name=NAME --nodes=N --exclusive [--time=MINUTES]
           --output=/dev/null --error=/dev/null [OPTIONS...] --wrap "exec sleep infinity"

``OPTIONS`` are the environment's ``allocation.options``, given as written, after mnp's
own so that they win where Slurm lets a later option replace an earlier one
(``--time``, ``--job-name``). The agents on its nodes are started with the srun
transport (``SrunTransport(job_id=ALLOCATION)``): steps of that job, started from
outside it, which Slurm allows its owner. ``poll`` reads ``squeue`` (every state, so an
allocation that just ended is seen as ended, not as unknown); one that squeue no
longer lists is ``GONE`` (ended and forgotten). ``scancel`` of an allocation that has
already ended is not an error.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mnp.errors import InfraError
from mnp.sched.autoscale import Allocation
from mnp.spec.nodeset import expand_nodeset
from mnp.spec.units import parse_duration

PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "RESV_DEL_HOLD", "SUSPENDED"})
RUNNING_STATES = frozenset({"RUNNING"})
COMMAND_TIMEOUT = 60.0  # seconds a Slurm command may take before it is an error
HOLD = "exec sleep infinity"


class ProviderError(InfraError):
    """A batch-system command failed; the message carries its own words."""


@dataclass(frozen=True)
class AllocationStatus:
    alloc_id: str
    state: str  # Slurm's job state (PENDING, RUNNING, CANCELLED, TIMEOUT, ...) or GONE
    nodes: tuple[str, ...] = ()
    reason: str = ""  # why it is pending, or how it ended
    time_left: float | None = None  # seconds, running only; None = unlimited or unknown
    node_count: int = 0  # nodes asked (pending) or held (running)

    @property
    def phase(self) -> str:
        """``PENDING``, ``RUNNING`` or ``ENDED`` (anything else: it holds no nodes)."""
        if self.state in PENDING_STATES:
            return "PENDING"
        if self.state in RUNNING_STATES:
            return "RUNNING"
        return "ENDED"


def as_allocation(
    status: AllocationStatus,
    now: float,
    used: tuple[float, ...] = (),
    idle_since: float | None = None,
) -> Allocation | None:
    """What ``autoscale.decide`` needs of a polled allocation (None once it has ended).
    ``used``/``idle_since`` are the controller's: what its jobs hold on the nodes."""
    if status.phase == "ENDED":
        return None
    if status.phase == "PENDING":
        return Allocation(status.alloc_id, status.node_count or len(status.nodes), "PENDING")
    ends = None if status.time_left is None else now + status.time_left
    return Allocation(status.alloc_id, len(status.nodes), "RUNNING", used, idle_since, ends)


def submit_argv(
    nodes: int, time_limit: float | None, name: str, options: Sequence[str] = ()
) -> list[str]:
    """The ``sbatch`` command of one allocation of ``nodes`` whole nodes."""
    argv = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}", "--exclusive"]
    if time_limit is not None:
        argv.append(f"--time={max(1, math.ceil(time_limit / 60))}")
    return [*argv, "--output=/dev/null", "--error=/dev/null", *options, "--wrap", HOLD]


SQUEUE_FORMAT = "%i|%T|%N|%r|%L|%D"


def parse_squeue(text: str) -> dict[str, AllocationStatus]:
    """``squeue -h -o SQUEUE_FORMAT`` lines → status by job id."""
    out: dict[str, AllocationStatus] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6 or not parts[0]:
            continue
        job, state, nodelist, reason, left, count = parts
        try:
            names = tuple(expand_nodeset(nodelist)) if nodelist.strip() else ()
        except ValueError:
            names = ()
        out[job] = AllocationStatus(
            alloc_id=job,
            state=state.split()[0] if state.strip() else "UNKNOWN",
            nodes=names,
            reason="" if reason in ("None", "(null)") else reason,
            time_left=_time_left(left),
            node_count=int(count) if count.isdigit() else len(names),
        )
    return out


def _time_left(text: str) -> float | None:
    text = text.strip()
    if not text or text in ("UNLIMITED", "INVALID", "NOT_SET"):
        return None
    try:
        return parse_duration(text)
    except ValueError:
        return None


class SlurmProvider:
    """Allocations of one managed compute environment on the Slurm cluster mnp can reach."""

    name = "slurm"

    def __init__(
        self, options: Sequence[str] = (), environ: Mapping[str, str] | None = None
    ) -> None:
        self.options = tuple(options)
        self.environ = dict(os.environ if environ is None else environ)
        # Inside an allocation, sbatch would read SLURM_*/SBATCH_* input variables as options
        for key in [k for k in self.environ if k.startswith(("SBATCH_", "SLURM_"))]:
            if key != "SLURM_CONF":
                del self.environ[key]

    async def submit(self, nodes: int, time_limit: float | None, name: str = "mnp-alloc") -> str:
        """Submit one allocation; its job id."""
        out = await self._run(submit_argv(nodes, time_limit, name, self.options))
        job = out.strip().split(";")[0]
        if not job.isdigit():
            raise ProviderError(f"sbatch: unexpected answer {out.strip()[:200]!r}")
        return job

    async def poll(self, alloc_ids: Sequence[str]) -> dict[str, AllocationStatus]:
        """The status of each of ``alloc_ids`` (GONE when Slurm no longer knows it)."""
        if not alloc_ids:
            return {}
        out = await self._run(
            ["squeue", "-h", "--states=all", "-j", ",".join(alloc_ids), "-o", SQUEUE_FORMAT],
            ok_if=("Invalid job id",),
        )
        found = parse_squeue(out)
        return {a: found.get(a) or AllocationStatus(a, "GONE") for a in alloc_ids}

    async def cancel(self, alloc_id: str) -> None:
        await self._run(
            ["scancel", alloc_id], ok_if=("already completing or completed", "Invalid job id")
        )

    async def _run(self, argv: list[str], ok_if: Sequence[str] = ()) -> str:
        return await run_command(argv, self.environ, ok_if)


async def run_command(
    argv: Sequence[str],
    environ: Mapping[str, str],
    ok_if: Sequence[str] = (),
    *,
    within: float = COMMAND_TIMEOUT,
    new_session: bool = False,
) -> str:
    """Run a batch system's (or a command provider's) command off the loop's thread: its
    stdout, or a ``ProviderError`` (not runnable, no answer ``within`` seconds, a failure
    whose stderr holds none of ``ok_if``)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environ,
            start_new_session=new_session,
        )
    except OSError as e:
        raise ProviderError(f"cannot run {argv[0]}: {e.strerror or e}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ProviderError(f"{argv[0]} gave no answer within {within:g}s") from None
    said = err.decode(errors="replace").strip()
    if proc.returncode != 0 and not any(s in said for s in ok_if):
        last = said.splitlines()[-1] if said else f"exit status {proc.returncode}"
        raise ProviderError(f"{argv[0]}: {last[:300]}")
    return out.decode(errors="replace")
