"""``mnp hosts --check``: connect to every host, start its agent, report what was found.

Each host is checked on its own (at most ``concurrency`` at once): open the
transport (for SSH: TCP, key exchange, host key check, authentication, exec
request), wait for the agent's ``ready`` line, read its facts, close. A host
that fails says which step failed (``category``) and why, so a report over a
thousand hosts can be sorted by cause. ``format_table`` and ``to_json`` are
pure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mnp.controller.hosts import connect_agent
from mnp.errors import HostKeyError, MnpError
from mnp.model import HostSpec, Inventory
from mnp.transport.base import AgentConnection, Transport

DEFAULT_CONCURRENCY = 64
AGENT_TIMEOUT = 30.0  # seconds from the open stream to the agent's ``ready``


@dataclasses.dataclass
class HostReport:
    """What checking one host found. Times are seconds; ``memory`` is bytes."""

    name: str
    address: str
    transport: str
    ok: bool = False
    category: str | None = None  # dns, refused, timeout, unreachable, auth, host-key, ...
    error: str | None = None
    connect_s: float | None = None  # transport open: for SSH, handshake + exec request
    agent_s: float | None = None  # open stream → agent ``ready`` (python start, facts)
    python: str | None = None
    hostname: str | None = None
    cores: int | None = None
    memory: int | None = None
    gpus: list[dict[str, Any]] = dataclasses.field(default_factory=list)


async def check_hosts(
    inventory: Inventory,
    transports: Mapping[str, Transport],
    token: str,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    agent_timeout: float = AGENT_TIMEOUT,
) -> list[HostReport]:
    """Check every host of ``inventory``; one report per host, in inventory order."""
    limit = asyncio.Semaphore(max(1, concurrency))

    async def one(host: HostSpec) -> HostReport:
        async with limit:
            return await check_host(host, transports, token, agent_timeout)

    return list(await asyncio.gather(*(one(h) for h in inventory.hosts)))


async def check_host(
    host: HostSpec, transports: Mapping[str, Transport], token: str, agent_timeout: float
) -> HostReport:
    report = HostReport(host.name, host.address, host.transport)
    transport = transports.get(host.transport)
    if transport is None:
        return _failed(report, "config", f"no {host.transport!r} transport")
    t0 = time.monotonic()
    opened: list[tuple[float, AgentConnection]] = []  # (when, connection) once open
    try:
        _, facts = await connect_agent(
            host,
            transport,
            token,
            ready_within=agent_timeout,
            open_within=host.ssh.connect_timeout + 10,
            on_open=lambda conn: opened.append((time.monotonic(), conn)),
        )
    except Exception as e:  # one bad host must not end the check of the others
        if not opened:  # the transport did not open
            if isinstance(e, TimeoutError):
                error = f"{host.name}: no connection within the time allowed"
                return _failed(report, "timeout", error)
            return _failed(report, error_category(e), str(e) or type(e).__name__)
        category = error_category(e)
        return _failed(report, "agent" if category == "error" else category, str(e))
    finally:
        if opened:
            t1, conn = opened[0]
            report.connect_s = t1 - t0
            report.agent_s = time.monotonic() - t1
            await _close(conn)
    report.ok = True
    report.python = _str(facts.get("python"))
    report.hostname = _str(facts.get("hostname"))
    report.cores = _int(facts.get("cores"))
    report.memory = _int(facts.get("memory"))
    gpus = facts.get("gpus")
    report.gpus = [g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else []
    return report


def error_category(exc: BaseException) -> str:
    """What failed, for sorting reports: the transport's category, else a guess from the type."""
    category = getattr(exc, "category", None)
    if isinstance(category, str):
        return category
    if isinstance(exc, HostKeyError):
        return "host-key"
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = str(exc).lower()
    if isinstance(exc, MnpError) and "agent" in text:
        return "agent"
    return "error"


def to_json(reports: Sequence[HostReport]) -> list[dict[str, Any]]:
    """Plain dicts, one per host, for ``--json``."""
    return [dataclasses.asdict(r) for r in reports]


COLUMNS = ("HOST", "ADDRESS", "STATUS", "CONNECT", "AGENT", "PYTHON", "CORES", "MEMORY", "GPUS")


def format_table(reports: Sequence[HostReport], width: int = 120) -> str:
    """One row per host; failures get their reason in a last column cut to ``width``."""
    rows = [list(COLUMNS)]
    for r in reports:
        rows.append(
            [
                r.name,
                r.address,
                "ok" if r.ok else (r.category or "failed"),
                _secs(r.connect_s),
                _secs(r.agent_s) if r.ok else "-",
                r.python or "-",
                "-" if r.cores is None else str(r.cores),
                _memory(r.memory),
                _gpus(r) if r.ok else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    entries: list[HostReport | None] = [None, *reports]
    for row, entry in zip(rows, entries, strict=True):
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        if entry is None and any(not x.ok for x in reports):
            line += "  ERROR"
        elif entry is not None and not entry.ok and entry.error:
            room = max(20, width - len(line) - 2)
            error = " ".join(entry.error.split())
            line += "  " + (error if len(error) <= room else error[: room - 3] + "...")
        lines.append(line.rstrip())
    ok = sum(r.ok for r in reports)
    lines.append(f"{ok} of {len(reports)} hosts usable")
    return "\n".join(lines) + "\n"


async def _close(conn: AgentConnection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 15)
    except Exception:  # closing a host that already failed: nothing more to report
        pass


def _failed(report: HostReport, category: str, error: str) -> HostReport:
    report.ok = False
    report.category = category
    report.error = error
    return report


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.1f}s"


def _memory(v: int | None) -> str:
    if v is None:
        return "-"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if v >= size:
            return f"{v / size:.1f}{unit}"
    return f"{v}B"


def _gpus(r: HostReport) -> str:
    if not r.gpus:
        return "0"
    names = {str(g.get("name", "?")) for g in r.gpus}
    return f"{len(r.gpus)}x {names.pop()}" if len(names) == 1 else str(len(r.gpus))
