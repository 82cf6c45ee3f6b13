"""SQLite state: the only package that speaks SQL.

::

    schema.py   tables, indexes, PRAGMA user_version, opening (WAL) and migrating
    codec.py    rows in and out: field checks, JSON columns, secret refusal, event keys
    reads.py    the queries, over the writer's connection or a read-only one
    db.py       Store: buffered writes committed by flush(); the read API over reads.py

The controller holds live state in memory and writes through to one writer
``Store``; ``mnp list``/``describe``/``events`` open their own read-only
``Store`` on the same file while it runs (WAL: readers never block the
writer). Every sqlite3 error leaves as a one-line ``InfraError`` naming the
file.
"""

from mnp.store.db import JOB_ID_BLOCK, Store
from mnp.store.schema import SCHEMA_VERSION

__all__ = ["JOB_ID_BLOCK", "SCHEMA_VERSION", "Store"]
