"""Purging finished jobs: their rows, events and logs, and ``events.jsonl`` rewritten.

``mnp purge`` and the controller's retention setting both end up here. The store
is single-writer: with a controller running, ``mnp purge`` asks it (the ``purge``
op, ``Service.purge``); with none, it takes the controller's lock (so that none
can start meanwhile; one that tries waits for the purge) and purges the file
itself (``purge_stored``). Either way the work goes in bounded steps:

1. ``Store.purge`` removes up to ``PURGE_CHUNK`` finished top-level jobs at a time
   (their rows, attempts and nodes) and notes them as pending;
2. ``Store.sweep_purged`` deletes what they left (array children, events) a few
   thousand rows at a time; a job of which nothing is left loses its
   ``logs/JOB`` folder, then leaves the pending list (a purge cut short by a
   crash is finished by the next one, or at the controller's next start);
3. ``events.jsonl`` is written anew from the store (which holds every committed
   event that was not purged) and renamed over the old one.

Job ids and event ``seq`` go on from where they were (see ``Store.purge``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mnp.errors import InfraError, UsageError
from mnp.store import Store

EVENTS_NAME = "events.jsonl"
DB_NAME = "mnp.db"
FINISHED = ("SUCCEEDED", "FAILED")
NEVER = ("never", "none", "off")
MIN_RETENTION = 1.0
MAX_RETENTION_CHECK = 3600.0
"""The controller applies its retention at start and then every retention/10,
at least every second and at most every hour."""


def parse_retention(text: str | None, where: str = "--retention") -> float | None:
    """Seconds of a retention setting; ``None`` for never (not given, or never/none/off)."""
    from mnp.spec.units import parse_duration

    if text is None or not text.strip() or text.strip().lower() in NEVER:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise UsageError(f"{where}: {e}; or never") from None
    if seconds < MIN_RETENTION:
        raise UsageError(
            f"{where}: {text.strip()} is shorter than {MIN_RETENTION:g}s; "
            "use a duration such as 30d, or never"
        )
    return seconds


def retention_every(retention: float) -> float:
    """How often the controller applies a retention of ``retention`` seconds."""
    return min(MAX_RETENTION_CHECK, max(1.0, retention / 10))


def remove_logs(logs: Path, job_ids: Iterable[str]) -> list[str]:
    """Remove ``logs/JOB`` of each job; what could not be removed, as ``PATH: ERROR``."""
    errors: list[str] = []

    def failed(_fn: Callable[..., object], path: str, exc: object) -> None:
        if isinstance(exc, tuple):  # onerror's exc_info (Python 3.11)
            exc = exc[1]
        errors.append(f"{path}: {getattr(exc, 'strerror', None) or exc}")

    for job_id in job_ids:
        if not job_id.isdigit():  # ids are digits: nothing else is ever under logs/
            continue
        path = logs / job_id
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink()  # never followed
            else:
                if sys.version_info >= (3, 12):
                    shutil.rmtree(path, onexc=failed)
                else:
                    shutil.rmtree(path, onerror=failed)
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append(f"{path}: {e.strerror or e}")
    return errors


def rewrite_events_file(store: Store, events_path: Path, upto: int, *, rename: bool = True) -> Path:
    """Write ``events.jsonl`` anew: every stored event up to seq ``upto``, in order.

    Written beside it (``events.jsonl.tmp``, 0600, synced) and renamed over it, so
    a reader sees the old file or the new one, never a mix; ``rename=False`` leaves
    the renaming to the caller (returns the path written). ``store`` may be a
    read-only one (the controller does this in a thread, with its own). Raises
    ``OSError`` (the old file stays) or ``InfraError``.
    """
    tmp = events_path.with_name(events_path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            after = 0
            while True:
                lines = store.event_lines(after, upto)
                if not lines:
                    break
                f.write("".join(body + "\n" for _, body in lines).encode())
                after = lines[-1][0]
            f.flush()
            os.fsync(f.fileno())
        if rename:
            os.replace(tmp, events_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def sweep(store: Store, home: Path) -> list[str]:
    """Finish what purges left (``Store.sweep_purged``) and remove those jobs' logs.
    Returns the log folders that could not be removed."""
    errors: list[str] = []
    while True:
        done, more = store.sweep_purged()
        if done:
            errors += remove_logs(home / "logs", done)
            store.purge_done(done)
        if not more:
            return errors


def settle(store: Store, home: Path) -> list[str]:
    """``sweep``, then rewrite ``events.jsonl`` if a purge made it stale. With no
    controller running (the caller holds the lock)."""
    errors = sweep(store, home)
    if store.events_file_stale():
        try:
            rewrite_events_file(store, home / EVENTS_NAME, store.max_event_seq())
        except OSError as e:
            raise InfraError(
                f"{home / EVENTS_NAME}: cannot be rewritten without the purged jobs' "
                f"events: {e.strerror or e}; the next purge tries again"
            ) from e
        store.events_file_rewritten()
    return errors


def purge_stored(
    home: Path, before: float | None, state: str | None
) -> tuple[list[str], list[str]]:
    """Purge with no controller running; the caller holds the controller's lock.
    Returns the purged job ids and the log folders that could not be removed."""
    path = home / DB_NAME
    if not path.exists():
        return [], []
    ids: list[str] = []
    errors: list[str] = []
    with Store(path) as store:
        from mnp.store.db import PURGE_CHUNK

        while True:
            errors += sweep(store, home)  # before each chunk: the pending list stays short
            chunk = store.purge(before, state=state)
            ids += chunk
            if len(chunk) < PURGE_CHUNK:
                break
        errors += settle(store, home)
    return ids, errors


@dataclass(frozen=True)
class Purged:
    job_ids: list[str]
    log_errors: list[str]  # log folders that could not be removed: PATH: ERROR
    through: str  # "controller" (the running one did it) or "here"


def purge(home: Path, older_than: float | None, state: str | None, *, wait: float = 30.0) -> Purged:
    """``mnp purge``: through the running controller, or here under its lock."""
    from mnp.api import ApiClient
    from mnp.daemon import PURGE_ROLE, Lock

    if state is not None and state not in FINISHED:
        raise UsageError(f"--state {state}: only finished jobs are purged; use SUCCEEDED or FAILED")
    deadline = time.monotonic() + wait
    while True:
        client = ApiClient.connect(home)
        if client is not None:
            with client:
                answer = client.request("purge", older_than=older_than, state=state)
            return Purged(
                [str(i) for i in answer.get("job_ids") or ()],
                [str(e) for e in answer.get("log_errors") or ()],
                "controller",
            )
        if not home.is_dir():
            return Purged([], [], "here")
        lock = Lock(home)
        try:
            taken = lock.acquire(role=PURGE_ROLE)
        except OSError as e:
            raise InfraError(f"cannot lock {lock.path}: {e.strerror or e}") from e
        if taken:
            try:
                before = None if older_than is None else time.time() - older_than
                ids, errors = purge_stored(home, before, state)
            finally:
                lock.release()
            return Purged(ids, errors, "here")
        if time.monotonic() >= deadline:
            raise InfraError(
                f"a controller holds {lock.path} (pid {lock.holder() or '?'}) but does not "
                f"answer on its socket within {wait:g}s; try again when it has started"
            )
        time.sleep(0.05)
