"""PBS allocations for a managed compute environment: ``qsub``, ``qstat``, ``qdel``.

Not run against a real PBS server (PBS is not packaged where mnp is tested): the
commands are held to golden argv and ``qstat`` output by tests/unit/test_provider_pbs.py.

An allocation is a batch job that holds whole nodes and does nothing::

    qsub -N NAME -l select=N:ncpus=1 -l place=scatter:excl [-l walltime=HH:MM:SS]
         -o /dev/null -e /dev/null -j oe [OPTIONS...] -- /bin/sleep 2147483647

(PBS Pro / OpenPBS syntax; ``OPTIONS`` are ``allocation.options`` as written, e.g.
``-q debug``). ``poll`` reads ``qstat -f -F json -x`` (finished jobs too): a job's
``job_state`` (Q/H/W pending, R/E running, F/X ended) and ``exec_host`` (``node/0*1+...``)
its nodes. ``qdel -W force`` of a job that has ended is not an error. The nodes'
agents are reached over SSH (PBS's ``pbsdsh`` gives no stdin to the agent).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from mnp.provider.slurm import AllocationStatus, ProviderError, run_command

HOLD = ("/bin/sleep", "2147483647")
_STATES = {
    "Q": "PENDING",
    "H": "PENDING",
    "W": "PENDING",
    "T": "PENDING",
    "S": "SUSPENDED",
    "R": "RUNNING",
    "E": "RUNNING",  # exiting: still holds its nodes
    "F": "COMPLETED",
    "X": "COMPLETED",
}


def walltime(seconds: float) -> str:
    s = max(60, int(seconds + 59) // 60 * 60)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:00"


def submit_argv(
    nodes: int, time_limit: float | None, name: str, options: Sequence[str] = ()
) -> list[str]:
    """The ``qsub`` command of one allocation of ``nodes`` whole nodes."""
    argv = ["qsub", "-N", name[:15], "-l", f"select={nodes}:ncpus=1", "-l", "place=scatter:excl"]
    if time_limit is not None:
        argv += ["-l", f"walltime={walltime(time_limit)}"]
    return [*argv, "-o", "/dev/null", "-e", "/dev/null", "-j", "oe", *options, "--", *HOLD]


def poll_argv(alloc_ids: Sequence[str]) -> list[str]:
    return ["qstat", "-f", "-F", "json", "-x", *alloc_ids]


def cancel_argv(alloc_id: str) -> list[str]:
    return ["qdel", "-W", "force", alloc_id]


def _nodes(exec_host: str) -> tuple[str, ...]:
    """``n1/0*2+n2/0*2`` → (n1, n2), in order, each once."""
    out: list[str] = []
    for part in exec_host.split("+"):
        node = part.split("/")[0].strip()
        if node and node not in out:
            out.append(node)
    return tuple(out)


def _seconds(text: str) -> float | None:
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return float(int(parts[0]) * 3600 + int(parts[1]) * 60 + int(parts[2]))


def parse_qstat(text: str) -> dict[str, AllocationStatus]:
    """``qstat -f -F json`` → status by job id (the id as qsub printed it, and its
    number alone)."""
    try:
        jobs = json.loads(text).get("Jobs", {}) if text.strip() else {}
    except (ValueError, AttributeError):
        raise ProviderError(f"qstat: unexpected answer {text.strip()[:200]!r}") from None
    out: dict[str, AllocationStatus] = {}
    for job_id, info in jobs.items():
        if not isinstance(info, dict):
            continue
        state = _STATES.get(str(info.get("job_state", "")), "UNKNOWN")
        nodes = _nodes(str(info.get("exec_host", "")))
        res = info.get("Resource_List") or {}
        used = info.get("resources_used") or {}
        left = None
        limit = _seconds(str(res.get("walltime", "")))
        if state == "RUNNING" and limit is not None:
            spent = _seconds(str(used.get("walltime", "0:0:0"))) or 0.0
            left = max(0.0, limit - spent)
        count = str(res.get("nodect", ""))
        reason = str(info.get("comment", ""))
        if state == "COMPLETED" and str(info.get("Exit_status", "0")) not in ("0", ""):
            state = "CANCELLED" if str(info.get("Exit_status")) in ("-1", "271") else "FAILED"
        status = AllocationStatus(
            alloc_id=job_id,
            state=state,
            nodes=nodes,
            reason=reason,
            time_left=left,
            node_count=int(count) if count.isdigit() else len(nodes),
        )
        out[job_id] = status
        out.setdefault(job_id.split(".")[0], status)
    return out


class PbsProvider:
    """Allocations of one managed compute environment on a PBS server."""

    name = "pbs"

    def __init__(
        self, options: Sequence[str] = (), environ: Mapping[str, str] | None = None
    ) -> None:
        self.options = tuple(options)
        self.environ = dict(os.environ if environ is None else environ)
        for key in [k for k in self.environ if k.startswith("PBS_") and k != "PBS_CONF_FILE"]:
            del self.environ[key]

    async def submit(self, nodes: int, time_limit: float | None, name: str = "mnp-alloc") -> str:
        out = (await self._run(submit_argv(nodes, time_limit, name, self.options))).strip()
        if not out or len(out.split()) != 1:
            raise ProviderError(f"qsub: unexpected answer {out[:200]!r}")
        return out

    async def poll(self, alloc_ids: Sequence[str]) -> dict[str, AllocationStatus]:
        if not alloc_ids:
            return {}
        found = parse_qstat(await self._run(poll_argv(alloc_ids), ok_if=("Unknown Job Id",)))
        return {
            a: found.get(a) or found.get(a.split(".")[0]) or AllocationStatus(a, "GONE")
            for a in alloc_ids
        }

    async def cancel(self, alloc_id: str) -> None:
        await self._run(
            cancel_argv(alloc_id), ok_if=("Unknown Job Id", "Job has finished", "deleted")
        )

    async def _run(self, argv: list[str], ok_if: Sequence[str] = ()) -> str:
        return await run_command(argv, self.environ, ok_if)
