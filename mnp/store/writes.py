"""The writer's batch: rows buffered in memory until ``Store.flush`` commits them.

Updates of one row within a batch coalesce into one statement; rows of the same
columns go in by one ``executemany``. The batch holds no connection: ``write``
is handed the one inside the flush's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Iterable, Mapping
from operator import itemgetter
from typing import Any

from mnp.store import codec
from mnp.store.codec import Row

SET_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_INSERT_EVENT = "INSERT INTO events (seq, time, job_id, root, body) VALUES (?, ?, ?, ?, ?)"
_JSON_FIELDS = frozenset({"definition", "depends_on"})


class _Shape:
    """How rows with one tuple of keys are inserted: one executemany per shape."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        codec.check_job_fields(keys)
        self.keys = keys
        self.sql = f"INSERT INTO jobs ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})"
        self.values: Callable[[Mapping[str, Any]], tuple[Any, ...]]
        if len(keys) == 1:
            self.values = lambda row: (row[keys[0]],)
        else:
            self.values = itemgetter(*keys)
        self.encode = not _JSON_FIELDS.isdisjoint(keys)
        self.seq_at = keys.index("seq") if "seq" in keys else None
        self.rows: list[tuple[Any, ...]] = []

    def max_seq(self) -> int:
        if self.seq_at is None:
            return 0
        return max((r[self.seq_at] or 0 for r in self.rows), default=0)


class Batch:
    """New jobs, changed jobs, attempts, nodes, events and meta not yet committed."""

    def __init__(self) -> None:
        self._shapes: dict[tuple[str, ...], _Shape] = {}
        self._new_ids: set[str] = set()
        self._job_updates: dict[str, Row] = {}
        self._attempts: dict[tuple[str, int], Row] = {}
        self._nodes: dict[tuple[str, int, int], Row] = {}
        self._events: list[tuple[int, Any, str | None, str | None, str]] = []
        self.meta: dict[str, str] = {}
        self.dirty = False
        self._sql: dict[tuple[str, tuple[str, ...]], str] = {}

    def add_jobs(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """All or nothing: a bad row leaves none of this call's rows buffered."""
        shapes, new_ids = self._shapes, self._new_ids
        sizes = {keys: len(shape.rows) for keys, shape in shapes.items()}
        added: list[Any] = []
        try:
            for row in rows:
                keys = tuple(row)
                shape = shapes.get(keys)
                if shape is None:
                    shape = shapes[keys] = _Shape(keys)
                job_id = row["id"]
                if job_id in new_ids:
                    raise ValueError(f"job {job_id} added twice")
                shape.rows.append(shape.values(codec.encode_job(row) if shape.encode else row))
                new_ids.add(job_id)
                added.append(job_id)
        except BaseException:  # all or nothing: forget this call's rows
            for keys, shape in shapes.items():
                del shape.rows[sizes.get(keys, 0) :]
            new_ids.difference_update(added)
            raise
        self.dirty = True

    def update_job(self, job_id: str, fields: Row) -> None:
        enc = codec.encode_job_update(fields)
        pending = self._job_updates.get(job_id)
        if pending is None:
            self._job_updates[job_id] = enc
        else:
            pending.update(enc)
        self.dirty = True

    def upsert_attempt(self, job_id: str, number: int, fields: Row) -> None:
        self._attempts.setdefault((job_id, number), {}).update(codec.encode_attempt(fields))
        self.dirty = True

    def upsert_node(self, job_id: str, attempt: int, node_index: int, fields: Row) -> None:
        key = (job_id, attempt, node_index)
        self._nodes.setdefault(key, {}).update(codec.encode_node(fields))
        self.dirty = True

    def add_event(self, seq: int, event: Mapping[str, Any]) -> str:
        """Buffer ``event`` as number ``seq``; return its stored body (compact JSON)."""
        body = codec.dumps({"seq": seq, **event} if "seq" not in event else {**event, "seq": seq})
        key, root = codec.event_key(event)
        self._events.append((seq, event.get("time"), key, root, body))
        self.dirty = True
        return body

    def set_meta(self, key: str, value: str) -> None:
        self.meta[key] = value
        self.dirty = True

    def inserted(self) -> int:
        """How many new jobs are buffered."""
        return sum(len(shape.rows) for shape in self._shapes.values())

    def max_seq(self) -> int:
        """The highest job ``seq`` buffered; 0 if none."""
        return max((shape.max_seq() for shape in self._shapes.values()), default=0)

    def write(self, conn: sqlite3.Connection) -> None:
        """Everything buffered, as statements on ``conn`` (inside the caller's transaction)."""
        if self.meta:
            conn.executemany(SET_META, self.meta.items())
        for shape in self._shapes.values():
            if shape.rows:
                conn.executemany(shape.sql, shape.rows)
        for cols, params in _updates(self._job_updates.items()).items():
            conn.executemany(self._update_sql(cols), params)
        for cols, params in _upserts(self._attempts.items()).items():
            conn.executemany(self._upsert_sql("attempts", ("job_id", "number"), cols), params)
        for cols, params in _upserts(self._nodes.items()).items():
            keys = ("job_id", "attempt", "node_index")
            conn.executemany(self._upsert_sql("nodes", keys, cols), params)
        if self._events:
            conn.executemany(_INSERT_EVENT, self._events)

    def discard(self, job_ids: Collection[str]) -> None:
        """Forget what is buffered about these jobs (``Store.discard``)."""
        if not job_ids:
            return
        ids = set(job_ids)
        for shape in self._shapes.values():
            at = shape.keys.index("id")
            shape.rows[:] = [r for r in shape.rows if r[at] not in ids]
        self._new_ids.difference_update(ids)
        for job_id in ids:
            self._job_updates.pop(job_id, None)
        self._attempts = {k: v for k, v in self._attempts.items() if k[0] not in ids}
        self._nodes = {k: v for k, v in self._nodes.items() if k[0] not in ids}
        self._events = [e for e in self._events if e[2] not in ids and e[3] not in ids]
        self.dirty = bool(
            self.meta
            or self._new_ids
            or self._job_updates
            or self._attempts
            or self._nodes
            or self._events
        )

    def clear(self) -> None:
        """Forget everything buffered (written, or dropped as a bug)."""
        for shape in self._shapes.values():
            shape.rows.clear()
        self._new_ids.clear()
        self._job_updates.clear()
        self._attempts.clear()
        self._nodes.clear()
        self._events.clear()
        self.meta.clear()
        self.dirty = False

    def _update_sql(self, cols: tuple[str, ...]) -> str:
        sql = self._sql.get(("jobs", cols))
        if sql is None:
            sets = ", ".join(f"{c} = ?" for c in cols)
            sql = self._sql[("jobs", cols)] = f"UPDATE jobs SET {sets} WHERE id = ?"
        return sql

    def _upsert_sql(self, table: str, keys: tuple[str, ...], cols: tuple[str, ...]) -> str:
        sql = self._sql.get((table, cols))
        if sql is None:
            names = ", ".join(keys + cols)
            marks = ", ".join("?" * (len(keys) + len(cols)))
            sets = ", ".join(f"{c} = excluded.{c}" for c in cols)
            action = f"DO UPDATE SET {sets}" if cols else "DO NOTHING"
            sql = f"INSERT INTO {table} ({names}) VALUES ({marks}) "
            sql += f"ON CONFLICT ({', '.join(keys)}) {action}"
            self._sql[(table, cols)] = sql
        return sql


def _updates(items: Iterable[tuple[str, Row]]) -> dict[tuple[str, ...], list[tuple[Any, ...]]]:
    """Buffered updates grouped by the fields they set: ``(*values, id)`` per row."""
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for key, fields in items:
        groups.setdefault(tuple(fields), []).append((*fields.values(), key))
    return groups


def _upserts(
    items: Iterable[tuple[tuple[Any, ...], Row]],
) -> dict[tuple[str, ...], list[tuple[Any, ...]]]:
    """Buffered upserts grouped by the fields they set: ``(*key, *values)`` per row."""
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for key, fields in items:
        groups.setdefault(tuple(fields), []).append((*key, *fields.values()))
    return groups
