"""Nodes from programs of the site's own: ``provider = "command"`` (issue 15), Slurm's
ResumeProgram/SuspendProgram analogue for cloud VMs or power-managed machines.

The contract (README "Managed compute environments"):

* ``start`` is run as given (argv, no shell) with ``MNP_NODES=N`` (nodes wanted),
  ``MNP_ALLOCATION`` (mnp's own id, ``cmd-CE-K``) and ``MNP_CE`` in its environment. Exit 0
  and one host per line on stdout, ``NAME`` or ``NAME ADDRESS``, exactly ``N`` of them,
  each answering SSH when it returns: the hosts are reached over SSH with the inventory's
  ``[ssh]`` settings (``localhost`` too: nothing is special about a name). Anything else
  (non-zero exit, a wrong count, no answer within ``start_timeout``) is an error
  shown in ``mnp ce``; the next try waits 5 s, doubled per failure up to 5 minutes.
* ``stop`` is run with the host names as arguments, the same variables set, when the
  allocation is given back (idle, ``time_limit``, ``mnp controller stop``). A failed stop
  is shown and retried at the next poll.
* Time limits: none, unless ``allocation.time_limit`` is set: then the allocation is
  stopped that long after start returned (running work is lost, as when Slurm ends one).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mnp.model import HostSpec
from mnp.provider.slurm import AllocationStatus, ProviderError, run_command
from mnp.transport.base import AgentStream, Transport

START_TIMEOUT = 600.0  # seconds start may take (cloud VMs boot slowly)
STOP_TIMEOUT = 300.0
BACKOFF_FIRST = 5.0
BACKOFF_MAX = 300.0
_ids = itertools.count(1)


@dataclass
class _Alloc:
    alloc_id: str
    hosts: tuple[str, ...]
    started: float
    state: str = "RUNNING"  # RUNNING | STOP_FAILED | STOPPED | TIMEOUT
    stop_state: str = "STOPPED"  # the state it ends in once stopped


def parse_hosts(text: str, nodes: int) -> dict[str, str]:
    """``start``'s stdout → address by host name (ValueError: not what was promised)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if len(words) > 2 or not all(w.isprintable() for w in words):
            raise ValueError(f"line {line.strip()[:100]!r} is not NAME or NAME ADDRESS")
        if words[0] in out:
            raise ValueError(f"host {words[0]!r} printed twice")
        out[words[0]] = words[-1]
    if len(out) != nodes:
        raise ValueError(f"printed {len(out)} hosts, asked for {nodes}")
    return out


class CommandProvider:
    """Allocations made by running the environment's ``start``/``stop`` programs."""

    name = "command"

    def __init__(
        self,
        ce: str,
        start: Sequence[str],
        stop: Sequence[str],
        time_limit: float | None = None,
        environ: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ce = ce
        self.start = tuple(start)
        self.stop = tuple(stop)
        self.time_limit = time_limit
        self.environ = dict(os.environ if environ is None else environ)
        self.start_timeout = start_timeout
        self.clock = clock
        self.allocs: dict[str, _Alloc] = {}
        self.addresses: dict[str, str] = {}  # host name → address, for HostSpec
        self.failures = 0
        self.retry_at = 0.0
        self.last_error = ""

    async def submit(self, nodes: int, time_limit: float | None, name: str = "") -> str:
        """Run ``start`` for ``nodes`` hosts; mnp's id of the allocation they make."""
        now = self.clock()
        if self.failures and now < self.retry_at:
            raise ProviderError(self.last_error)
        alloc_id = f"cmd-{self.ce}-{next(_ids)}"
        try:
            out = await self._run(self.start, alloc_id, nodes, self.start_timeout)
            try:
                hosts = parse_hosts(out, nodes)
            except ValueError as e:
                raise ProviderError(f"{self.start[0]}: {e}") from None
        except ProviderError as e:
            self.failures += 1
            wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
            self.retry_at = self.clock() + wait
            self.last_error = f"start failed: {e}"
            raise ProviderError(self.last_error) from None
        self.failures = 0
        self.addresses.update(hosts)
        self.allocs[alloc_id] = _Alloc(alloc_id, tuple(hosts), self.clock())
        return alloc_id

    async def poll(self, alloc_ids: Sequence[str]) -> dict[str, AllocationStatus]:
        """RUNNING from start's return until stopped (GONE: not one of ours)."""
        out = {}
        now = self.clock()
        for a in alloc_ids:
            rec = self.allocs.get(a)
            if rec is None:
                out[a] = AllocationStatus(a, "GONE")
                continue
            limit = time_limit_left(rec.started, self.time_limit, now)
            if rec.state == "RUNNING" and limit is not None and limit <= 0:
                rec.stop_state = "TIMEOUT"
                await self._stop(rec)
            elif rec.state == "STOP_FAILED":
                await self._stop(rec)
            if rec.state == "RUNNING":
                out[a] = AllocationStatus(a, "RUNNING", rec.hosts, "", limit, len(rec.hosts))
            else:
                out[a] = AllocationStatus(a, rec.state, rec.hosts, "", None, len(rec.hosts))
        return out

    async def cancel(self, alloc_id: str) -> None:
        rec = self.allocs.get(alloc_id)
        if rec is not None and rec.state in ("RUNNING", "STOP_FAILED"):
            await self._stop(rec)

    async def _stop(self, rec: _Alloc) -> None:
        try:
            await self._run([*self.stop, *rec.hosts], rec.alloc_id, len(rec.hosts), STOP_TIMEOUT)
        except ProviderError as e:
            rec.state = "STOP_FAILED"
            raise ProviderError(f"stop of {rec.alloc_id} failed: {e}") from None
        rec.state = rec.stop_state

    async def _run(
        self,
        argv: Sequence[str],
        alloc_id: str,
        nodes: int,
        within: float,
    ) -> str:
        env = {**self.environ, "MNP_NODES": str(nodes), "MNP_ALLOCATION": alloc_id,
               "MNP_CE": self.ce}  # fmt: skip
        return await run_command(argv, env, within=within, new_session=True)


def time_limit_left(started: float, limit: float | None, now: float) -> float | None:
    """Seconds an allocation has left (None: no ``time_limit``, it runs until given back)."""
    return None if limit is None else started + limit - now


class SshByHost(Transport):
    """The hosts of a command allocation: SSH with each host's ``[ssh]`` options, by the
    client they name (asyncssh or OpenSSH), each made on first use."""

    name = "ssh"

    def __init__(self) -> None:
        self.parts: dict[str, Transport] = {}

    async def open(self, host: HostSpec, agent_args: list[str]) -> AgentStream:
        import importlib

        from mnp.transport import SSH_MODULES

        module = SSH_MODULES.get(host.ssh.transport, "ssh")
        part = self.parts.get(module)
        if part is None:
            part = self.parts[module] = importlib.import_module(f"mnp.transport.{module}").make(
                None  # type: ignore[arg-type]
            )
        return await part.open(host, agent_args)

    async def close(self) -> None:
        for part in self.parts.values():
            await part.close()
