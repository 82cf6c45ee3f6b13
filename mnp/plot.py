"""``mnp plot``: pictures of what ran, from the store (read-only).

- ``timeline``: a Gantt chart of one job: its nodes (multi-node), its children
  (array) or its attempts (single), each a bar from start to end on its host,
  coloured by state;
- ``usage``: the cluster over a window of time: how many attempts ran in each slice
  of it, by host or by queue.

The bars and series are plain data made here (``job_bars``, ``usage_series``: pure,
tested without matplotlib); ``draw_timeline``/``draw_usage`` render them with
matplotlib, the optional extra ``mnp[plot]``, imported only when a picture is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from mnp.errors import InfraError

COLOURS = {
    "SUCCEEDED": "#2e7d32",
    "FAILED": "#c62828",
    "RUNNING": "#1565c0",
    "STARTING": "#ef6c00",
}
OTHER = "#9e9e9e"


class Bar(NamedTuple):
    label: str  # the row: "#0 host-a", ":7", "attempt 2"
    start: float
    end: float
    state: str
    host: str


def job_bars(
    job: Mapping[str, Any],
    spans: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    now: float,
) -> list[Bar]:
    """The bars of ``job`` (``mnp describe --json``'s document): one per node of a
    multi-node job, from its nodes' state changes (``events``: the job's, as ``mnp
    events --job`` gives them), on the host of its latest attempt; else one per attempt
    of the job or of its array children (``spans``: ``Store.attempt_spans(root=job)``).
    A bar still running ends ``now``."""
    root = str(job["id"])
    hosts = {n["node_index"]: str(n.get("host") or "-") for n in job.get("nodes") or []}
    nodes: dict[int, dict[str, Any]] = {}
    for ev in events:
        index = ev.get("node_index")
        if ev.get("type") != "job-state-change" or not isinstance(index, int):
            continue
        if ev.get("job_id") != f"{root}#{index}":
            continue
        n = nodes.setdefault(index, {"start": None, "end": None, "state": "RUNNING"})
        status = str(ev.get("status"))
        if status in ("STARTING", "RUNNING") and n["start"] is None:
            n["start"] = ev["time"]
        elif status in ("SUCCEEDED", "FAILED"):
            n["end"] = ev["time"]
            if n["start"] is None:
                n["start"] = ev["time"]
        n["state"] = status
    bars = [
        Bar(f"#{i} {hosts.get(i, '-')}", n["start"], n["end"] or now, n["state"], hosts.get(i, "-"))
        for i, n in sorted(nodes.items())
        if n["start"] is not None
    ]
    if bars:
        return bars
    many = any(s["job_id"] != root for s in spans)
    for s in sorted(spans, key=lambda s: (s["start"], s["job_id"], s["number"])):
        host = ",".join(s["hosts"]) or "-"
        label = str(s["job_id"])[len(root) :] if many else f"attempt {s['number']}"
        if many and s["number"] > 1:
            label += f" ({s['number']})"
        end = s["stop"] or now
        bars.append(Bar(f"{label} {host}", s["start"], end, str(s["state"] or "RUNNING"), host))
    return bars


def usage_series(
    spans: Sequence[Mapping[str, Any]], start: float, end: float, by: str, buckets: int = 200
) -> tuple[list[float], dict[str, list[int]]]:
    """The window ``start``..``end`` cut in ``buckets`` equal slices (their start times),
    and for each host (``by="host"``) or queue how many attempts ran there during each
    slice (an attempt on several hosts counts on each; a short one counts in its slice
    however short it is)."""
    step = (end - start) / buckets
    times = [start + i * step for i in range(buckets)]
    series: dict[str, list[int]] = {}
    for s in spans:
        stop = s["stop"] if s["stop"] is not None else end
        if stop < start or s["start"] > end:
            continue
        first = max(0, int((s["start"] - start) // step))
        last = min(buckets - 1, int((stop - start) // step))
        groups = list(s["hosts"]) if by == "host" else [str(s["queue"])]
        for g in groups or ["-"]:
            counts = series.setdefault(g, [0] * buckets)
            for i in range(first, last + 1):
                counts[i] += 1
    return times, dict(sorted(series.items()))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise InfraError(
            "mnp plot needs matplotlib, which is not installed: pip install 'mnp[plot]'"
        ) from None
    matplotlib.use("Agg")  # files only: no display needed (a plain SSH session)
    import matplotlib.pyplot as plt

    return plt


def draw_timeline(bars: Sequence[Bar], title: str, path: str) -> None:
    """A Gantt chart of ``bars`` (one row each, in order), written to ``path``."""
    plt = _pyplot()
    t0 = min((b.start for b in bars), default=0.0)
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.3 * len(bars) + 1.5)))
    try:
        for i, b in enumerate(bars):
            width = max(b.end - b.start, 1e-3)
            ax.barh(i, width, left=b.start - t0, color=COLOURS.get(b.state, OTHER))
        ax.set_yticks(range(len(bars)), [b.label for b in bars])
        ax.invert_yaxis()
        ax.set_xlabel("seconds since the first start")
        ax.set_title(title)
        states = sorted({b.state for b in bars})
        handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS.get(s, OTHER)) for s in states]
        if handles:
            ax.legend(handles, states, loc="lower right", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def draw_usage(
    times: Sequence[float], series: Mapping[str, Sequence[int]], title: str, path: str
) -> None:
    """Attempts running in each slice of time, stacked by host or queue, to ``path``."""
    plt = _pyplot()
    end = times[-1] + (times[-1] - times[0]) / max(len(times) - 1, 1) if times else 0.0
    minutes = [(t - end) / 60 for t in times]
    fig, ax = plt.subplots(figsize=(10, 4))
    try:
        if series:
            ax.stackplot(minutes, *series.values(), labels=list(series), step="post")
            ax.legend(loc="upper left", fontsize="small")
        else:
            ax.text(0.5, 0.5, "nothing ran", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("minutes before now")
        ax.set_ylabel("attempts running")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
