"""Queries over a connection (writer's or read-only), returning plain dicts and lists;
``ReadApi``, the ``Store``'s read methods over them.

Each function is one consistent view: those that run several SELECTs run them
in one read transaction, so a commit by the controller in between cannot
show a job with the attempts of a later state.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from mnp import jobref
from mnp.errors import InfraError
from mnp.jobid import split, top_of
from mnp.store import codec, registry
from mnp.store import gaps as gapmod
from mnp.store.codec import FINISHED_STATES as FINISHED_STATES
from mnp.store.codec import UNFINISHED_STATES as UNFINISHED_STATES
from mnp.store.codec import Row, key
from mnp.store.codec import scalar as scalar
from mnp.store.gaps import gap_of, gap_rows, gaps, unreleased_child
from mnp.store.schema import JOB_COLUMNS, SUMMARY_COLUMNS, guard

TERMINAL_SQL = ", ".join(f"'{s}'" for s in FINISHED_STATES)
_UNFINISHED_SQL = ", ".join(f"'{s}'" for s in UNFINISHED_STATES)
_SUMMARY = SUMMARY_SELECT = ", ".join(SUMMARY_COLUMNS)
_JOBS = ", ".join(JOB_COLUMNS)

TABLE_COLUMNS = ("id", "name", "type", "state", "queue", "nodes/size", "created", "reason")
"""The cells of ``mnp list``'s table, as ``table_page`` returns them: text, except
``created`` (a time, or None), which the command turns into an age."""
TABLE_SELECT = (
    "id, ifnull(name, ''), CASE WHEN array_size THEN 'array' ELSE ifnull(type, '') END, "
    "state, ifnull(queue, ''), "
    "ifnull(CAST(coalesce(nullif(num_nodes, 0), nullif(array_size, 0)) AS TEXT), ''), "
    "created, substr(ifnull(reason, ''), 1, 60)"
)


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    if conn.in_transaction:  # inside another snapshot: that one holds the view
        yield conn
        return
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def rows(cursor: sqlite3.Cursor) -> list[Row]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=False)) for r in cursor.fetchall()]


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    value = scalar(conn, "SELECT value FROM meta WHERE key = ?", (key,))
    return None if value is None else str(value)


def job_id_of(conn: sqlite3.Connection, root: str) -> str | None:
    """The id of the top-level job ``root`` refers to: ``root`` itself when a job has
    that id, else the newest (highest seq) top-level job named ``root`` (the
    ``jobs_name`` index: a seek to the name's last entry), else None."""
    if scalar(conn, "SELECT 1 FROM jobs WHERE id = ?", (key(root),)) is not None:
        return root
    return newest_named(conn, root)


def state_and_size(conn: sqlite3.Connection, job_id: str) -> tuple[str, int | None] | None:
    """A job's state and array size (None unless an array parent), or None."""
    sql = "SELECT state, array_size FROM jobs WHERE id = ?"
    row = conn.execute(sql, (key(job_id),)).fetchone()
    if row is None:
        gap = unreleased_child(conn, job_id)
        return None if gap is None else (gap.state, None)
    return (str(row[0]), row[1])


def newest_named(conn: sqlite3.Connection, name: str) -> str | None:
    """The id of the newest top-level job called ``name``, or None."""
    found = scalar(
        conn,
        "SELECT id FROM jobs WHERE name = ? AND parent IS NULL ORDER BY seq DESC LIMIT 1",
        (key(name),),
    )
    return None if found is None else str(found)


def _definition(conn: sqlite3.Connection, job_id: str) -> Any:
    text = scalar(conn, "SELECT definition FROM jobs WHERE id = ?", (key(job_id),))
    return None if text is None else json.loads(text)


def job_tags(conn: sqlite3.Connection, ids: list[str]) -> dict[str, dict[str, str]]:
    """Each job's definition ``tags`` (an array child: its parent's), by id."""
    out: dict[str, dict[str, str]] = {}
    sql = (
        "SELECT j.id, COALESCE(j.definition, p.definition) FROM jobs j "
        "LEFT JOIN jobs p ON p.id = j.parent WHERE j.id IN ({})"
    )
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        marks = ",".join("?" * len(chunk))
        for job_id, text in conn.execute(sql.format(marks), [key(j) for j in chunk]):
            tags = (json.loads(text) or {}).get("tags") if text else None
            if isinstance(tags, dict):
                out[str(job_id)] = {str(k): str(v) for k, v in tags.items()}
    # an array child not released yet has no row: its parent's tags
    unreleased = [j for j in ids if j not in out and ":" in j]
    if unreleased:
        parents = job_tags(conn, sorted({j.partition(":")[0] for j in unreleased}))
        for j in unreleased:
            found = parents.get(j.partition(":")[0])
            if found is not None:
                out[j] = found
    return out


def attempt_spans(conn: sqlite3.Connection, since: float | None, root: str | None) -> list[Row]:
    """Attempts that ran (placed) and had not stopped before ``since``; ``root``: only
    that job's and its array children's. Each: ``job_id``, ``number``, ``queue``,
    ``hosts``, ``start`` (running, else placed), ``stop`` (None: still running),
    ``state`` (the attempt's final state, None while it runs)."""
    sql = (
        "SELECT a.job_id, a.number, j.queue, a.hosts, COALESCE(a.running_at, a.placed_at),"
        " a.stopped_at, a.final_state FROM attempts a JOIN jobs j ON j.id = a.job_id"
        " WHERE COALESCE(a.running_at, a.placed_at) IS NOT NULL"
    )
    params: list[Any] = []
    if since is not None:
        sql += " AND (a.stopped_at IS NULL OR a.stopped_at >= ?)"
        params.append(since)
    if root is not None:
        sql += " AND (a.job_id = ? OR (a.job_id >= ? AND a.job_id < ?))"
        params += [key(root), key(root + ":"), key(root + ";")]  # ';' follows ':'
    out = []
    for job_id, number, queue, hosts, start, stop, state in conn.execute(sql, params):
        out.append(
            {
                "job_id": job_id,
                "number": number,
                "queue": queue,
                "hosts": json.loads(hosts) if hosts else [],
                "start": start,
                "stop": stop,
                "state": state,
            }
        )
    return out


def get_job(conn: sqlite3.Connection, job_id: str) -> Row | None:
    with _snapshot(conn):
        found = rows(conn.execute(f"SELECT {_JOBS} FROM jobs WHERE id = ?", (key(job_id),)))
        if not found:
            gap = unreleased_child(conn, job_id)
            if gap is None:
                return None
            job = gap.row(int(job_id.partition(":")[2]))
            job.update(definition=_definition(conn, gap.parent), attempts=[], nodes=[])
            return job
        job = codec.decode_job(found[0])
        if job["definition"] is None and job["parent"] is not None:
            job["definition"] = _definition(conn, job["parent"])
            if job["definition"] is None:
                return None  # its parent was purged; Store.sweep_purged removes it next
        attempts = rows(
            conn.execute("SELECT * FROM attempts WHERE job_id = ? ORDER BY number", (job_id,))
        )
        job["attempts"] = [codec.decode_attempt(a) for a in attempts]
        job["nodes"] = []
        if attempts:
            job["nodes"] = rows(
                conn.execute(
                    "SELECT * FROM nodes WHERE job_id = ? AND attempt = ? ORDER BY node_index",
                    (job_id, attempts[-1]["number"]),
                )
            )
        if job["parent"] is None and job["array_size"] is not None:
            counts = conn.execute(
                "SELECT state, count(*) FROM jobs WHERE parent = ? GROUP BY state", (job_id,)
            )
            job["children_counts"] = dict(counts.fetchall())
            gap = gap_of(conn, job_id)
            if gap is not None:
                held = job["children_counts"]
                held[gap.state] = held.get(gap.state, 0) + gap.size - gap.first
    return job


def summaries(
    conn: sqlite3.Connection,
    where: list[str],
    params: list[Any],
    order: str,
    limit: int | None,
) -> list[Row]:
    """Job rows without ``definition`` (``list_jobs``, ``children``), decoded."""
    sql = f"SELECT {_SUMMARY} FROM jobs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {order}"
    if limit is not None:
        sql += " LIMIT ?"
        params = [*params, limit]
    return _decoded(rows(conn.execute(sql, params)))


def as_summaries(found: list[tuple[Any, ...]]) -> list[Row]:
    """``page`` rows of ``SUMMARY_SELECT`` as ``summaries`` returns them."""
    return _decoded([dict(zip(SUMMARY_COLUMNS, r, strict=True)) for r in found])


def _decoded(found: list[Row]) -> list[Row]:
    loads = json.loads
    for r in found:  # codec.decode_job inlined: 100,000 turns for `mnp list --all --json`
        deps = r["depends_on"]
        r["depends_on"] = loads(deps) if deps else []
        r["timed_out"] = r["timed_out"] == 1
    return found


def job_filter(
    parents_only: bool, queue: str | None, state: str | None
) -> tuple[list[str], list[Any]]:
    """The WHERE terms (joined by AND) and their parameters that pick jobs as ``mnp
    list`` does: array children left out unless asked for, one queue, one state."""
    where: list[str] = []
    params: list[Any] = []
    if parents_only:
        where.append("parent IS NULL")
    if queue is not None:
        where.append("queue = ?")
        params.append(key(queue))
    if state is not None:
        where.append("state = ?")
        params.append(key(str(state)))
    return where, params


def page(
    conn: sqlite3.Connection,
    select: str,
    *,
    queue: str | None,
    state: str | None,
    parents_only: bool,
    newest: int | None,
    finished: int | None,
) -> tuple[list[tuple[Any, ...]], int]:
    """``select`` (expressions over a jobs row) of the jobs ``mnp list`` shows, in
    submission order, and how many matching jobs it leaves out.

    ``newest``: only the newest this many jobs. ``finished``: every unfinished job
    but, of the finished ones, only the newest this many (squeue's and AWS Batch
    ListJobs' default view: a long history does not bury what is queued and
    running). Neither: every matching job. The left-out count is given for
    ``finished`` only. One read transaction: the rows and the count agree.

    Costs: the unfinished jobs come from the (state, queue) index, the finished
    ones from walking the table (or ``jobs_top``) back from the newest, so of
    100,000 finished jobs about 1,000 rows are read; without a filter, the count
    of the older ones reads the ``jobs_top`` index only (no schema change: the
    indexes of schema version 1 serve all of it).
    """
    if not parents_only:
        with _snapshot(conn):
            found, left_out = _page(conn, "seq, " + select, queue, state, False, None, finished)
            where, params = job_filter(False, queue, state)
            for gap in gaps(conn):
                found += gap_rows(conn, select, where, params, gap)
        found.sort(key=lambda r: int(r[0]))
        if newest is not None:
            found = found[-newest:] if newest > 0 else []
        return [r[1:] for r in found], left_out
    return _page(conn, select, queue, state, parents_only, newest, finished)


def _page(
    conn: sqlite3.Connection,
    select: str,
    queue: str | None,
    state: str | None,
    parents_only: bool,
    newest: int | None,
    finished: int | None,
) -> tuple[list[tuple[Any, ...]], int]:
    where, params = job_filter(parents_only, queue, state)
    base = " AND ".join(where) or "1"
    if state is not None and state not in FINISHED_STATES:
        finished = None  # nothing finished matches: no need to look for the oldest shown
    with _snapshot(conn):
        if newest is not None:
            sql = (
                f"SELECT {select} FROM jobs WHERE seq IN "
                f"(SELECT seq FROM jobs WHERE {base} ORDER BY seq DESC LIMIT ?) ORDER BY seq"
            )
            return conn.execute(sql, [*params, newest]).fetchall(), 0
        oldest_shown = None
        if finished is not None:
            # the finished job `finished` places from the newest; "+state": not by the
            # state index, which would collect every finished job and sort them
            oldest_shown = scalar(
                conn,
                f"SELECT seq FROM jobs WHERE {base} AND +state IN ({TERMINAL_SQL}) "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?",
                (*params, finished - 1),
            )
        if oldest_shown is None:  # all of them fit
            sql = f"SELECT {select} FROM jobs WHERE {base} ORDER BY seq"
            return conn.execute(sql, params).fetchall(), 0
        sql = (
            f"SELECT {select} FROM jobs WHERE seq IN "
            f"(SELECT seq FROM jobs WHERE {base} AND state IN ({_UNFINISHED_SQL}) "
            f"UNION ALL SELECT seq FROM jobs WHERE {base} AND seq >= ?) ORDER BY seq"
        )
        found = conn.execute(sql, [*params, *params, oldest_shown]).fetchall()
        older = (*params, oldest_shown)
        if parents_only and queue is None and state is None:
            # every top-level job older than the page, counted in jobs_top alone (the
            # planner would walk the table), less the unfinished ones among them
            left_out = scalar(
                conn,
                "SELECT count(*) FROM jobs INDEXED BY jobs_top WHERE parent IS NULL AND seq < ?",
                (oldest_shown,),
            ) - scalar(
                conn,
                f"SELECT count(*) FROM jobs WHERE {base} "
                f"AND state IN ({_UNFINISHED_SQL}) AND seq < ?",
                older,
            )
        else:
            left_out = scalar(
                conn,
                f"SELECT count(*) FROM jobs WHERE {base} AND state IN ({TERMINAL_SQL}) AND seq < ?",
                older,
            )
    return found, int(left_out)


def counts_by_queue_state(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    sql = (
        "SELECT queue, state, count(*) FROM jobs "
        "WHERE NOT (parent IS NULL AND array_size IS NOT NULL) GROUP BY queue, state"
    )
    out: dict[str, dict[str, int]] = {}
    for queue, state, n in conn.execute(sql).fetchall():
        out.setdefault(queue, {})[state] = n
    for gap in gaps(conn):
        by_state = out.setdefault(str(gap.queue), {})
        by_state[gap.state] = by_state.get(gap.state, 0) + gap.size - gap.first
    return out


def events_since(
    conn: sqlite3.Connection, seq: int, job_id: str | None, limit: int | None, exact: bool = False
) -> list[Row]:
    params: list[Any] = [seq]
    sql = "SELECT body FROM events WHERE seq > ?"
    if job_id is not None and exact:
        sql += " AND job_id = ?"
        params.append(key(job_id))
    elif job_id is not None:
        if split(job_id)[1]:
            # ids are digits, ':' and '#': [X, X + '$') holds X and X#n, not X0 or X:n
            sql += " AND job_id >= ? AND job_id < ?"
            params += [key(job_id), key(job_id + "$")]
        else:
            sql += " AND root = ?"
            params.append(key(job_id))
    sql += " ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [json.loads(b) for (b,) in conn.execute(sql, params).fetchall()]


def max_job_seq(conn: sqlite3.Connection) -> int:
    """The highest job seq given out: an array's children not released yet have theirs
    (the parent's + 1 + index) kept for them."""
    stored = scalar(conn, "SELECT max(seq) FROM jobs") or 0
    ranges = scalar(
        conn,
        "SELECT max(seq + array_size) FROM jobs INDEXED BY jobs_top "
        "WHERE parent IS NULL AND array_size IS NOT NULL",
    )
    stored = max(int(stored), int(ranges or 0))
    floor = scalar(conn, "SELECT value FROM meta WHERE key = 'job_seq_floor'") or 0
    return max(int(stored), int(floor))


def max_event_seq(conn: sqlite3.Connection) -> int:
    """The highest event seq ever stored, purged events included."""
    stored = scalar(conn, "SELECT max(seq) FROM events") or 0
    floor = scalar(conn, "SELECT value FROM meta WHERE key = 'event_seq_floor'") or 0
    return max(int(stored), int(floor))


def dependency_roots(conn: sqlite3.Connection) -> set[str]:
    """The top-level jobs that unfinished jobs name in their ``depends_on``."""
    found: set[str] = set()
    sql = (
        f"SELECT depends_on FROM jobs WHERE state IN ({_UNFINISHED_SQL}) "
        "AND parent IS NULL AND depends_on IS NOT NULL"
    )
    for (text,) in conn.execute(sql):
        for dep in json.loads(text) or ():
            found.add(top_of(str(dep)))
    return found


def unfinished_jobs(conn: sqlite3.Connection) -> list[Row]:
    with _snapshot(conn):
        jobs = rows(
            conn.execute(
                f"SELECT {_JOBS} FROM jobs WHERE state IN ({_UNFINISHED_SQL}) ORDER BY seq"
            )
        )
        attempts = rows(
            conn.execute(
                "SELECT a.* FROM attempts a JOIN jobs j ON j.id = a.job_id "
                f"WHERE j.state IN ({_UNFINISHED_SQL}) ORDER BY a.job_id, a.number"
            )
        )
        nodes = rows(
            conn.execute(
                "SELECT n.* FROM nodes n JOIN jobs j ON j.id = n.job_id "
                f"WHERE j.state IN ({_UNFINISHED_SQL}) ORDER BY n.job_id, n.node_index"
            )
        )
        definitions: dict[str, Any] = {
            j["id"]: json.loads(j["definition"]) for j in jobs if j["definition"] is not None
        }
        for parent in {j["parent"] for j in jobs if j["parent"] is not None} - definitions.keys():
            definitions[parent] = _definition(conn, parent)
        # an array's released children (rows) and how many of them ended: restore
        # goes on releasing after them
        released = {
            parent: (n, ended or 0)
            for parent, n, ended in conn.execute(
                "SELECT parent, count(*), sum(state IN (" + TERMINAL_SQL + ")) FROM jobs "
                "WHERE parent IN (SELECT id FROM jobs WHERE parent IS NULL "
                f"AND array_size IS NOT NULL AND state IN ({_UNFINISHED_SQL})) GROUP BY parent"
            )
        }
        cuts = {
            j["id"]: cut
            for j in jobs
            if j["parent"] is None
            and j["array_size"] is not None
            and (cut := gapmod.cut_of(conn, j["id"])) is not None
        }
    attempts_of: dict[str, list[Row]] = {}
    for a in attempts:
        attempts_of.setdefault(a["job_id"], []).append(codec.decode_attempt(a))
    nodes_of: dict[tuple[str, int], list[Row]] = {}
    for n in nodes:
        nodes_of.setdefault((n["job_id"], n["attempt"]), []).append(n)
    for j in jobs:
        j["definition"] = None  # replaced by the decoded one, shared by an array's children
        codec.decode_job(j)
        j["definition"] = definitions.get(j["parent"] or j["id"])
        j["attempts"] = attempts_of.get(j["id"], [])
        last = j["attempts"][-1]["number"] if j["attempts"] else None
        j["nodes"] = nodes_of.get((j["id"], last), []) if last is not None else []
        if j["parent"] is None and j["array_size"] is not None:
            j["released"], j["ended"] = released.get(j["id"], (0, 0))
            cut = cuts.get(j["id"])  # ended unreleased: never to be released
            j["cut"] = None if cut is None else int(cut["from"])
            j["cut_reason"] = None if cut is None else cut.get("reason")
    return jobs


class ReadApi:
    """The ``Store``'s read methods: each query above on the store's connection, under
    one guard (sqlite3 errors leave as one line naming the file). A read-only
    ``Store`` serves only these; the writer's reads see what it has flushed."""

    path: Path
    _conn: sqlite3.Connection | None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise InfraError(f"state database {self.path}: already closed")
        return self._conn

    def _guard(self, doing: str) -> AbstractContextManager[None]:
        return guard(self.path, doing)

    def get_job(self, job_id: str) -> Row | None:
        """Every column of a job, plus ``attempts`` (by number), ``nodes`` of the
        latest attempt (by index) and, for an array parent, ``children_counts``
        (state -> n). An array child carries its parent's ``definition``."""
        with self._guard("reading a job"):
            return get_job(self.conn, job_id)

    def attempt_spans(self, since: float | None = None, root: str | None = None) -> list[Row]:
        """When each attempt ran, on which hosts (``mnp plot``; see ``attempt_spans``)."""
        with self._guard("reading attempts"):
            return attempt_spans(self.conn, since, root)

    def job_tags(self, ids: list[str]) -> dict[str, dict[str, str]]:
        """The tags of the jobs ``ids`` that have any, by id."""
        with self._guard("reading tags"):
            return job_tags(self.conn, ids)

    def definitions(self, name: str | None = None) -> list[Row]:
        """Registered definitions (of ``name``), every revision, without bodies."""
        with self._guard("reading definitions"):
            return registry.listing(self.conn, name)

    def definition(self, name: str, revision: int | None = None) -> Row | None:
        """A registered definition with its body; ``revision`` None: the newest ACTIVE."""
        with self._guard("reading definitions"):
            return registry.get(self.conn, name, revision)

    def resolve(self, ref: str) -> str | None:
        """The job id ``ref`` refers to (``mnp.jobref``): an id, or a name for the newest
        top-level job of that name, either with a ``:INDEX`` or ``#NODE`` suffix, which
        is kept (not checked); None when no job has that id or name."""
        root, suffix = jobref.split(ref)
        with self._guard("finding a job"):
            job_id = job_id_of(self.conn, root)
        return None if job_id is None else job_id + suffix

    def newest_named(self, name: str) -> str | None:
        """The id of the newest top-level job called ``name`` (stored), or None."""
        with self._guard("finding a job"):
            return newest_named(self.conn, name)

    def state_and_size(self, job_id: str) -> tuple[str, int | None] | None:
        """A stored job's state and array size (an array parent's), or None."""
        with self._guard("reading a job"):
            return state_and_size(self.conn, job_id)

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
        where, params = job_filter(parents_only, queue, state)
        if after_seq is not None:
            where.append("seq > ?")
            params.append(after_seq)
        with self._guard("listing jobs"), _snapshot(self.conn):
            found = summaries(self.conn, where, params, "seq", limit)
            if parents_only:
                return found
            for gap in gaps(self.conn):
                found += as_summaries(
                    [r[1:] for r in gap_rows(self.conn, SUMMARY_SELECT, where, params, gap)]
                )
        found.sort(key=lambda r: int(r["seq"]))
        return found if limit is None else found[:limit]

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
        unfinished job and the newest N finished ones (see ``page``)."""
        found, left_out = self._page(SUMMARY_SELECT, queue, state, parents_only, newest, finished)
        return as_summaries(found), left_out

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
        ``TABLE_COLUMNS`` (no dicts, nothing to decode), and the left-out count."""
        return self._page(TABLE_SELECT, queue, state, parents_only, newest, finished)

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
            return page(
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
        where, params = ["parent = ?"], [key(parent_id)]
        if state is not None:
            where.append("state = ?")
            params.append(key(str(state)))
        with self._guard("listing children"), _snapshot(self.conn):
            found = summaries(self.conn, where, list(params), "array_index", limit)
            gap = gap_of(self.conn, parent_id)
        if gap is not None and (state is None or state == gap.state):
            last = gap.size if limit is None else min(gap.size, gap.first + limit - len(found))
            found += [gap.row(i) for i in range(gap.first, last)]
        return found

    def counts_by_queue_state(self) -> dict[str, dict[str, int]]:
        """queue -> state -> number of units of work (``mnp queues``).

        A unit is what the scheduler places: a job that is not an array, or one
        array child. Array parents (containers, PENDING while children run) are
        not counted, so an array of 1,000 running 10 at a time shows as 990
        RUNNABLE and 10 RUNNING.
        """
        with self._guard("counting jobs"):
            return counts_by_queue_state(self.conn)

    def events_since(
        self,
        seq: int,
        *,
        job_id: str | None = None,
        limit: int | None = None,
        per_child: bool = False,
    ) -> list[Row]:
        """Events with a ``seq`` above ``seq``, in order, as their JSON bodies.

        ``job_id`` selects an event subject and everything under it: ``42``
        matches ``42``, its children ``42:i`` and its nodes ``42#n`` (by the
        indexed ``root`` column); ``42:7`` matches ``42:7`` and ``42:7#n``;
        ``42#3`` matches that node only (by the indexed ``job_id`` column).

        ``per_child`` (``mnp events``): the one event that ended an array's unreleased
        children (``array-children-ended``) reads as each child's FAILED event, all
        with its ``seq``; without it (hooks, the events file), as it is stored.
        """
        with self._guard("reading events"):
            found = events_since(self.conn, seq, job_id, limit)
            only = gapmod.child_index(job_id)
            if not per_child or only is None or job_id is None:
                return gapmod.per_child_ends(found, [], None) if per_child else found
            of_parent = events_since(self.conn, seq, top_of(job_id), None, True)
            return gapmod.per_child_ends(found, of_parent, only)

    def event_lines(self, after: int, upto: int, limit: int = 10_000) -> list[tuple[int, str]]:
        """``(seq, body)`` of stored events with ``after < seq <= upto``, in order, at most
        ``limit``: the lines of ``events.jsonl`` as the store has them."""
        with self._guard("reading events"):
            cursor = self.conn.execute(
                "SELECT seq, body FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (after, upto, limit),
            )
            return [(int(seq), str(body)) for seq, body in cursor.fetchall()]

    def unfinished_jobs(self) -> list[Row]:
        """Every job not SUCCEEDED or FAILED, in seq order, for recovery after a restart.

        Rows are shaped like ``get_job``'s (without ``children_counts``). Array
        children carry their parent's decoded ``definition`` -- one dict shared
        by all children of a parent: do not mutate it.
        """
        with self._guard("reading unfinished jobs"):
            return unfinished_jobs(self.conn)
