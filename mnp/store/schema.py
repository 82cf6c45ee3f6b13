"""The database layout, its version, and the connection: opening it, its
transactions (``transaction``), its errors as one line (``guard``), its statistics.

``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`. A fresh file gets the
schema on first open; an older one is migrated step by step (``_MIGRATIONS``)
by the first writer (the controller); a newer one is refused, because this mnp
cannot know what it would break. A reader (``mnp list``) also reads a file
of version :data:`READS_FROM` and up that no writer has migrated yet: the
versions since then only added indexes, which change no query's answer.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnp.errors import InfraError
from mnp.files import NotARegularFile, open_regular
from mnp.store import registry

SCHEMA_VERSION = 4
READS_FROM = 1
"""The oldest version a reader takes as it is: raise it with a migration that
changes tables or columns (not with one that only adds an index)."""
BUSY_TIMEOUT_MS = 5000
CACHE_KIB = 65536  # a ceiling, allocated as pages are read: a 100k-row `mnp list` fits
WRITER_CACHE_KIB = 8192  # the controller writes and reads back little: 64 MiB cost 60 MB RSS
ANALYSIS_LIMIT = 1000  # rows ANALYZE samples per index

# a job referred to by name is the newest top-level job of that name: the index
# carries the rowid (seq), so the newest is the last entry of the name (version 2)
_JOBS_NAME = "CREATE INDEX jobs_name ON jobs(name) WHERE parent IS NULL"

# seq is the rowid (INTEGER PRIMARY KEY): listing in submission order is a plain
# walk of the table, and inserts in seq order append. id stays unique and indexed.
# Each row is in exactly one of the two partial indexes jobs_top / jobs_children,
# so `mnp list` never walks the 100,000 children of an array.
_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        parent TEXT,
        array_index INTEGER,
        name TEXT,
        queue TEXT,
        type TEXT,
        state TEXT NOT NULL DEFAULT 'SUBMITTED',
        reason TEXT,
        created REAL,
        started REAL,
        stopped REAL,
        exit_code INTEGER,
        signal INTEGER,
        attempt_count INTEGER NOT NULL DEFAULT 0,  -- get_job()["attempts"] lists them
        timed_out INTEGER NOT NULL DEFAULT 0,
        definition TEXT,
        depends_on TEXT,
        array_size INTEGER,
        num_nodes INTEGER
    )""",
    # (state, queue) serves state = ? as well as state = ? AND queue = ?: one index
    # to keep up to date at every state change instead of two
    "CREATE INDEX jobs_state_queue ON jobs(state, queue)",
    "CREATE INDEX jobs_top ON jobs(seq) WHERE parent IS NULL",
    "CREATE INDEX jobs_children ON jobs(parent, array_index) WHERE parent IS NOT NULL",
    _JOBS_NAME,
    """CREATE TABLE attempts (
        job_id TEXT NOT NULL,
        number INTEGER NOT NULL,
        ce TEXT,
        hosts TEXT,
        placed_at REAL,
        running_at REAL,
        main_exit_at REAL,
        reaped_at REAL,
        stopped_at REAL,
        exit_code INTEGER,
        signal INTEGER,
        reason TEXT,
        final_state TEXT,
        usage TEXT,  -- JSON: tid -> {max_rss_bytes, cpu_seconds, ...} (version 3)
        PRIMARY KEY (job_id, number)
    ) WITHOUT ROWID""",
    """CREATE TABLE nodes (
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        node_index INTEGER NOT NULL,
        host TEXT,
        grp INTEGER,
        state TEXT,
        reason TEXT,
        exit_code INTEGER,
        signal INTEGER,
        started REAL,
        stopped REAL,
        PRIMARY KEY (job_id, attempt, node_index)
    ) WITHOUT ROWID""",
    # job_id: the event's subject ("42", "42:7", "42#3"); root: the top-level job
    # ("42"). An index on a column carries the rowid (seq), so each index below
    # is ordered by seq within one value: `events --follow --job` is a seek.
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        time REAL,
        job_id TEXT,
        root TEXT,
        body TEXT NOT NULL
    )""",
    "CREATE INDEX events_job ON events(job_id)",
    "CREATE INDEX events_root ON events(root)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID",
    registry.TABLE,
)

# version N -> statements that turn it into N + 1
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (_JOBS_NAME,),  # jobs by name (mnp describe NAME, --depends-on NAME)
    # what each task used. Readers of version 1 and 2 go on: they read attempts with
    # SELECT * and take a missing usage as none (codec.decode_attempt)
    2: ("ALTER TABLE attempts ADD COLUMN usage TEXT",),
    # registered definitions (mnp definitions). Readers of version 1 to 3 go on: a
    # file without the table holds none (registry._exists)
    3: (registry.TABLE,),
}

JOB_COLUMNS = (
    "seq",
    "id",
    "parent",
    "array_index",
    "name",
    "queue",
    "type",
    "state",
    "reason",
    "created",
    "started",
    "stopped",
    "exit_code",
    "signal",
    "attempt_count",
    "timed_out",
    "definition",
    "depends_on",
    "array_size",
    "num_nodes",
)
SUMMARY_COLUMNS = tuple(c for c in JOB_COLUMNS if c != "definition")
ATTEMPT_COLUMNS = (
    "job_id",
    "number",
    "ce",
    "hosts",
    "placed_at",
    "running_at",
    "main_exit_at",
    "reaped_at",
    "stopped_at",
    "exit_code",
    "signal",
    "reason",
    "final_state",
    "usage",
)
NODE_COLUMNS = (
    "job_id",
    "attempt",
    "node_index",
    "host",
    "grp",
    "state",
    "reason",
    "exit_code",
    "signal",
    "started",
    "stopped",
)

_SET_ASIDE = (
    "it is damaged or not a database; (re)starting the controller (mnp controller stop; "
    "mnp controller start) moves it aside as mnp.db.corrupt-TIME, kept, and starts an empty one"
)
_CORRUPT = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT"})

_HINTS = {
    "SQLITE_FULL": "free space on its disk",
    "SQLITE_READONLY": "it is read-only here (check the permissions of the file and its directory)",
    "SQLITE_READONLY_DIRECTORY": "its directory is not writable",
    "SQLITE_CANTOPEN": "it cannot be opened (does its directory exist and is it writable?)",
    "SQLITE_NOTADB": _SET_ASIDE,
    "SQLITE_CORRUPT": _SET_ASIDE,
    "SQLITE_BUSY": "another process holds it locked (is a second controller running?)",
    "SQLITE_IOERR": "is it a regular file on a healthy local disk?",
}


class CorruptDatabase(InfraError):
    """The file is not an SQLite database, or SQLite found it damaged. ``detail`` is
    SQLite's own words (``file is not a database``)."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def infra_error(path: Path, doing: str, exc: BaseException) -> InfraError:
    """One line naming the file, what was being done, and what a person can do."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    primary = "_".join(name.split("_")[:2])  # extended -> primary
    hint = _HINTS.get(name) or _HINTS.get(primary)
    if isinstance(exc, OSError):
        detail = exc.strerror or str(exc)
    else:
        detail = str(exc)
    text = f"state database {path}: {doing} failed: {detail}"
    if hint and hint not in text:
        text += f"; {hint}"
    text = " ".join(text.split())
    if primary in _CORRUPT:
        return CorruptDatabase(text, " ".join(detail.split()))
    return InfraError(text)


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode (transactions are explicit), WAL for writers."""
    if readonly:
        return _connect_readonly(path)
    try:
        # created here, not by sqlite, so that it is born 0600 (-wal/-shm copy its mode)
        os.close(open_regular(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as e:
        raise infra_error(path, "opening for writing", e) from e
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise infra_error(path, "opening", e) from e
    try:
        _tune(conn, WRITER_CACHE_KIB)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise InfraError(
                f"state database {path}: cannot use write-ahead logging (journal mode {mode}); "
                "put MNP_HOME on a local file system"
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        _prepare(conn, path, readonly=False)
    except BaseException as e:
        conn.close()
        if isinstance(e, sqlite3.Error):
            raise infra_error(path, "opening", e) from e
        raise
    return conn


@contextmanager
def guard(path: Path, doing: str) -> Iterator[None]:
    """sqlite3 errors become one-line InfraErrors naming ``path`` and what was being
    done; constraint violations (bugs, not the disk) become ValueErrors."""
    try:
        yield
    except sqlite3.IntegrityError as e:
        raise ValueError(f"state database {path}: {doing}: {e}") from e
    except sqlite3.Error as e:
        raise infra_error(path, doing, e) from e


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (``BEGIN IMMEDIATE``): committed, or rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def analyze(conn: sqlite3.Connection) -> None:
    """Refresh the planner's statistics (sampled: milliseconds at any size).

    Whether walking the table or the parents-only index lists parents faster
    depends on how many array children there are; the statistics tell.
    """
    try:
        conn.execute(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT}")
        conn.execute("ANALYZE")
    except sqlite3.Error:
        pass  # an optimisation: a full disk must not keep the store from opening or closing


def _connect_readonly(path: Path) -> sqlite3.Connection:
    try:
        os.close(open_regular(path, os.O_RDONLY))  # a FIFO would hang SQLite
    except FileNotFoundError:
        raise InfraError(
            f"state database {path}: does not exist (no controller has used it yet)"
        ) from None
    except NotARegularFile as e:
        raise infra_error(path, "opening read-only", e) from e
    except OSError:
        pass  # not readable: SQLite says why
    uri = path.absolute().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise infra_error(path, "opening read-only", e) from e
    try:
        try:
            _tune(conn)
            _prepare(conn, path, readonly=True)
        except sqlite3.OperationalError as e:
            # A WAL database whose -shm cannot be created (directory not writable)
            # can only be read as immutable. That is safe only while no writer has
            # it open, which a missing -wal file shows.
            wal = path.with_name(path.name + "-wal")
            if getattr(e, "sqlite_errorname", "") != "SQLITE_READONLY_DIRECTORY" or wal.exists():
                raise
            conn.close()
            conn = sqlite3.connect(
                uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False
            )
            _tune(conn)
            _prepare(conn, path, readonly=True)
    except BaseException as e:
        conn.close()
        if isinstance(e, sqlite3.Error):
            raise infra_error(path, "opening read-only", e) from e
        raise
    return conn


def _tune(conn: sqlite3.Connection, cache_kib: int = CACHE_KIB) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA cache_size = -{cache_kib}")


def _prepare(conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
    """Check the schema version; create or migrate it (writers only)."""
    version = _version(conn)
    if version == SCHEMA_VERSION or (readonly and READS_FROM <= version < SCHEMA_VERSION):
        return
    if version > SCHEMA_VERSION:
        raise InfraError(
            f"state database {path}: schema version {version} was written by a newer mnp "
            f"(this one reads up to {SCHEMA_VERSION}); upgrade mnp or use another --home"
        )
    if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise _foreign(path)
    if readonly:
        what = "has no mnp schema yet" if version == 0 else f"has schema version {version}"
        raise InfraError(f"state database {path}: {what}; start the controller once to set it up")
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _version(conn)  # another process may have done it meanwhile
        if version == 0:
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise _foreign(path)
            for statement in _SCHEMA:
                conn.execute(statement)
        else:
            for v in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[v]:
                    conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _foreign(path: Path) -> InfraError:
    return InfraError(
        f"state database {path}: is an SQLite file that mnp did not create; use another --home"
    )


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])
