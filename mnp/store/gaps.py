"""Array children not released yet, read as the rows they stand for.

An array is stored as its parent row; a child gets its row (and events) when the
controller releases it (``mnp.sched.lifecycle.room``), in index order. The others,
indexes ``released`` to ``array_size - 1``, are read here as the rows they stand
for: PENDING, or RUNNABLE for an array released at once (no parallelism, SEQUENTIAL
or N_TO_N dependency) once its own dependencies are met (a child was released).

A cancel or terminate (or a failed SEQUENTIAL child) ends the children never
released in one step: meta ``cut:ID`` holds ``{"from", "state", "reason", "time"}``
(written with the ``array-children-ended`` event), and those children read as
rows in that state with that reason -- also once their parent has finished.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, NamedTuple

from mnp.store.codec import FINISHED_STATES, UNFINISHED_STATES, Row, key, scalar

ARRAY_CUT = "array-children-ended"  # mnp.jobs.ARRAY_CUT (the store imports no job model)
_UNFINISHED_SQL = ", ".join(f"'{s}'" for s in UNFINISHED_STATES)
FINISHED_SQL = ", ".join(f"'{s}'" for s in FINISHED_STATES)

_GAP_PARENTS = (
    "SELECT seq, id, name, queue, type, state, created, definition, depends_on, "
    "array_size, num_nodes FROM jobs"
)


class Gap(NamedTuple):
    """The children of array ``parent`` not released yet: indexes ``first`` to
    ``size - 1``, each in ``state``."""

    parent: str
    seq: int
    name: str | None
    queue: str | None
    type: str | None
    created: float | None
    num_nodes: int | None
    first: int
    size: int
    state: str
    reason: str | None = None
    stopped: float | None = None

    def row(self, index: int) -> Row:
        """Child ``index``'s ``list_jobs`` row."""
        return {
            "seq": self.seq + 1 + index,
            "id": f"{self.parent}:{index}",
            "parent": self.parent,
            "array_index": index,
            "name": self.name,
            "queue": self.queue,
            "type": self.type,
            "state": self.state,
            "reason": self.reason,
            "created": self.created,
            "started": None,
            "stopped": self.stopped,
            "exit_code": None,
            "signal": None,
            "attempt_count": 0,
            "timed_out": False,
            "depends_on": [],
            "array_size": None,
            "num_nodes": self.num_nodes,
        }


def cut_key(parent_id: str) -> str:
    """The meta key of the children of ``parent_id`` that ended unreleased."""
    return f"cut:{parent_id}"


def cut_of(conn: sqlite3.Connection, parent_id: str) -> dict[str, Any] | None:
    """What meta ``cut:ID`` holds for array ``parent_id``, or None."""
    text = scalar(conn, "SELECT value FROM meta WHERE key = ?", (cut_key(parent_id),))
    found = json.loads(text) if text else None
    return found if isinstance(found, dict) else None


def _gap(conn: sqlite3.Connection, parent: tuple[Any, ...]) -> Gap | None:
    seq, job_id, name, queue, type_, state, created, definition, deps, size, nodes = parent
    if not size:
        return None
    cut = cut_of(conn, str(job_id))
    if cut is not None:
        first = int(cut["from"])
        if first >= size:
            return None
        ended, why, at = str(cut["state"]), cut.get("reason"), cut.get("time")
        return Gap(job_id, seq, name, queue, type_, created, nodes, first, size, ended, why, at)
    if state in FINISHED_STATES:
        return None
    released = scalar(conn, "SELECT count(*) FROM jobs WHERE parent = ?", (job_id,)) or 0
    if released >= size:
        return None
    arr = (json.loads(definition) if definition else {}).get("array") or {}
    n_to_n = any(str(d).endswith(":N_TO_N") for d in (json.loads(deps) if deps else ()))
    at_once = released > 0 and not arr.get("parallelism") and not arr.get("sequential")
    waits = "RUNNABLE" if at_once and not n_to_n else "PENDING"
    return Gap(job_id, seq, name, queue, type_, created, nodes, released, size, waits)


def gap_of(conn: sqlite3.Connection, parent_id: str) -> Gap | None:
    """The unreleased children of array ``parent_id``, or None (none, or no array)."""
    found = conn.execute(
        f"{_GAP_PARENTS} WHERE id = ? AND parent IS NULL", (key(parent_id),)
    ).fetchone()
    return None if found is None else _gap(conn, found)


def gaps(conn: sqlite3.Connection) -> list[Gap]:
    """Every unfinished array's unreleased children, and those that ended unreleased
    (of finished arrays too), in seq order."""
    found = conn.execute(
        f"{_GAP_PARENTS} WHERE parent IS NULL AND array_size IS NOT NULL "
        f"AND state IN ({_UNFINISHED_SQL}) ORDER BY seq"
    ).fetchall()
    ended = [
        str(k)[len("cut:") :]
        for (k,) in conn.execute("SELECT key FROM meta WHERE key > 'cut:' AND key < 'cut;'")
    ]
    for i in range(0, len(ended), 500):
        chunk = ended[i : i + 500]
        found += conn.execute(
            f"{_GAP_PARENTS} WHERE parent IS NULL AND array_size IS NOT NULL "
            f"AND state IN ({FINISHED_SQL}) AND id IN ({','.join('?' * len(chunk))})",
            [key(j) for j in chunk],
        ).fetchall()
    found.sort(key=lambda p: int(p[0]))
    return [g for g in (_gap(conn, p) for p in found) if g is not None]


def unreleased_child(conn: sqlite3.Connection, job_id: str) -> Gap | None:
    """The gap that child ``job_id`` (``42:7``) lies in, or None."""
    root, sep, index = job_id.partition(":")
    if not sep or not index.isdigit():
        return None
    gap = gap_of(conn, root)
    return gap if gap is not None and gap.first <= int(index) < gap.size else None


_GAP_SQL = (
    "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?), "
    "jobs AS (SELECT ? + 1 + i AS seq, ? || ':' || i AS id, ? AS parent, i AS array_index, "
    "? AS name, ? AS queue, ? AS type, ? AS state, ? AS reason, ? AS created, "
    "NULL AS started, ? AS stopped, NULL AS exit_code, NULL AS signal, "
    "0 AS attempt_count, 0 AS timed_out, NULL AS definition, NULL AS depends_on, "
    "NULL AS array_size, ? AS num_nodes FROM n) "
)


def gap_rows(
    conn: sqlite3.Connection, select: str, where: list[str], params: list[Any], gap: Gap
) -> list[tuple[Any, ...]]:
    """``SELECT seq, {select}`` over the unreleased children of ``gap`` as the rows they
    stand for, filtered by ``where`` (the same terms as over the jobs table)."""
    sql = _GAP_SQL + f"SELECT seq, {select} FROM jobs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    values = (
        gap.first,
        gap.size,
        gap.seq,
        gap.parent,
        gap.parent,
        gap.name,
        gap.queue,
        gap.type,
        gap.state,
        gap.reason,
        gap.created,
        gap.stopped,
        gap.num_nodes,
    )
    return conn.execute(sql, [*values, *params]).fetchall()


def child_ends(event: Row, only: int | None = None) -> list[Row]:
    """The ``array-children-ended`` ``event`` as the FAILED event of each child it
    ended (``only``: of that child alone, if it is one of them), as a child's own
    state change reads: from PENDING, no attempt, the event's ``seq``."""
    first, last = (int(i) for i in event["array_range"])
    if only is not None:
        first, last = (only, only) if first <= only <= last else (0, -1)
    parent = str(event["job_id"])
    out: list[Row] = []
    for index in range(first, last + 1):
        child: Row = {
            "seq": event["seq"],
            "time": event["time"],
            "type": "job-state-change",
            "job_id": f"{parent}:{index}",
            "name": event.get("name"),
            "queue": event.get("queue"),
            "status": event["status"],
            "previous": "PENDING",
            "reason": event.get("reason"),
            "attempt": 0,
            "exit_code": None,
            "array_index": index,
        }
        if "tags" in event:
            child["tags"] = event["tags"]
        out.append(child)
    return out


def per_child_ends(found: list[Row], of_parent: list[Row], only: int | None) -> list[Row]:
    """Events ``found`` with each ``array-children-ended`` one read as its children's
    (``child_ends``); ``only``: those of child ``only`` alone, which may be among the
    parent's events ``of_parent``."""
    if of_parent:
        found = sorted(
            [*found, *(e for e in of_parent if e.get("type") == ARRAY_CUT)],
            key=lambda e: int(e["seq"]),
        )
    out: list[Row] = []
    for event in found:
        out += child_ends(event, only) if event.get("type") == ARRAY_CUT else [event]
    return out


def child_index(job_id: str | None) -> int | None:
    """The index of array child ``job_id`` (``42:7``: 7), or None for any other id."""
    _root, sep, index = (job_id or "").partition(":")
    return int(index) if sep and index.isdigit() else None
