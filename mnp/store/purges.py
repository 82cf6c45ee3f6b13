"""Purges: finished jobs out of the database, in bounded transactions.

``purge`` removes the rows readers see (jobs, attempts, nodes) at once and files
what else the jobs left (array children, events) in meta ``purge_pending``;
``sweep`` removes that in steps of about a budget of rows, ``done`` forgets the
jobs once their logs are gone too. Each is a function of the writer's connection,
run inside the caller's transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection
from typing import Any

from mnp.store import reads
from mnp.store.writes import SET_META

PURGE_CHUNK = 500
"""Top-level jobs ``purge`` removes in one transaction."""
SWEEP_BUDGET = 5000
"""About how many rows (events, array children) ``sweep_purged`` deletes in one transaction."""


def purge(
    conn: sqlite3.Connection,
    states: tuple[str, ...],
    before: float | None,
    limit: int,
    event_seq: int,
) -> list[str]:
    """Delete up to ``limit`` top-level jobs in ``states`` that stopped before ``before``
    and that no unfinished job depends on, oldest first (``Store.purge``); return
    their ids. ``event_seq``: the last event seq the writer assigned, for the floor."""
    needed = reads.dependency_roots(conn)
    where = f"parent IS NULL AND state IN ({', '.join('?' * len(states))})"
    params: list[Any] = list(states)
    if before is not None:
        where += " AND coalesce(stopped, created) < ?"
        params.append(before)
    ids: list[str] = []
    # oldest first (jobs_top); past the needed ones, in steps of the limit
    cursor = conn.execute(
        f"SELECT id FROM jobs INDEXED BY jobs_top WHERE {where} ORDER BY seq", params
    )
    for (job_id,) in cursor:
        if job_id not in needed:
            ids.append(job_id)
            if len(ids) >= limit:
                break
    cursor.close()
    if not ids:
        return []
    floors = {
        "job_seq_floor": reads.max_job_seq(conn),
        "event_seq_floor": max(event_seq, reads.max_event_seq(conn)),
    }
    conn.executemany(SET_META, [(k, str(v)) for k, v in floors.items()])
    pending_ids = pending(conn)
    known = set(pending_ids)
    pending_ids.extend(i for i in ids if i not in known)
    conn.execute(SET_META, ("purge_pending", json.dumps(pending_ids)))
    conn.execute(SET_META, ("events_file_stale", "1"))
    keys = [(i,) for i in ids]
    conn.executemany("DELETE FROM nodes WHERE job_id = ?", keys)
    conn.executemany("DELETE FROM attempts WHERE job_id = ?", keys)
    conn.executemany("DELETE FROM jobs WHERE id = ?", keys)
    conn.executemany("DELETE FROM meta WHERE key = 'cut:' || ?", keys)  # mnp.store.gaps
    return ids


def pending(conn: sqlite3.Connection) -> list[str]:
    """Purged top-level jobs whose children, events or logs may be left."""
    text = reads.get_meta(conn, "purge_pending")
    try:
        found = json.loads(text) if text else []
    except ValueError:
        return []
    return [str(i) for i in found] if isinstance(found, list) else []


def sweep(conn: sqlite3.Connection, budget: int) -> tuple[list[str], bool]:
    """``Store.sweep_purged``: delete about ``budget`` rows purged jobs left; return the
    jobs of which nothing is left and whether rows are left for another step."""
    roots = pending(conn)
    finished: list[str] = []
    left = budget
    for root in roots:
        if left <= 0:
            break
        left -= conn.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE root = ? LIMIT ?)",
            (root, left),
        ).rowcount
        if left <= 0:
            break
        some = "SELECT id FROM jobs WHERE parent = ? ORDER BY array_index LIMIT ?"
        for table in ("nodes", "attempts"):
            conn.execute(f"DELETE FROM {table} WHERE job_id IN ({some})", (root, left))
        kids = conn.execute(
            "DELETE FROM jobs WHERE seq IN "
            "(SELECT seq FROM jobs WHERE parent = ? ORDER BY array_index LIMIT ?)",
            (root, left),
        ).rowcount
        if kids >= left:
            break
        left -= kids
        finished.append(root)
    return finished, len(finished) < len(roots)


def done(conn: sqlite3.Connection, job_ids: Collection[str]) -> None:
    """Forget purged jobs of which nothing is left, logs included."""
    gone = set(job_ids)
    still = [i for i in pending(conn) if i not in gone]
    conn.execute(SET_META, ("purge_pending", json.dumps(still)))
