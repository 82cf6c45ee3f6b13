"""The controller's ``Recorder``: its jobs, attempts and events into the store, the
events into ``$MNP_HOME/events.jsonl``, its tasks' output into ``$MNP_HOME/logs/``.

Writes are batched and flushed every ``FLUSH_EVERY`` seconds (and at once when a
caller needs them durable). Nothing here raises into the controller's loop: a write
that fails stays buffered and is tried again every ``RETRY_EVERY`` seconds (see the
package docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnp.errors import InfraError, MnpError
from mnp.files import open_regular
from mnp.jobid import top_of
from mnp.jobs import ARRAY_CUT, Attempt, Job, NodeRun, TaskRun, output_label
from mnp.model import JobState
from mnp.purge import EVENTS_NAME, rewrite_events_file
from mnp.service.feeds import Feeds
from mnp.service.logfiles import TaskLog, events_tail, highest_log_id
from mnp.spec import definition_to_dict
from mnp.store import Store, codec, gaps

if TYPE_CHECKING:
    from mnp.controller import Controller

log = logging.getLogger("mnp")

FLUSH_EVERY = 0.05
"""Seconds: the batching window for store and log writes. Every commit costs about the
same whatever it holds; a window of 20 ms cost a busy controller ~10% more CPU than
50 ms (a 5,000-child local array), 100 ms no less than 50. What a client must read at
once is flushed at once (an accepted submit, the end ``run`` and ``wait`` answer)."""
DB_CHECK_EVERY = 2.0  # seconds: how often the state database's file is checked
RETRY_EVERY = 1.0  # seconds: how soon a write that failed (disk full, locked) is tried again
LOG_FOLDER_FRESH = 1.0  # seconds: a log folder found writable is not checked again


class Recording:
    """Implements ``mnp.controller.Recorder`` and the controller's output callbacks
    (``output``, ``task_start``, ``task_end``); ``bind`` gives it the controller it
    records, whose jobs it reads and whose jobs' reasons it adds to."""

    def __init__(self, home: Path, store: Store, feeds: Feeds) -> None:
        self.store = store
        self.feeds = feeds
        self.events_path = home / EVENTS_NAME
        self.logs = home / "logs"
        self.controller: Controller | None = None
        self._events_rewriting = False  # events.jsonl is being written anew: hold lines back
        self._event_lines: list[tuple[str, str]] = []  # (root job id, line): not committed yet
        self._events_out = bytearray()  # committed, not yet in the events file
        self._events_fd: int | None = None
        self._trouble: dict[str, str] = {}  # what cannot be written now -> why (logged once)
        self._files: dict[tuple[str, int], TaskLog] = {}
        # rows behind their objects, written at the next flush (each once, however
        # often it changed since): job -> Job, (job, attempt) -> Attempt, node -> NodeRun
        self._new_children: dict[str, Job] = {}  # array children whose row is not yet made
        self._job_rows: dict[str, Job] = {}
        self._attempt_rows: dict[tuple[str, int], Attempt] = {}
        self._node_rows: dict[tuple[str, int, int], NodeRun] = {}
        self._log_folders: dict[str, float] = {}  # job -> when its log folder was writable
        self._flush_handle: asyncio.TimerHandle | None = None
        self._db_check: asyncio.TimerHandle | None = None
        self.db_lost: str | None = None  # why the state database's file is not ours any more
        # told the JSON lines of the events each flush commits (the hooks: mnp.service.hooks)
        self.on_committed: Callable[[list[str]], None] | None = None

    def bind(self, controller: Controller) -> None:
        self.controller = controller

    def _jobs(self) -> dict[str, Job]:
        return {} if self.controller is None else self.controller.jobs

    # --- Recorder ---------------------------------------------------------

    def next_id(self) -> str:
        try:
            return str(self.store.next_job_id())
        except InfraError as e:
            raise InfraError(f"job not accepted: {e}") from e

    def ids_below(self) -> int:
        return self.store.job_ids_below

    def jobs_added(self, jobs: Sequence[Job]) -> None:
        """Buffer the new jobs' rows. A top-level job's now (its definition is encoded, and
        what cannot be fails its submit); an array child's at the next flush, whole, as
        the child is then: one statement where an insert and an update of its state
        would be two (a short child is often over by then)."""
        rows = []
        for job in jobs:
            if job.parent is not None:
                self._new_children[job.id] = job
                continue
            defn = job.defn
            deps = [f"{d.job_id}:{d.type}" if d.type else d.job_id for d in defn.depends_on]
            rows.append(
                {
                    **_row_of(job),
                    "definition": definition_to_dict(defn),
                    "depends_on": deps,
                    "array_size": defn.array.size if defn.array is not None else None,
                }
            )
        if rows:
            self.store.add_jobs(rows)
        self._dirty()

    def event(self, event: dict[str, Any]) -> int:
        seq, body = self.store.add_event(event)
        job_id = str(event["job_id"])
        if event.get("type") == ARRAY_CUT:  # read back as rows by mnp.store.gaps
            first, _last = event["array_range"]
            cut = {"from": first, "state": event["status"], "reason": event.get("reason")}
            self.store.set_meta(gaps.cut_key(job_id), json.dumps({**cut, "time": event["time"]}))
        self._event_lines.append((top_of(job_id), body + "\n"))
        if "node_index" in event:
            job = self._jobs().get(top_of(job_id))
            if job is not None and job.attempt is not None:
                self._mark_node(job.id, job.attempt, job.attempt.nodes[int(event["node_index"])])
        else:
            job = self._jobs().get(job_id)
            if job is not None:
                self._job_rows[job.id] = job
        self._dirty()
        return seq

    def attempt(self, job: Job, attempt: Attempt) -> None:
        self._attempt_rows[(job.id, attempt.number)] = attempt
        for node in attempt.nodes:
            self._mark_node(job.id, attempt, node)
        self._dirty()

    def _mark_node(self, job_id: str, attempt: Attempt, node: NodeRun) -> None:
        self._node_rows[(job_id, attempt.number, node.index)] = node

    def _write_rows(self) -> None:
        """Buffer in the store the rows of what changed since the last flush, as the
        objects are now."""
        store = self.store
        if self._new_children:
            for job_id in self._new_children:
                self._job_rows.pop(job_id, None)
            rows = [{**_row_of(job), **_changes_of(job)} for job in self._new_children.values()]
            self._new_children.clear()
            store.add_jobs(rows)
        for job in self._job_rows.values():
            store.update_job(job.id, **_changes_of(job))
        for (job_id, number), attempt in self._attempt_rows.items():
            store.upsert_attempt(
                job_id,
                number,
                ce=attempt.ce,
                hosts=[g.host for g in attempt.grants],
                placed_at=attempt.placed_at,
                running_at=attempt.running_at,
                main_exit_at=attempt.main_exit_at,
                reaped_at=attempt.reaped_at,
                stopped_at=attempt.stopped_at,
                exit_code=attempt.exit_code,
                signal=attempt.signal,
                reason=attempt.reason,
                final_state=attempt.final.value if attempt.final and attempt.stopped_at else None,
                usage=attempt.usage(),
            )
        for (job_id, number, index), node in self._node_rows.items():
            store.upsert_node(
                job_id,
                number,
                index,
                host=node.host,
                grp=node.group,
                state=node.state.value,
                reason=node.reason,
                exit_code=node.exit_code,
                signal=node.signal,
            )
        self._job_rows.clear()
        self._attempt_rows.clear()
        self._node_rows.clear()

    def stored_job(self, job_id: str) -> tuple[JobState, int | None] | None:
        try:
            found = self.store.state_and_size(job_id)
        except MnpError as e:
            log.error("store: %s", e)
            return None
        return None if found is None else (JobState(found[0]), found[1])

    def newest_named(self, name: str) -> str | None:
        try:
            return self.store.newest_named(name)
        except MnpError as e:
            log.error("store: %s", e)
            return None

    def withdraw(self, job: Job) -> None:
        """Drop what was recorded of a job the controller withdrew (never committed)."""
        ids = {job.id, *(c.id for c in job.held)}
        for job_id in ids:
            self._job_rows.pop(job_id, None)
            self._new_children.pop(job_id, None)
        self._attempt_rows = {k: v for k, v in self._attempt_rows.items() if k[0] not in ids}
        self._node_rows = {k: v for k, v in self._node_rows.items() if k[0] not in ids}
        self.store.discard(list(ids))
        self._event_lines = [e for e in self._event_lines if e[0] != job.id]

    # --- output -----------------------------------------------------------

    def _log(self, job: Job, task: TaskRun, fd: int) -> TaskLog:
        path = self.logs / top_of(job.id) / f"{task.tid}.{'out' if fd == 1 else 'err'}"
        log_file = self._files[(task.tid, fd)] = TaskLog(job, path)
        return log_file

    def task_start(self, job: Job, task: TaskRun) -> str | None:
        """Check that the task's log folder takes files before it starts; if not, why not.
        The files themselves are made at the first output (a task that says nothing
        leaves none). A folder found writable is taken as such for
        ``LOG_FOLDER_FRESH`` seconds (an array's children share their parent's)."""
        top = top_of(job.id)
        now = time.monotonic()
        checked = self._log_folders.get(top)
        if checked is not None and now - checked < LOG_FOLDER_FRESH:
            return None
        folder = self.logs / top
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"Cannot write logs: {e.filename or folder}: {e.strerror or e}"
        if os.access(folder, os.W_OK):
            if len(self._log_folders) > 1000:
                self._log_folders.clear()
            self._log_folders[top] = now
            return None
        log_file = self._log(job, task, 1)  # fails, and says why
        if log_file.error is None:
            return None
        del self._files[(task.tid, 1)]
        return f"Cannot write logs: {log_file.error}"

    def output(self, job: Job, task: TaskRun, fd: int, data: str) -> None:
        log_file = self._files.get((task.tid, fd))
        if log_file is None:
            log_file = self._log(job, task, fd)
            self._lost(log_file, log_file.error)
        self._lost(log_file, log_file.write(data))
        self._dirty()
        if self.feeds.watched(job):
            label = output_label(job, task)
            self.feeds.publish(job, {"out": data, "fd": fd, "tid": task.tid, "label": label})

    def task_end(self, job: Job, task: TaskRun) -> None:
        for fd in (1, 2):
            log_file = self._files.pop((task.tid, fd), None)
            if log_file is not None:
                self._lost(log_file, log_file.close())

    def _lost(self, log_file: TaskLog, error: str | None) -> None:
        """Output that could not be written: said once in the log and in the job's reason."""
        if error is not None:
            log.warning("job %s: output lost: %s", log_file.job.id, error)
            if self.controller is not None:
                self.controller.note(log_file.job, f"Output lost: {error}")

    # --- batching ---------------------------------------------------------

    def _dirty(self, delay: float | None = None) -> None:
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(
                FLUSH_EVERY if delay is None else delay, self.flush
            )

    def flush(self) -> str | None:
        """Write what is buffered: the store (one transaction), then the events file and
        the logs. Never raises: what cannot be written stays buffered and is tried again
        within ``RETRY_EVERY``. Returns why the store could not commit, or None."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        try:
            self._write_rows()
            self.store.flush()
        except (MnpError, ValueError) as e:  # ValueError: a bug; the store dropped the batch
            failed: str | None = str(e)
        else:
            failed = None
            committed = [line for _, line in self._event_lines]
            self._events_out += "".join(committed).encode()
            self._event_lines.clear()
            if committed and self.on_committed is not None:
                self.on_committed(committed)
        self._report("store", failed)
        self._report("events", self._write_events())
        for log_file in self._files.values():
            self._lost(log_file, log_file.flush())
        if self._trouble:
            self._dirty(RETRY_EVERY)
        return failed

    def _write_events(self) -> str | None:
        """Append what the store has committed to ``events.jsonl``; why not, if not all.
        While a purge writes the file anew, lines wait here."""
        if self._events_rewriting:
            return None
        while self._events_out:
            try:
                if self._events_fd is None:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
                    self._events_fd = open_regular(self.events_path, flags, 0o600)
                n = os.write(self._events_fd, self._events_out)
            except OSError as e:
                return f"{self.events_path}: {e.strerror or e}"
            del self._events_out[:n]
        return None

    def _report(self, what: str, error: str | None) -> None:
        """Log a write failure once (not at every retry), and when it is over."""
        if error is None:
            if self._trouble.pop(what, None) is not None:
                log.info("%s: written again", what)
        elif self._trouble.get(what) != error:
            self._trouble[what] = error
            log.error("%s: %s (kept, tried again every %gs)", what, error, RETRY_EVERY)

    def catch_up_events(self) -> None:
        """Queue the events the store has and ``events.jsonl`` lacks (it fell behind on a
        full disk, or a crash tore its last line, which is cut off first). A store that
        is behind the file (a new database: the old one was deleted or replaced) goes on
        after the file's last ``seq`` and after every job id the file and ``logs/``
        show, so that no number is ever given out twice."""
        tail = events_tail(self.events_path)
        top = highest_log_id(self.logs)
        if tail is None:
            self.store.continue_after(job_id=top)
            return
        last, top_event_job = tail
        self.store.continue_after(event_seq=last, job_id=max(top, top_event_job))
        while True:
            rows = self.store.events_since(last, limit=10_000)
            if not rows:
                return
            for row in rows:
                self._events_out += (codec.dumps(row) + "\n").encode()
            last = int(rows[-1]["seq"])

    async def rewrite_events(self) -> None:
        """Write ``events.jsonl`` anew from the store, in a thread: the purged jobs'
        lines leave it. Lines committed meanwhile wait (``_write_events``) and follow."""
        if self.flush() is not None:
            return  # the store cannot commit now: the next purge tries again
        upto = self.store.max_event_seq()
        self._events_rewriting = True
        self._events_out.clear()  # all committed, all up to `upto`: in the new file
        done = False
        try:
            tmp = await asyncio.get_running_loop().run_in_executor(
                None, self._rewrite_in_thread, upto
            )
            os.replace(tmp, self.events_path)  # here, not in the thread: nothing writes now
            done = True
        except (OSError, MnpError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            log.error("events: cannot write %s anew: %s (tried again later)", self.events_path, why)
        finally:
            self._events_rewriting = False
            if done:
                if self._events_fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(self._events_fd)
                    self._events_fd = None  # the next write opens the new file
                self.store.events_file_rewritten()
            else:
                self.catch_up_events()  # what the old file lacks
            self._report("events", self._write_events())

    def _rewrite_in_thread(self, upto: int) -> Path:
        with Store(self.store.path, readonly=True) as reader:
            return rewrite_events_file(reader, self.events_path, upto, rename=False)

    # --- the database file ----------------------------------------------

    def check_db(self) -> str | None:
        """Whether ``mnp.db`` is still the file this controller writes; once it is not
        (deleted, replaced), ``db_lost`` says so for good, and it is logged once."""
        if self.db_lost is None:
            what = self.store.file_changed()
            if what is not None:
                self.db_lost = (
                    f"state database {self.store.path} {what} while the controller "
                    f"(pid {os.getpid()}) ran, so it accepts no job it could not keep: "
                    "restart it (mnp controller stop; mnp controller start); the jobs it "
                    "holds now will not be in the new database"
                )
                log.error("%s", self.db_lost)
        return self.db_lost

    def check_db_every(self) -> None:
        """Check the database's file now and every ``DB_CHECK_EVERY`` seconds, until it is
        lost or ``close``."""
        self._db_check = None
        if self.check_db() is None:
            loop = asyncio.get_running_loop()
            self._db_check = loop.call_later(DB_CHECK_EVERY, self.check_db_every)

    def stop_checking_db(self) -> None:
        if self._db_check is not None:
            self._db_check.cancel()
            self._db_check = None

    def close(self) -> None:
        """Write what is left, close the files and the store (at shutdown)."""
        self.flush()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for log_file in self._files.values():
            log_file.close()
        if self._events_fd is not None:
            os.close(self._events_fd)
            self._events_fd = None
        if self._event_lines or self._events_out:
            log.error("events: %s lags the store; caught up at the next start", self.events_path)
        try:
            self.store.close()
        except MnpError as e:
            log.error("store: %s (the last changes are lost)", e)


def _row_of(job: Job) -> dict[str, Any]:
    """The columns of a new job's row that every job has, as ``job`` is now."""
    defn = job.defn
    return {
        "id": job.id,
        "seq": job.seq,
        "parent": job.parent.id if job.parent is not None else None,
        "array_index": job.array_index,
        "name": defn.name,
        "queue": defn.queue,
        "type": defn.type.value,
        "state": job.state.value,
        "created": job.created,
        "num_nodes": defn.multinode.num_nodes if defn.multinode is not None else None,
    }


def _changes_of(job: Job) -> dict[str, Any]:
    """The columns of a job's row that its life changes, as ``job`` is now."""
    return {
        "state": job.state.value,
        "reason": job.reason,
        "exit_code": job.exit_code,
        "signal": job.signal,
        "attempt_count": len(job.attempts),
        "started": job.started_at,
        "stopped": job.stopped_at,
        "timed_out": job.timed_out,
    }
