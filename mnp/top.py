"""``mnp top``: a live full-terminal view of one home's cluster, redrawn about once a
second until ``q``.

curses (the standard library) draws it: no new dependency, and it works on any
terminal that terminfo knows, a plain SSH session included; the view needs no more
than text at positions (no mouse, no widgets) that a TUI library would add.

``snapshot`` gathers what is shown: hosts and queues from the running controller
(the ``hosts`` and ``queues`` ops: capacity, what is free, load), jobs from the store
read-only (running, waiting, the last failures). ``render`` turns it into lines
(pure, tested without a terminal); ``run`` is the curses loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnp.errors import MnpError

if TYPE_CHECKING:
    from mnp.api.client import ApiClient

REFRESH = 1.0  # seconds between redraws
WAITING = ("SUBMITTED", "PENDING", "RUNNABLE")
RUNNING = ("STARTING", "RUNNING")
SHOWN = 12  # jobs of each kind listed at most (the header counts them all)


class Source:
    """Where a snapshot comes from: the home's store, and its controller when one runs
    (connected lazily, again after it went away)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.api: ApiClient | None = None

    def _ask(self, op: str) -> dict[str, Any] | None:
        from mnp.api.client import ApiClient

        for _ in range(2):  # once more on a fresh connection if the old one broke
            if self.api is None:
                self.api = ApiClient.connect(self.home)
                if self.api is None:
                    return None
            try:
                return self.api.request(op)
            except MnpError:
                self.api.close()
                self.api = None
        return None

    def snapshot(self) -> dict[str, Any]:
        from mnp import client as layer

        hosts = self._ask("hosts")
        queues = self._ask("queues")
        jobs: dict[str, list[dict[str, Any]]] = {"running": [], "waiting": [], "failed": []}
        store = layer.open_store(self.home)
        if store is not None:
            with store:
                for kind, states in (("running", RUNNING), ("waiting", WAITING)):
                    for st in states:
                        rows, _ = store.list_page(state=st, parents_only=False)
                        jobs[kind] += [dict(r) for r in rows if not r.get("array_size")]
                failed, _ = store.list_page(state="FAILED", parents_only=False, newest=5)
                jobs["failed"] = [dict(r) for r in failed]
        return {
            "time": time.time(),
            "home": str(self.home),
            "controller": hosts is not None,
            "hosts": (hosts or {}).get("hosts", []),
            "queues": (queues or {}).get("queues", []),
            **jobs,
        }

    def close(self) -> None:
        if self.api is not None:
            self.api.close()
            self.api = None


def _gib(n: Any) -> str:
    return "-" if n is None else f"{n / (1 << 30):.1f}G"


def _num(n: Any) -> str:
    return "-" if n is None else f"{n:g}"


def _age(now: float, t: Any) -> str:
    from mnp.views import age

    return age(now - t) if t else "-"


def render(snap: dict[str, Any], width: int) -> list[str]:
    """The screen's lines for ``snap`` (``Source.snapshot``), each cut to ``width``."""
    now = snap["time"]
    lines = [
        f"mnp top - {time.strftime('%H:%M:%S', time.localtime(now))} - "
        f"{len(snap['running'])} running, {len(snap['waiting'])} waiting - q quits - "
        f"{snap['home']}",
        "",
    ]
    if not snap["controller"]:
        lines.append("no controller runs for this home: hosts and queues are not known")
    else:
        lines.append(
            f"{'HOST':<16} {'STATE':<6} {'CPU USED':>10} {'MEMORY USED':>14} "
            f"{'GPU USED':>9} {'LOAD':>6} {'TASKS':>6}"
        )
        for h in snap["hosts"]:
            cpu = (
                f"{_num(h['vcpus'] - h['vcpus_free'])}/{_num(h['vcpus'])}"
                if h.get("vcpus") is not None
                else "-"
            )
            mem = (
                f"{_gib(h['memory'] - h['memory_free'])}/{_gib(h['memory'])}"
                if h.get("memory")
                else "-"
            )
            gpu = f"{h['gpus'] - h['gpus_free']}/{h['gpus']}" if h.get("gpus") else "-"
            load = "-" if h.get("load") is None else f"{h['load']:.2f}"
            lines.append(
                f"{h['name']:<16} {h['state']:<6} {cpu:>10} {mem:>14} {gpu:>9} {load:>6} "
                f"{h.get('tasks', 0):>6}"
            )
        lines.append("")
        lines.append(
            f"{'QUEUE':<16} {'STATE':<9} {'WAITING':>8} {'RUNNING':>8} {'DONE':>6} {'FAILED':>7}"
        )
        for q in snap["queues"]:
            c = q.get("counts") or {}
            waiting = sum(c.get(s, 0) for s in WAITING)
            running = sum(c.get(s, 0) for s in RUNNING)
            lines.append(
                f"{q['name']:<16} {q['state']:<9} {waiting:>8} {running:>8} "
                f"{c.get('SUCCEEDED', 0):>6} {c.get('FAILED', 0):>7}"
            )
    for title, kind, when in (
        ("RUNNING", "running", "started"),
        ("WAITING", "waiting", "created"),
        ("RECENT FAILURES", "failed", "stopped"),
    ):
        rows = snap[kind]
        lines += ["", f"{title} ({len(rows)})"]
        shown = rows[-SHOWN:] if kind == "failed" else rows[:SHOWN]
        for j in shown:
            extra = j.get("reason") or "" if kind != "running" else ""
            lines.append(
                f"  {j['id']:<10} {str(j.get('name') or '')[:20]:<20} {j['state']:<9} "
                f"{str(j.get('queue') or ''):<10} {_age(now, j.get(when)):>6}  {extra}"
            )
        if len(rows) > len(shown):
            lines.append(f"  ... {len(rows) - len(shown)} more")
    return [line[:width] for line in lines]


def run(home: Path) -> None:
    """The live view until ``q`` (or Ctrl-C)."""
    import curses

    source = Source(home)

    def loop(screen: Any) -> None:
        try:
            curses.curs_set(0)
        except curses.error:  # a terminal that cannot hide its cursor shows it
            pass
        screen.timeout(int(REFRESH * 1000))
        while True:
            height, width = screen.getmaxyx()
            lines = render(source.snapshot(), max(width - 1, 1))
            screen.erase()
            for y, line in enumerate(lines[:height]):
                screen.addstr(y, 0, line, curses.A_BOLD if y == 0 else curses.A_NORMAL)
            screen.refresh()
            key = screen.getch()  # waits up to REFRESH seconds
            if key in (ord("q"), ord("Q")):
                return

    try:
        curses.wrapper(loop)
    except KeyboardInterrupt:
        pass
    finally:
        source.close()
