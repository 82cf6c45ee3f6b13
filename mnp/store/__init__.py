"""SQLite state: the only package that speaks SQL.

::

    schema.py   tables, indexes, PRAGMA user_version, opening (WAL) and migrating;
                the connection's transactions and its errors as one line (guard)
    codec.py    rows in and out: field checks, JSON columns, secret refusal, event keys
    reads.py    the queries, over the writer's connection or a read-only one; ReadApi,
                the Store's read methods over them (all a read-only Store serves)
    writes.py   Batch: the writer's buffered rows, written in one transaction by flush()
    purges.py   purged jobs out in bounded transactions (purge, sweep, done)
    db.py       Store: the connection, job id and event seq counters, flush(), purges

The controller holds live state in memory and writes through to one writer
``Store``; ``mnp list``/``describe``/``events`` open their own read-only
``Store`` on the same file while it runs (WAL: readers never block the
writer). Every sqlite3 error leaves as a one-line ``InfraError`` naming the
file.
"""

from mnp.store.db import JOB_ID_BLOCK, Store
from mnp.store.schema import SCHEMA_VERSION

__all__ = ["JOB_ID_BLOCK", "SCHEMA_VERSION", "Store"]
