"""The ``Store``: write-behind batches for the controller, plain reads for everyone.

It owns the connection and the counters (job ids, event seqs) and hands the
rest to its rooms: ``writes.Batch`` buffers, ``reads`` queries, ``purges``
deletes, ``schema`` opens and guards the connection.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from mnp.errors import InfraError
from mnp.store import purges, reads, registry
from mnp.store.purges import PURGE_CHUNK, SWEEP_BUDGET
from mnp.store.reads import ReadApi
from mnp.store.schema import analyze, connect, transaction
from mnp.store.writes import SET_META, Batch

__all__ = ["ANALYZE_AFTER", "JOB_ID_BLOCK", "PURGE_CHUNK", "SWEEP_BUDGET", "Store"]

JOB_ID_BLOCK = 100
"""Job ids reserved on disk ahead of use: a crash skips at most this many, reuses none."""

ANALYZE_AFTER = 10_000
"""A flush that inserts this many jobs (an array) refreshes the planner's statistics."""


class Store(ReadApi):
    """The state database (``MNP_HOME/mnp.db``): jobs, attempts, nodes, events, meta.

    The controller keeps live state in memory and writes through to a writer
    ``Store``: writes are buffered (updates of one row within a batch coalesce
    into one statement) and ``flush()`` commits everything buffered in one
    transaction. ``submit`` flushes before it answers, so an accepted job is on
    disk. CLI commands open ``Store(path, readonly=True)`` beside it. Reads,
    on either, see what has been flushed (``get_meta`` and the ``max_*_seq``
    counters of a writer also count what it has buffered).

    A read-only store needs no write access to the file. Where the directory
    is not writable either (no ``-shm`` can be made) and no writer has the file
    open, it is read as immutable.

    Durability: WAL with ``synchronous=NORMAL``. A transaction is in the WAL
    file (the kernel's page cache) when ``flush()`` returns, so it survives the
    controller being killed (SIGKILL, OOM): the crash SPEC §6 is about. Only an
    OS crash or power loss can lose the last transactions (never corrupting the
    file); an fsync per commit (``synchronous=FULL``) would guard that too, at
    a cost of milliseconds per flush.

    Not thread-safe: use one ``Store`` from one thread at a time.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._batch = Batch()
        self._conn: sqlite3.Connection | None = connect(self.path, readonly)
        self._event_seq = 0
        self._next_id = self._id_limit = 1
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file opened
        if not readonly:
            try:
                st = os.stat(self.path)
                self._file_id = (st.st_dev, st.st_ino)
                self._load_counters()
                self._analyze()
            except BaseException:
                self._conn.close()
                raise

    def _load_counters(self) -> None:
        conn = self.conn
        with self._guard("reading counters"):
            self._event_seq = reads.max_event_seq(conn)
            top = reads.scalar(
                conn, "SELECT max(CAST(id AS INTEGER)) FROM jobs WHERE parent IS NULL"
            )
            stored = reads.get_meta(conn, "next_job_id")
        # max(): a flushed job whose id the meta row never saw still counts
        self._next_id = self._id_limit = max(int(stored or 1), int(top or 0) + 1)

    def file_changed(self) -> str | None:
        """What happened to ``path`` if it no longer names the file this writer has open
        (``"was deleted"``, ``"was replaced by another file"``): what is written goes to a
        file nobody else can open any more. None while it is the same file (or for a
        read-only store, or when the path cannot be checked now)."""
        if self._file_id is None or self._conn is None:
            return None
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return "was deleted"
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != self._file_id:
            return "was replaced by another file"
        return None

    def continue_after(self, event_seq: int = 0, job_id: int = 0) -> None:
        """Never give out an event ``seq`` up to ``event_seq`` nor a job id up to
        ``job_id``: numbers used before this database existed (a new, empty database
        beside an ``events.jsonl`` and ``logs/`` of an older one)."""
        self._event_seq = max(self._event_seq, event_seq)
        if job_id >= self._next_id:
            self._next_id = self._id_limit = job_id + 1  # the next id reserves on disk

    # --- life -------------------------------------------------------------

    def close(self) -> None:
        """Flush, give back unused reserved job ids, and close. Idempotent."""
        if self._conn is None:
            return
        try:
            if not self.readonly:
                self._batch.set_meta("next_job_id", str(self._next_id))
                self.flush()
                self._analyze()
        finally:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _analyze(self) -> None:
        analyze(self.conn)

    def _writable(self) -> None:
        if self.readonly:
            raise InfraError(f"state database {self.path}: opened read-only; cannot write")

    # --- writes (buffered) -------------------------------------------------

    @property
    def job_ids_below(self) -> int:
        """Every job id handed out so far is below this number."""
        return self._next_id

    def next_job_id(self) -> int:
        """A new top-level job id: monotonic, never reused, even after a crash.

        Ids are reserved on disk in blocks of ``JOB_ID_BLOCK`` (a tiny commit of
        its own, outside the batch), so an id handed out is never handed out
        again even if the controller dies before flushing its job -- whose
        events may already be in ``events.jsonl``. ``close()`` gives the unused
        rest of the block back, so only a crash leaves a gap.
        """
        self._writable()
        if self._next_id >= self._id_limit:
            limit = self._next_id + JOB_ID_BLOCK
            with self._guard("reserving job ids"):
                self.conn.execute(SET_META, ("next_job_id", str(limit)))
            self._id_limit = limit
        n = self._next_id
        self._next_id += 1
        return n

    def add_job(self, row: Mapping[str, Any]) -> None:
        """Buffer a new job: ``id`` and any other columns of ``schema.JOB_COLUMNS``.

        ``definition`` is a dict (``None`` for array children), ``depends_on`` a
        list; ``state`` defaults to SUBMITTED; ``seq`` left out takes the next
        rowid. An ``update_job`` of it in the same batch runs after the insert.
        """
        self.add_jobs((row,))

    def add_jobs(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """``add_job`` for many (an array's children): rows of the same keys are
        checked once and inserted by one executemany."""
        self._writable()
        self._batch.add_jobs(rows)

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Buffer changed columns of a job; within a batch, the last value of a field
        wins and the job gets one UPDATE. An id that is not stored changes nothing."""
        self._writable()
        self._batch.update_job(job_id, fields)

    def upsert_attempt(self, job_id: str, number: int, **fields: Any) -> None:
        """Create attempt ``number`` (from 1) of a job, or change its columns."""
        self._writable()
        self._batch.upsert_attempt(job_id, number, fields)

    def upsert_node(self, job_id: str, attempt: int, node_index: int, **fields: Any) -> None:
        """Create node ``node_index`` of an attempt of a multi-node job, or change it."""
        self._writable()
        self._batch.upsert_node(job_id, attempt, node_index, fields)

    def append_event(self, event: Mapping[str, Any]) -> int:
        """Buffer an event and return its ``seq``: one more than the last, across restarts."""
        return self.add_event(event)[0]

    def add_event(self, event: Mapping[str, Any]) -> tuple[int, str]:
        """``append_event``, also returning the stored body: ``{"seq": seq, **event}`` as
        compact JSON, what the caller writes to ``events.jsonl`` (encoded once for both).
        ``event`` is not changed. The event is filed under its subject for
        ``events_since(job_id=...)`` (``codec.event_key``)."""
        self._writable()
        self._event_seq += 1
        return self._event_seq, self._batch.add_event(self._event_seq, event)

    def set_meta(self, key: str, value: str) -> None:
        self._writable()
        self._batch.set_meta(key, value)

    def flush(self) -> None:
        """Commit everything buffered in one transaction; nothing buffered costs nothing.

        On an error nothing of the batch is written. After an ``InfraError``
        (disk full, database locked) the batch stays buffered and a later
        ``flush()`` writes it. A ``ValueError`` (a constraint broken: a job id
        stored twice) is a bug that no retry can mend, so the batch is dropped
        rather than block every later write.
        """
        batch = self._batch
        if not batch.dirty:
            return
        self._writable()
        conn = self.conn
        try:
            with self._guard("writing"), transaction(conn):
                batch.write(conn)
        except ValueError:
            batch.clear()
            raise
        inserted = batch.inserted()
        batch.clear()
        if inserted >= ANALYZE_AFTER:
            self._analyze()

    def discard(self, job_ids: Collection[str]) -> None:
        """Forget what is buffered about these jobs: their inserts, updates, attempts,
        nodes and events (for a top-level id, its children's and nodes' events too).

        For a submit whose commit failed: the job is withdrawn as if it had never
        been, while the rest of the batch stays buffered for the next ``flush()``.
        Nothing already flushed changes.
        """
        self._batch.discard(job_ids)

    # --- reads (see what has been flushed) ---------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored for ``key`` (this writer's unflushed value first)."""
        if key in self._batch.meta:
            return self._batch.meta[key]
        with self._guard("reading meta"):
            return reads.get_meta(self.conn, key)

    def max_event_seq(self) -> int:
        """The last event seq stored (or assigned by this writer); 0 if none."""
        with self._guard("reading events"):
            stored = reads.max_event_seq(self.conn)
        return max(stored, self._event_seq)

    def max_job_seq(self) -> int:
        """The highest job ``seq`` ever stored (purged ones too) or buffered here,
        for the controller to continue from after a restart; 0 if none."""
        with self._guard("reading jobs"):
            stored = reads.max_job_seq(self.conn)
        return max(stored, self._batch.max_seq())

    # --- purge --------------------------------------------------------------

    def purge(
        self,
        before: float | None = None,
        *,
        state: str | None = None,
        limit: int = PURGE_CHUNK,
    ) -> list[str]:
        """Delete up to ``limit`` finished top-level jobs, oldest first, in one
        transaction; return their ids. Flushes first.

        Chosen: SUCCEEDED/FAILED (or only ``state``) jobs that stopped before
        ``before`` (epoch seconds; ``None``: any time) and that no unfinished job
        names in its ``depends_on`` (an array waiting on an ``N_TO_N`` dependency
        still reads its children's states). Their rows and attempts and nodes go
        now, so readers no longer see them; what else they left (array children,
        events) is recorded in meta ``purge_pending`` and goes in bounded steps by
        ``sweep_purged``. Job ids, job ``seq`` and event ``seq`` never go back:
        the highest of each is kept in meta (``next_job_id``, ``job_seq_floor``,
        ``event_seq_floor``).
        """
        self._writable()
        if state is not None and state not in reads.FINISHED_STATES:
            raise ValueError(f"cannot purge {state} jobs: only finished ones")
        self.flush()
        conn = self.conn
        states = (state,) if state is not None else reads.FINISHED_STATES
        with self._guard("purging jobs"), transaction(conn):
            return purges.purge(conn, states, before, limit, self._event_seq)

    def purge_pending(self) -> list[str]:
        """Purged top-level jobs whose children, events or logs may be left."""
        with self._guard("reading meta"):
            return purges.pending(self.conn)

    def sweep_purged(self, budget: int = SWEEP_BUDGET) -> tuple[list[str], bool]:
        """Delete, in one transaction, at most about ``budget`` rows that purged jobs left
        (their events, their array children with theirs attempts and nodes).

        Returns the purged jobs of which nothing is left in the database (the caller
        removes their logs, then calls ``purge_done``), and whether rows are left for
        another step.
        """
        self._writable()
        conn = self.conn
        with self._guard("purging jobs"), transaction(conn):
            return purges.sweep(conn, budget)

    def purge_done(self, job_ids: Collection[str]) -> None:
        """Forget purged jobs of which nothing is left (``sweep_purged``), logs included."""
        self._writable()
        if not job_ids:
            return
        conn = self.conn
        with self._guard("purging jobs"), transaction(conn):
            purges.done(conn, job_ids)

    def events_file_stale(self) -> bool:
        """Whether a purge removed events that ``events.jsonl`` still has."""
        return self.get_meta("events_file_stale") == "1"

    def events_file_rewritten(self) -> None:
        self._writable()
        with self._guard("writing meta"):
            self.conn.execute(SET_META, ("events_file_stale", "0"))

    def register_definition(self, name: str, body: dict[str, Any], source: str) -> int:
        """Store a definition as the next revision of ``name``; its revision. Committed
        at once (``mnp.store.registry``)."""
        self._writable()
        with self._guard("registering a definition"), transaction(self.conn):
            return registry.register(self.conn, name, body, source, time.time())

    def deregister_definition(self, name: str, revision: int) -> str | None:
        """Make ``name:revision`` INACTIVE, at once; its status before (None: none such)."""
        self._writable()
        with self._guard("deregistering a definition"), transaction(self.conn):
            return registry.deregister(self.conn, name, revision)

    def raise_floors(self, *, next_job_id: int = 0, event_seq: int = 0) -> None:
        """Hand out no job id below ``next_job_id`` and no event seq up to ``event_seq``
        from now on (a fresh database beside the history of an older one). Committed
        at once."""
        self._writable()
        self.flush()
        with self._guard("writing meta"), transaction(self.conn):
            if next_job_id > self._next_id:
                self._next_id = self._id_limit = next_job_id
                self.conn.execute(SET_META, ("next_job_id", str(next_job_id)))
            if event_seq > self._event_seq:
                self._event_seq = event_seq
                self.conn.execute(SET_META, ("event_seq_floor", str(event_seq)))

    def abandon(self) -> None:
        """Close without writing anything (a database found corrupt). Idempotent."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
