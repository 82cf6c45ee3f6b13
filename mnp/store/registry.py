"""Registered job definitions (``mnp definitions``): named, versioned, in the
``definitions`` table (schema version 4).

A definition is registered under its name as the next revision of that name (1, 2,
...; a revision number is never reused, deregistered or not, as AWS Batch's
RegisterJobDefinition). Deregistering makes a revision ``INACTIVE``: it stays
readable (``describe``) but cannot be submitted, and ``NAME`` alone then means the
newest ``ACTIVE`` revision. ``body`` is the TOML-shaped dictionary
(``mnp.spec.definition_to_dict``) as JSON.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

TABLE = """CREATE TABLE definitions (
    name TEXT NOT NULL,
    revision INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'ACTIVE',  -- ACTIVE | INACTIVE
    registered REAL NOT NULL,
    source TEXT,
    body TEXT NOT NULL,
    PRIMARY KEY (name, revision)
) WITHOUT ROWID"""

_COLUMNS = "name, revision, status, registered, source"


def _exists(conn: sqlite3.Connection) -> bool:
    """Whether the table is there: a reader may open a file of version 3 or below,
    which no writer has migrated yet (it holds no registered definition)."""
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'definitions'"
    return conn.execute(sql).fetchone() is not None


def register(
    conn: sqlite3.Connection, name: str, body: dict[str, Any], source: str, now: float
) -> int:
    """Store ``body`` as the next revision of ``name`` (in the caller's transaction)."""
    last = conn.execute("SELECT max(revision) FROM definitions WHERE name = ?", (name,))
    revision = int(last.fetchone()[0] or 0) + 1
    conn.execute(
        "INSERT INTO definitions (name, revision, status, registered, source, body) "
        "VALUES (?, ?, 'ACTIVE', ?, ?, ?)",
        (name, revision, now, source, json.dumps(body, separators=(",", ":"))),
    )
    return revision


def deregister(conn: sqlite3.Connection, name: str, revision: int) -> str | None:
    """Make ``name:revision`` INACTIVE; its status before (None: there is no such one)."""
    found = conn.execute(
        "SELECT status FROM definitions WHERE name = ? AND revision = ?", (name, revision)
    ).fetchone()
    if found is None:
        return None
    conn.execute(
        "UPDATE definitions SET status = 'INACTIVE' WHERE name = ? AND revision = ?",
        (name, revision),
    )
    return str(found[0])


def listing(conn: sqlite3.Connection, name: str | None) -> list[dict[str, Any]]:
    """Every revision (of ``name``), by name then revision, without bodies."""
    if not _exists(conn):
        return []
    sql = f"SELECT {_COLUMNS} FROM definitions"
    params: tuple[str, ...] = ()
    if name is not None:
        sql += " WHERE name = ?"
        params = (name,)
    sql += " ORDER BY name, revision"
    return [_row(r) for r in conn.execute(sql, params)]


def get(conn: sqlite3.Connection, name: str, revision: int | None) -> dict[str, Any] | None:
    """``name:revision`` with its ``definition`` (the body); ``revision`` None: the
    newest ACTIVE one. None when there is no such one."""
    if not _exists(conn):
        return None
    sql = f"SELECT {_COLUMNS}, body FROM definitions WHERE name = ?"
    if revision is None:
        found = conn.execute(
            sql + " AND status = 'ACTIVE' ORDER BY revision DESC LIMIT 1", (name,)
        ).fetchone()
    else:
        found = conn.execute(sql + " AND revision = ?", (name, revision)).fetchone()
    if found is None:
        return None
    out = _row(found[:-1])
    out["definition"] = json.loads(found[-1])
    return out


def _row(r: Any) -> dict[str, Any]:
    return {
        "name": r[0],
        "revision": int(r[1]),
        "status": r[2],
        "registered": r[3],
        "source": r[4],
    }
