"""What the commands print: tables and job descriptions (pure: dicts in, text out)."""

from __future__ import annotations

import json
import time
from collections.abc import Hashable, Sequence
from typing import Any


class PrefixedLines:
    """Chunks of output in, whole lines out, each with its prefix (``"2: "``); a
    chunk's unfinished last line waits for the next chunk of the same stream."""

    def __init__(self) -> None:
        self._partial: dict[Hashable, str] = {}

    def feed(self, key: Hashable, data: str, prefix: str) -> str:
        lines = (self._partial.pop(key, "") + data).split("\n")
        if lines[-1]:
            self._partial[key] = lines[-1]
        return "".join(f"{prefix}{line}\n" for line in lines[:-1])

    def rest(self, key: Hashable, prefix: str) -> str:
        """The unfinished line of a stream that has ended: terminated when it has a prefix
        (lines of several tasks interleave), as it is when not (the output is exactly
        what the task wrote)."""
        last = self._partial.pop(key, "")
        return f"{prefix}{last}\n" if last and prefix else last


def age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def root_cause(job: dict[str, Any]) -> str | None:
    """The first thing that went wrong, named before the rest (node, child, code, reason)."""
    if job.get("state") != "FAILED":
        return None
    for child in job.get("failed_children") or []:
        code = child.get("exit_code")
        return (
            f"array child {child['id']} FAILED"
            + (f" with exit code {code}" if code is not None else "")
            + (f": {child['reason']}" if child.get("reason") else "")
        )
    failed_nodes = [
        n for n in job.get("nodes") or [] if n.get("state") == "FAILED" and n.get("exit_code")
    ]
    if failed_nodes:
        n = failed_nodes[0]
        return f"node {n['node_index']} on {n['host']} exited with code {n['exit_code']}" + (
            f" ({n['reason']})" if n.get("reason") else ""
        )
    code = job.get("exit_code")
    sig = job.get("signal")
    if code is None and not sig:
        return job.get("reason") or "unknown"
    what = f"exit code {code}" if code is not None else f"signal {sig}"
    return what + (f": {job['reason']}" if job.get("reason") else "")


def usage_text(u: dict[str, Any]) -> str:
    """One task's usage: ``peak 103.2 MiB  cpu 1.02s`` (and its limit, CPUs and GPUs:
    ``gpu 512.0 MiB (process)  util 25.0%``)."""
    text = f"peak {u.get('max_rss_bytes', 0) / 1048576:.1f} MiB  cpu {u.get('cpu_seconds', 0):.2f}s"
    if u.get("memory_limit"):
        text += f"  limit {u['memory_limit'] / 1048576:.1f} MiB ({u.get('enforced')})"
    if u.get("cpus"):
        text += "  cpus " + ",".join(str(c) for c in u["cpus"])
    if "gpu_max_memory_bytes" in u:
        gpu = u["gpu_max_memory_bytes"] / 1048576
        text += f"  gpu {gpu:.1f} MiB ({u.get('gpu_memory_source')})"
        if u.get("gpu_utilization_percent") is not None:
            text += f"  util {u['gpu_utilization_percent']:.1f}%"
    return text


def describe_text(job: dict[str, Any]) -> str:
    def t(v: Any) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v)) if v else "-"

    lines = []
    if job.get("root_cause"):
        lines.append(f"root cause:  {job['root_cause']}")
    for key in ("id", "name", "type", "state", "reason", "queue", "exit_code", "signal"):
        if job.get(key) is not None:
            lines.append(f"{key + ':':12} {job[key]}")
    lines.append(f"{'created:':12} {t(job.get('created'))}")
    lines.append(f"{'started:':12} {t(job.get('started'))}")
    lines.append(f"{'stopped:':12} {t(job.get('stopped'))}")
    if job.get("depends_on"):
        lines.append(f"{'depends_on:':12} {', '.join(job['depends_on'])}")
    if job.get("tags"):
        lines.append(
            f"{'tags:':12} {', '.join(f'{k}={v}' for k, v in sorted(job['tags'].items()))}"
        )
    if job.get("children_counts"):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(job["children_counts"].items()))
        lines.append(f"{'children:':12} {counts}")
    for a in job.get("attempts") or []:
        hosts = ",".join(a.get("hosts") or [])
        lines.append(
            f"attempt {a['number']}:  {a.get('final_state') or 'running'} on {hosts or '-'}"
            f"  exit {a.get('exit_code')}  signal {a.get('signal')}"
            + (f"  reason: {a['reason']}" if a.get("reason") else "")
        )
        if a.get("placed_at") and a.get("running_at"):
            lines.append(
                f"             placement→running {a['running_at'] - a['placed_at']:.3f}s"
                + (
                    f"  main exit→reaped {a['reaped_at'] - a['main_exit_at']:.3f}s"
                    if a.get("reaped_at") and a.get("main_exit_at")
                    else ""
                )
            )
        for tid, u in sorted((a.get("usage") or {}).items()):
            lines.append(f"             {tid}: {usage_text(u)}")
    for n in job.get("nodes") or []:
        lines.append(
            f"node {n['node_index']}:     {n.get('state')} on {n.get('host')} group {n.get('grp')}"
            f"  exit {n.get('exit_code')}" + (f"  {n['reason']}" if n.get("reason") else "")
        )
    if job.get("definition"):
        lines.append("definition:  " + json.dumps(job["definition"]))
    return "\n".join(lines)


def declared_host(inventory: Any, h: Any) -> dict[str, Any]:
    from mnp.spec import format_memory

    def auto(v: Any) -> Any:
        return "auto" if v is None else v

    return {
        "name": h.name,
        "address": h.address,
        "transport": h.transport,
        "vcpus": auto(h.vcpus),
        "memory": "auto" if h.memory is None else format_memory(h.memory),
        "gpus": auto(h.gpus),
        "labels": list(h.labels),
        "compute_environments": [
            ce.name for ce in inventory.compute_environments.values() if h.name in ce.hosts
        ],
    }


def memory_cell(n: int | None) -> str:
    """Bytes for a table: ``3.2GiB``, ``512MiB``; ``-`` for None."""
    if n is None:
        return "-"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f}GiB"
    return f"{n // (1 << 20)}MiB"


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    return text_table(columns, [tuple(cell(r[c]) for c in columns) for r in rows])


def text_table(columns: Sequence[str], rows: Sequence[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell, two spaces apart, a header of the names
    in capitals; no trailing blanks. Cells are text. Each cell is measured once
    (by column, ``max(map(len, ...))``) and each line made by one ``%`` format:
    100,000 rows of ``mnp list --all`` in a fraction of a second."""
    header = [c.upper() for c in columns]
    widths = [len(h) for h in header]
    for i, values in enumerate(zip(*rows, strict=True)):
        widths[i] = max(widths[i], max(map(len, values)))
    line = "  ".join([f"%-{w}s" for w in widths[:-1]] + ["%s"])
    out = [(line % tuple(header)).rstrip()]
    out += [(line % r).rstrip() for r in rows]
    return "\n".join(out)
