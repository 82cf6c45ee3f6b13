"""Opening the controller's state database, and what to do when it is corrupt.

A ``mnp.db`` that SQLite cannot read (random bytes, truncated, a damaged page
found at start) would keep every controller from starting. The controller sets
it aside instead -- renamed, never deleted, with its ``-wal``/``-shm`` files, to
``mnp.db.corrupt-YYYYMMDDTHHMMSS`` -- starts an empty one, and says so loudly
(its log, and a warning to every client of that controller). Job ids and event
``seq`` go on above what ``logs/`` and ``events.jsonl`` show of the old
history, so the old job folders and event lines are not mixed with new ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from mnp.jobid import top_of
from mnp.store import Store
from mnp.store.codec import Row
from mnp.store.schema import CorruptDatabase

log = logging.getLogger("mnp")

CORRUPT_SUFFIX = ".corrupt-"


def open_store(home: Path, events_name: str) -> tuple[Store, list[Row], str | None]:
    """The writer ``Store`` for ``home/mnp.db`` and its unfinished jobs (what the
    controller restores), or, if the file is corrupt, a fresh one (no jobs) and
    the warning to give. Other errors (locked, unwritable, newer schema) raise."""
    path = home / "mnp.db"
    try:
        store, rows = _open(path)
        return store, rows, None
    except CorruptDatabase as e:
        why = e.detail
    aside = set_aside(path)
    store, rows = _open(path)
    try:
        store.raise_floors(
            next_job_id=_highest_job_id(home / "logs", home / events_name) + 1,
            event_seq=_last_seq(home / events_name),
        )
    except BaseException:
        store.close()
        raise
    warning = (
        f"the state database {path} could not be read ({why}); it was moved aside to "
        f"{aside} and the controller started with an empty one: the jobs it held are "
        "not shown or restored (their logs and events.jsonl lines are kept)"
    )
    log.error("%s", warning)
    return store, rows, warning


def _open(path: Path) -> tuple[Store, list[Row]]:
    store = Store(path)
    try:
        rows = store.unfinished_jobs()
        store.max_job_seq()
    except CorruptDatabase:
        store.abandon()  # nothing written into a damaged file
        raise
    except BaseException:
        store.close()
        raise
    return store, rows


def set_aside(path: Path) -> Path:
    """Rename ``path`` and its ``-wal``/``-shm`` files to ``PATH.corrupt-STAMP``."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{stamp}.{n}")
    for ext in ("-wal", "-shm"):
        side = path.with_name(path.name + ext)
        with contextlib.suppress(FileNotFoundError):
            os.rename(side, aside.with_name(aside.name + ext))
    os.rename(path, aside)
    return aside


def _highest_job_id(logs: Path, events: Path) -> int:
    """The highest job id that ``logs/`` or the end of ``events.jsonl`` mention; 0 if none."""
    best = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(logs):
            if entry.name.isdigit():
                best = max(best, int(entry.name))
    for event in _tail_events(events):
        root = top_of(str(event.get("job_id", "")))
        if root.isdigit():
            best = max(best, int(root))
    return best


def _last_seq(events: Path) -> int:
    seqs = [e.get("seq") for e in _tail_events(events)]
    return max((s for s in seqs if isinstance(s, int)), default=0)


def _tail_events(events: Path, size: int = 1 << 20) -> list[dict[str, Any]]:
    """The whole lines of the last ``size`` bytes of ``events.jsonl``, parsed."""
    try:
        fd = os.open(events, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return []
        start = max(0, st.st_size - size)
        data = os.pread(fd, st.st_size - start, start)
    except OSError:
        return []
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    if start:
        lines = lines[1:]  # the first one may be cut
    out: list[dict[str, Any]] = []
    for line in lines:
        with contextlib.suppress(ValueError):
            found = json.loads(line)
            if isinstance(found, dict):
                out.append(found)
    return out
