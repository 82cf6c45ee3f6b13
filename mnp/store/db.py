"""The ``Store``: write-behind batches for the controller, plain reads for everyone."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Any

from mnp import jobref
from mnp.errors import InfraError
from mnp.store import codec, reads
from mnp.store.codec import Row
from mnp.store.schema import connect, infra_error

PURGE_CHUNK = 500
"""Top-level jobs ``purge`` removes in one transaction."""
SWEEP_BUDGET = 5000
"""About how many rows (events, array children) ``sweep_purged`` deletes in one transaction."""

JOB_ID_BLOCK = 100
"""Job ids reserved on disk ahead of use: a crash skips at most this many, reuses none."""

ANALYZE_AFTER = 10_000
"""A flush that inserts this many jobs (an array) refreshes the planner's statistics."""
ANALYSIS_LIMIT = 1000

_INSERT_EVENT = "INSERT INTO events (seq, time, job_id, root, body) VALUES (?, ?, ?, ?, ?)"
_SET_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
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


class Store:
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
        self._shapes: dict[tuple[str, ...], _Shape] = {}
        self._new_ids: set[str] = set()
        self._job_updates: dict[str, Row] = {}
        self._attempts: dict[tuple[str, int], Row] = {}
        self._nodes: dict[tuple[str, int, int], Row] = {}
        self._events: list[tuple[int, Any, str | None, str | None, str]] = []
        self._meta: dict[str, str] = {}
        self._dirty = False
        self._sql: dict[tuple[str, tuple[str, ...]], str] = {}
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
                self._meta["next_job_id"] = str(self._next_id)
                self._dirty = True
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

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise InfraError(f"state database {self.path}: already closed")
        return self._conn

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """sqlite3 errors become one-line InfraErrors; constraint violations are bugs."""
        try:
            yield
        except sqlite3.IntegrityError as e:
            raise ValueError(f"state database {self.path}: {doing}: {e}") from e
        except sqlite3.Error as e:
            raise infra_error(self.path, doing, e) from e

    def _analyze(self) -> None:
        """Refresh the planner's statistics (sampled: milliseconds at any size).

        Whether walking the table or the parents-only index lists parents faster
        depends on how many array children there are; the statistics tell.
        """
        try:
            self.conn.execute(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT}")
            self.conn.execute("ANALYZE")
        except sqlite3.Error:
            pass  # an optimisation: a full disk must not keep the store from opening or closing

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
                self.conn.execute(_SET_META, ("next_job_id", str(limit)))
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
        self._dirty = True

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Buffer changed columns of a job; within a batch, the last value of a field
        wins and the job gets one UPDATE. An id that is not stored changes nothing."""
        self._writable()
        enc = codec.encode_job_update(fields)
        pending = self._job_updates.get(job_id)
        if pending is None:
            self._job_updates[job_id] = enc
        else:
            pending.update(enc)
        self._dirty = True

    def upsert_attempt(self, job_id: str, number: int, **fields: Any) -> None:
        """Create attempt ``number`` (from 1) of a job, or change its columns."""
        self._writable()
        self._attempts.setdefault((job_id, number), {}).update(codec.encode_attempt(fields))
        self._dirty = True

    def upsert_node(self, job_id: str, attempt: int, node_index: int, **fields: Any) -> None:
        """Create node ``node_index`` of an attempt of a multi-node job, or change it."""
        self._writable()
        key = (job_id, attempt, node_index)
        self._nodes.setdefault(key, {}).update(codec.encode_node(fields))
        self._dirty = True

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
        seq = self._event_seq
        body = codec.dumps({"seq": seq, **event} if "seq" not in event else {**event, "seq": seq})
        key, root = codec.event_key(event)
        self._events.append((seq, event.get("time"), key, root, body))
        self._dirty = True
        return seq, body

    def set_meta(self, key: str, value: str) -> None:
        self._writable()
        self._meta[key] = value
        self._dirty = True

    def flush(self) -> None:
        """Commit everything buffered in one transaction; nothing buffered costs nothing.

        On an error nothing of the batch is written. After an ``InfraError``
        (disk full, database locked) the batch stays buffered and a later
        ``flush()`` writes it. A ``ValueError`` (a constraint broken: a job id
        stored twice) is a bug that no retry can mend, so the batch is dropped
        rather than block every later write.
        """
        if not self._dirty:
            return
        self._writable()
        conn = self.conn
        try:
            with self._guard("writing"):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._write_batch(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except ValueError:
            self._forget()
            raise
        inserted = sum(len(shape.rows) for shape in self._shapes.values())
        self._forget()
        if inserted >= ANALYZE_AFTER:
            self._analyze()

    def discard(self, job_ids: Collection[str]) -> None:
        """Forget what is buffered about these jobs: their inserts, updates, attempts,
        nodes and events (for a top-level id, its children's and nodes' events too).

        For a submit whose commit failed: the job is withdrawn as if it had never
        been, while the rest of the batch stays buffered for the next ``flush()``.
        Nothing already flushed changes.
        """
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
        self._dirty = bool(
            self._meta
            or self._new_ids
            or self._job_updates
            or self._attempts
            or self._nodes
            or self._events
        )

    def _forget(self) -> None:
        for shape in self._shapes.values():
            shape.rows.clear()
        self._new_ids.clear()
        self._job_updates.clear()
        self._attempts.clear()
        self._nodes.clear()
        self._events.clear()
        self._meta.clear()
        self._dirty = False

    def _write_batch(self, conn: sqlite3.Connection) -> None:
        if self._meta:
            conn.executemany(_SET_META, self._meta.items())
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

    # --- reads (see what has been flushed) ---------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored for ``key`` (this writer's unflushed value first)."""
        if key in self._meta:
            return self._meta[key]
        with self._guard("reading meta"):
            return reads.get_meta(self.conn, key)

    def get_job(self, job_id: str) -> Row | None:
        """Every column of a job, plus ``attempts`` (by number), ``nodes`` of the
        latest attempt (by index) and, for an array parent, ``children_counts``
        (state -> n). An array child carries its parent's ``definition``."""
        with self._guard("reading a job"):
            return reads.get_job(self.conn, job_id)

    def resolve(self, ref: str) -> str | None:
        """The job id ``ref`` refers to (``mnp.jobref``): an id, or a name for the newest
        top-level job of that name, either with a ``:INDEX`` or ``#NODE`` suffix, which
        is kept (not checked); None when no job has that id or name."""
        root, suffix = jobref.split(ref)
        with self._guard("finding a job"):
            job_id = reads.job_id_of(self.conn, root)
        return None if job_id is None else job_id + suffix

    def newest_named(self, name: str) -> str | None:
        """The id of the newest top-level job called ``name`` (stored), or None."""
        with self._guard("finding a job"):
            return reads.newest_named(self.conn, name)

    def state_and_size(self, job_id: str) -> tuple[str, int | None] | None:
        """A stored job's state and array size (an array parent's), or None."""
        with self._guard("reading a job"):
            return reads.state_and_size(self.conn, job_id)

    def list_jobs(
        self,
        *,
        queue: str | None = None,
        state: str | None = None,
        parents_only: bool = True,
        limit: int | None = None,
        after_seq: int | None = None,
    ) -> list[Row]:
        """Jobs in submission (seq) order, without ``definition`` (``get_job`` has it).

        Array children are left out unless ``parents_only=False``; ``after_seq``
        and ``limit`` page through.
        """
        where, params = reads.job_filter(parents_only, queue, state)
        if after_seq is not None:
            where.append("seq > ?")
            params.append(after_seq)
        with self._guard("listing jobs"):
            return reads.summaries(self.conn, where, params, "seq", limit)

    def list_page(
        self,
        *,
        queue: str | None = None,
        state: str | None = None,
        parents_only: bool = True,
        newest: int | None = None,
        finished: int | None = None,
    ) -> tuple[list[Row], int]:
        """``mnp list --json``: ``list_jobs`` rows of one page, and how many matching
        jobs it leaves out. ``newest``: the newest N jobs; ``finished``: every
        unfinished job and the newest N finished ones (see ``reads.page``)."""
        found, left_out = self._page(
            reads.SUMMARY_SELECT, queue, state, parents_only, newest, finished
        )
        return reads.as_summaries(found), left_out

    def table_page(
        self,
        *,
        queue: str | None = None,
        state: str | None = None,
        parents_only: bool = True,
        newest: int | None = None,
        finished: int | None = None,
    ) -> tuple[list[tuple[Any, ...]], int]:
        """``mnp list``'s table: ``list_page``'s jobs as tuples of
        ``reads.TABLE_COLUMNS`` (no dicts, nothing to decode), and the left-out count."""
        return self._page(reads.TABLE_SELECT, queue, state, parents_only, newest, finished)

    def _page(
        self,
        select: str,
        queue: str | None,
        state: str | None,
        parents_only: bool,
        newest: int | None,
        finished: int | None,
    ) -> tuple[list[tuple[Any, ...]], int]:
        with self._guard("listing jobs"):
            return reads.page(
                self.conn,
                select,
                queue=queue,
                state=state,
                parents_only=parents_only,
                newest=newest,
                finished=finished,
            )

    def children(
        self, parent_id: str, *, state: str | None = None, limit: int | None = None
    ) -> list[Row]:
        """An array's children in index order, as ``list_jobs`` rows."""
        where, params = ["parent = ?"], [reads.key(parent_id)]
        if state is not None:
            where.append("state = ?")
            params.append(reads.key(str(state)))
        with self._guard("listing children"):
            return reads.summaries(self.conn, where, list(params), "array_index", limit)

    def counts_by_queue_state(self) -> dict[str, dict[str, int]]:
        """queue -> state -> number of units of work (``mnp queues``).

        A unit is what the scheduler places: a job that is not an array, or one
        array child. Array parents (containers, PENDING while children run) are
        not counted, so an array of 1,000 running 10 at a time shows as 990
        RUNNABLE and 10 RUNNING.
        """
        with self._guard("counting jobs"):
            return reads.counts_by_queue_state(self.conn)

    def events_since(
        self, seq: int, *, job_id: str | None = None, limit: int | None = None
    ) -> list[Row]:
        """Events with a ``seq`` above ``seq``, in order, as their JSON bodies.

        ``job_id`` selects an event subject and everything under it: ``42``
        matches ``42``, its children ``42:i`` and its nodes ``42#n`` (by the
        indexed ``root`` column); ``42:7`` matches ``42:7`` and ``42:7#n``;
        ``42#3`` matches that node only (by the indexed ``job_id`` column).
        """
        with self._guard("reading events"):
            return reads.events_since(self.conn, seq, job_id, limit)

    def event_lines(self, after: int, upto: int, limit: int = 10_000) -> list[tuple[int, str]]:
        """``(seq, body)`` of stored events with ``after < seq <= upto``, in order, at most
        ``limit``: the lines of ``events.jsonl`` as the store has them."""
        with self._guard("reading events"):
            cursor = self.conn.execute(
                "SELECT seq, body FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (after, upto, limit),
            )
            return [(int(seq), str(body)) for seq, body in cursor.fetchall()]

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
        return max([stored, *(shape.max_seq() for shape in self._shapes.values())])

    def unfinished_jobs(self) -> list[Row]:
        """Every job not SUCCEEDED or FAILED, in seq order, for recovery after a restart.

        Rows are shaped like ``get_job``'s (without ``children_counts``). Array
        children carry their parent's decoded ``definition`` -- one dict shared
        by all children of a parent: do not mutate it.
        """
        with self._guard("reading unfinished jobs"):
            return reads.unfinished_jobs(self.conn)

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
        with self._guard("purging jobs"), self._transaction(conn):
            states = (state,) if state is not None else reads.FINISHED_STATES
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
                "event_seq_floor": max(self._event_seq, reads.max_event_seq(conn)),
            }
            conn.executemany(_SET_META, [(k, str(v)) for k, v in floors.items()])
            pending = self._pending(conn)
            known = set(pending)
            pending.extend(i for i in ids if i not in known)
            conn.execute(_SET_META, ("purge_pending", json.dumps(pending)))
            conn.execute(_SET_META, ("events_file_stale", "1"))
            keys = [(i,) for i in ids]
            conn.executemany("DELETE FROM nodes WHERE job_id = ?", keys)
            conn.executemany("DELETE FROM attempts WHERE job_id = ?", keys)
            conn.executemany("DELETE FROM jobs WHERE id = ?", keys)
        return ids

    def purge_pending(self) -> list[str]:
        """Purged top-level jobs whose children, events or logs may be left."""
        with self._guard("reading meta"):
            return self._pending(self.conn)

    @staticmethod
    def _pending(conn: sqlite3.Connection) -> list[str]:
        text = reads.get_meta(conn, "purge_pending")
        try:
            found = json.loads(text) if text else []
        except ValueError:
            return []
        return [str(i) for i in found] if isinstance(found, list) else []

    def sweep_purged(self, budget: int = SWEEP_BUDGET) -> tuple[list[str], bool]:
        """Delete, in one transaction, at most about ``budget`` rows that purged jobs left
        (their events, their array children with theirs attempts and nodes).

        Returns the purged jobs of which nothing is left in the database (the caller
        removes their logs, then calls ``purge_done``), and whether rows are left for
        another step.
        """
        self._writable()
        conn = self.conn
        finished: list[str] = []
        with self._guard("purging jobs"), self._transaction(conn):
            pending = self._pending(conn)
            left = budget
            for root in pending:
                if left <= 0:
                    break
                left -= conn.execute(
                    "DELETE FROM events WHERE seq IN "
                    "(SELECT seq FROM events WHERE root = ? LIMIT ?)",
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
        return finished, len(finished) < len(pending)

    def purge_done(self, job_ids: Collection[str]) -> None:
        """Forget purged jobs of which nothing is left (``sweep_purged``), logs included."""
        self._writable()
        if not job_ids:
            return
        conn = self.conn
        with self._guard("purging jobs"), self._transaction(conn):
            done = set(job_ids)
            pending = [i for i in self._pending(conn) if i not in done]
            conn.execute(_SET_META, ("purge_pending", json.dumps(pending)))

    def events_file_stale(self) -> bool:
        """Whether a purge removed events that ``events.jsonl`` still has."""
        return self.get_meta("events_file_stale") == "1"

    def events_file_rewritten(self) -> None:
        self._writable()
        with self._guard("writing meta"):
            self.conn.execute(_SET_META, ("events_file_stale", "0"))

    def raise_floors(self, *, next_job_id: int = 0, event_seq: int = 0) -> None:
        """Hand out no job id below ``next_job_id`` and no event seq up to ``event_seq``
        from now on (a fresh database beside the history of an older one). Committed
        at once."""
        self._writable()
        self.flush()
        with self._guard("writing meta"), self._transaction(self.conn):
            if next_job_id > self._next_id:
                self._next_id = self._id_limit = next_job_id
                self.conn.execute(_SET_META, ("next_job_id", str(next_job_id)))
            if event_seq > self._event_seq:
                self._event_seq = event_seq
                self.conn.execute(_SET_META, ("event_seq_floor", str(event_seq)))

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def abandon(self) -> None:
        """Close without writing anything (a database found corrupt). Idempotent."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


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
