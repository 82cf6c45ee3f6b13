"""The controller daemon: a ``Controller`` recorded in the store, served on the socket.

``Service`` is the controller's ``Recorder``: every job it accepts is written
to SQLite (``mnp.store``), every state change appended to the store and to
``$MNP_HOME/events.jsonl``, every task's output to
``$MNP_HOME/logs/JOB/TID.out|err``. Writes are batched and flushed every
``FLUSH_EVERY`` seconds, and at once before ``submit`` answers (an accepted
job is durable). Reads (``list``, ``describe``, ``events``, ``logs``) do not go
through here: the CLI opens the store read-only and the log files directly.

Disk and permission faults never raise into the controller's loop:

- a write that fails (a full disk, a locked database) stays buffered and is
  tried again every ``RETRY_EVERY`` seconds; ``events.jsonl`` gets only what the
  store has committed, and catches up from the store at start;
- a submit is answered only once its job is committed; if that fails the job is
  withdrawn (never started, never half-recorded) and the client is told why;
- a task starts only once its log folder takes files (else its attempt fails with
  ``Cannot write logs: PATH: ERROR``); output that cannot be written later is
  dropped, and the job's final reason ends with ``Output lost: PATH: ERROR``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from mnp.api import Handler, Responder
from mnp.controller import Controller, Restored
from mnp.errors import InfraError, JobRefused, MnpError, UsageError
from mnp.files import open_regular
from mnp.jobid import top_of
from mnp.jobs import Attempt, Job, NodeRun, TaskRun, job_exit_code, output_label
from mnp.model import TERMINAL, Inventory, JobState
from mnp.purge import EVENTS_NAME, remove_logs, retention_every, rewrite_events_file
from mnp.spec import definition_to_dict, parse_definition, unverified_warning
from mnp.spec.units import format_duration
from mnp.state import open_store
from mnp.store import Store, codec
from mnp.store.db import PURGE_CHUNK, SWEEP_BUDGET
from mnp.transport import transports_for

log = logging.getLogger("mnp")

FLUSH_EVERY = 0.02  # seconds: the batching window for store and log writes
DB_CHECK_EVERY = 2.0  # seconds: how often the state database's file is checked
RUN_BUFFER = 4 << 20  # characters of output kept for one `mnp run` client that reads slowly
RETRY_EVERY = 1.0  # seconds: how soon a write that failed (disk full, locked) is tried again


class Service:
    def __init__(
        self,
        home: Path,
        inventory: Inventory,
        inventory_key: str = "",
        *,
        retention: float | None = None,
    ) -> None:
        self.home = home
        self.inventory = inventory
        self.inventory_key = inventory_key
        self.retention = retention
        self.store, self._restorable, corrupt = open_store(home, EVENTS_NAME)
        self.events_path = home / EVENTS_NAME
        self._events_rewriting = False  # events.jsonl is being written anew: hold lines back
        self._purging = asyncio.Lock()
        self._housekeeping: asyncio.Task[None] | None = None
        self._event_lines: list[tuple[str, str]] = []  # (root job id, line): not committed yet
        self._events_out = bytearray()  # committed, not yet in the events file
        self._events_fd: int | None = None
        self._trouble: dict[str, str] = {}  # what cannot be written now -> why (logged once)
        token = self.store.get_meta("controller_token")
        if token is None:
            token = secrets.token_hex(8)
            self.store.set_meta("controller_token", token)
            self.store.flush()
        self.controller = Controller(
            inventory,
            transports_for(inventory),
            token=token,
            on_output=self._output,
            on_task_start=self._task_start,
            on_task_end=self._task_end,
            recorder=self,
        )
        self.logs = home / "logs"
        self._files: dict[tuple[str, int], _Log] = {}
        self._subscribers: dict[str, set[_Feed]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._db_check: asyncio.TimerHandle | None = None
        self.db_lost: str | None = None  # why the state database's file is not ours any more
        self.started = time.time()
        warning = unverified_warning(inventory)
        # told to every client that uses this controller
        self.warnings = [w for w in (corrupt, warning) if w]

    # --- Recorder ---------------------------------------------------------

    def next_id(self) -> str:
        try:
            return str(self.store.next_job_id())
        except InfraError as e:
            raise InfraError(f"job not accepted: {e}") from e

    def ids_below(self) -> int:
        return self.store.job_ids_below

    def jobs_added(self, jobs: Sequence[Job]) -> None:
        rows = []
        for job in jobs:
            defn = job.defn
            child = job.parent is not None
            rows.append(
                {
                    "id": job.id,
                    "seq": job.seq,
                    "parent": job.parent.id if job.parent is not None else None,
                    "array_index": job.array_index,
                    "name": defn.name,
                    "queue": defn.queue,
                    "type": defn.type.value,
                    "state": job.state.value,
                    "created": job.created,
                    "definition": None if child else definition_to_dict(defn),
                    "depends_on": None
                    if child
                    else [f"{d.job_id}:{d.type}" if d.type else d.job_id for d in defn.depends_on],
                    "array_size": defn.array.size if defn.array is not None and not child else None,
                    "num_nodes": defn.multinode.num_nodes if defn.multinode is not None else None,
                }
            )
        self.store.add_jobs(rows)
        self._dirty()

    def event(self, event: dict[str, Any]) -> int:
        seq, body = self.store.add_event(event)
        job_id = str(event["job_id"])
        self._event_lines.append((top_of(job_id), body + "\n"))
        if "node_index" in event:
            job = self.controller.jobs.get(top_of(job_id))
            if job is not None and job.attempt is not None:
                self._record_node(job, job.attempt, job.attempt.nodes[int(event["node_index"])])
        else:
            job = self.controller.jobs.get(job_id)
            if job is not None:
                self.store.update_job(
                    job.id,
                    state=job.state.value,
                    reason=job.reason,
                    exit_code=job.exit_code,
                    signal=job.signal,
                    attempt_count=len(job.attempts),
                    started=job.started_at,
                    stopped=job.stopped_at,
                    timed_out=job.timed_out,
                )
                if job.state in TERMINAL:
                    self._publish(job, {"state": job.state.value, "job_id": job.id})
        self._dirty()
        return seq

    def attempt(self, job: Job, attempt: Attempt) -> None:
        self.store.upsert_attempt(
            job.id,
            attempt.number,
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
        )
        for node in attempt.nodes:
            self._record_node(job, attempt, node)
        self._dirty()

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

    def _record_node(self, job: Job, attempt: Attempt, node: NodeRun) -> None:
        self.store.upsert_node(
            job.id,
            attempt.number,
            node.index,
            host=node.host,
            grp=node.group,
            state=node.state.value,
            reason=node.reason,
            exit_code=node.exit_code,
            signal=node.signal,
        )

    # --- output -----------------------------------------------------------

    def _log(self, job: Job, task: TaskRun, fd: int) -> _Log:
        path = self.logs / top_of(job.id) / f"{task.tid}.{'out' if fd == 1 else 'err'}"
        log_file = self._files[(task.tid, fd)] = _Log(job, path)
        return log_file

    def _task_start(self, job: Job, task: TaskRun) -> str | None:
        """Check that the task's log folder takes files before it starts; if not, why not.
        The files themselves are made at the first output (a task that says nothing
        leaves none)."""
        folder = self.logs / top_of(job.id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"Cannot write logs: {e.filename or folder}: {e.strerror or e}"
        if os.access(folder, os.W_OK):
            return None
        log_file = self._log(job, task, 1)  # fails, and says why
        if log_file.error is None:
            return None
        del self._files[(task.tid, 1)]
        return f"Cannot write logs: {log_file.error}"

    def _output(self, job: Job, task: TaskRun, fd: int, data: str) -> None:
        log_file = self._files.get((task.tid, fd))
        if log_file is None:
            log_file = self._log(job, task, fd)
            self._lost(log_file, log_file.error)
        self._lost(log_file, log_file.write(data))
        self._dirty()
        root = top_of(job.id)
        if root in self._subscribers:
            label = output_label(job, task)
            self._publish(job, {"out": data, "fd": fd, "tid": task.tid, "label": label})

    def _task_end(self, job: Job, task: TaskRun) -> None:
        for fd in (1, 2):
            log_file = self._files.pop((task.tid, fd), None)
            if log_file is not None:
                self._lost(log_file, log_file.close())

    def _lost(self, log_file: _Log, error: str | None) -> None:
        """Output that could not be written: said once in the log and in the job's reason."""
        if error is not None:
            log.warning("job %s: output lost: %s", log_file.job.id, error)
            self.controller.note(log_file.job, f"Output lost: {error}")

    def _publish(self, job: Job, msg: dict[str, Any]) -> None:
        for feed in self._subscribers.get(top_of(job.id), ()):
            feed.put(msg)

    # --- batching ---------------------------------------------------------

    def _dirty(self, delay: float = FLUSH_EVERY) -> None:
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(delay, self.flush)

    def flush(self) -> str | None:
        """Write what is buffered: the store (one transaction), then the events file and
        the logs. Never raises: what cannot be written stays buffered and is tried again
        within ``RETRY_EVERY``. Returns why the store could not commit, or None."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        try:
            self.store.flush()
        except (MnpError, ValueError) as e:  # ValueError: a bug; the store dropped the batch
            failed: str | None = str(e)
        else:
            failed = None
            self._events_out += "".join(line for _, line in self._event_lines).encode()
            self._event_lines.clear()
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

    def _catch_up_events(self) -> None:
        """Queue the events the store has and ``events.jsonl`` lacks (it fell behind on a
        full disk, or a crash tore its last line, which is cut off first). A store that
        is behind the file (a new database: the old one was deleted or replaced) goes on
        after the file's last ``seq`` and after every job id the file and ``logs/``
        show, so that no number is ever given out twice."""
        tail = _events_tail(self.events_path)
        top = _highest_log_id(self.logs)
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

    def _accept(self, request: dict[str, Any]) -> Job:
        """Submit a job and commit it; if it cannot be committed it is withdrawn (also
        when the database file turns out not to be ``mnp.db`` any more)."""
        self._refuse_if_db_lost()
        job = self.controller.submit(self._definition(request))
        failed = self.flush()
        if failed is None and self._check_db() is not None:
            failed = self.db_lost
        if failed is not None:
            self.controller.withdraw(job)
            self.store.discard([job.id, *(c.id for c in job.children)])
            self._event_lines = [e for e in self._event_lines if e[0] != job.id]
            raise InfraError(f"job not accepted: {failed}")
        return job

    def _check_db(self) -> str | None:
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

    def _refuse_if_db_lost(self) -> None:
        if self._check_db() is not None:
            raise InfraError(f"job not accepted: {self.db_lost}")

    def _periodic_db_check(self) -> None:
        self._db_check = None
        if self._check_db() is None:
            loop = asyncio.get_running_loop()
            self._db_check = loop.call_later(DB_CHECK_EVERY, self._periodic_db_check)

    # --- lifecycle --------------------------------------------------------

    async def start(self, *, restore: bool = True) -> None:
        """Connect to the hosts and take back the unfinished jobs of an earlier controller
        (``restore``; ``mnp run`` hosting its own controller leaves them to the next
        daemon)."""
        for w in self.warnings:
            log.warning("%s", w)
        self._catch_up_events()  # before anything new is committed
        self.controller.continue_numbering(self.store.max_job_seq())
        rows, self._restorable = (self._restorable if restore else []), []
        items = []
        for row in rows:
            definition = row.get("definition")
            if definition is None:
                continue
            try:
                defn = parse_definition(definition, f"<job {row['id']}>")
            except MnpError as e:
                log.error("job %s cannot be restored: %s", row["id"], e)
                continue
            items.append(
                Restored(
                    id=row["id"],
                    defn=defn,
                    seq=row["seq"],
                    state=JobState(row["state"]),
                    created=row["created"] or time.time(),
                    parent=row.get("parent"),
                    array_index=row.get("array_index"),
                    attempts=row.get("attempt_count") or 0,
                    reason=row.get("reason"),
                )
            )
        if items:
            log.info("restoring %d unfinished job(s)", len(items))
        # restored once the hosts are connected, before their agents' stale sweeps
        await self.controller.start(restored=items)
        self.flush()
        self._periodic_db_check()
        if self.retention is not None:
            log.info(
                "retention: finished jobs are purged %s after they end (checked every %s)",
                format_duration(self.retention),
                format_duration(retention_every(self.retention)),
            )
        self._housekeeping = asyncio.ensure_future(self._keep_house())

    async def shutdown(self) -> None:
        if self._db_check is not None:
            self._db_check.cancel()
            self._db_check = None
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._housekeeping
            self._housekeeping = None
        await self.controller.close()
        # `run` clients learn that their job was stopped, not failed, and goes on later
        for queues in self._subscribers.values():
            for q in queues:
                q.put({"stopping": True})
        for _ in range(200):  # up to 2 s for their handlers to answer
            if not self._subscribers:
                break
            await asyncio.sleep(0.01)
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

    # --- purge and retention ----------------------------------------------

    async def _keep_house(self) -> None:
        """Finish a purge a previous controller left half done, then apply the retention
        setting at start and every ``retention_every`` seconds."""
        try:
            if self.store.purge_pending() or self.store.events_file_stale():
                await self.purge(None, None, select=False)
        except MnpError as e:
            log.error("purge: finishing an earlier purge: %s (tried again at the next)", e)
        while self.retention is not None:
            try:
                ids, _ = await self.purge(time.time() - self.retention, None)
            except MnpError as e:
                log.error("retention: %s (tried again later)", e)
            except Exception:  # a bug: said, and the controller goes on
                log.exception("retention: purging finished jobs failed")
            else:
                if ids:
                    log.info("retention: purged %d finished job(s)", len(ids))
            await asyncio.sleep(retention_every(self.retention))

    async def purge(
        self, before: float | None, state: str | None, *, select: bool = True
    ) -> tuple[list[str], list[str]]:
        """Purge finished jobs (see ``mnp.purge``) in bounded steps, letting the loop run
        between them: one transaction of at most ``PURGE_CHUNK`` jobs or about
        ``SWEEP_BUDGET`` rows at a time, logs removed and ``events.jsonl`` written anew
        in a thread. ``select=False``: only finish what earlier purges left."""
        async with self._purging:
            ids: list[str] = []
            errors = await self._sweep()
            while select:
                failed = self.flush()
                if failed is not None:
                    raise InfraError(f"purge: {failed}")
                chunk = self.store.purge(before, state=state, limit=PURGE_CHUNK)
                self.controller.forget(chunk)
                ids += chunk
                errors += await self._sweep()
                if len(chunk) < PURGE_CHUNK:
                    break
            for e in errors:
                log.warning("purge: cannot remove %s", e)
            if self.store.events_file_stale():
                await self._rewrite_events()
            return ids, errors

    async def _sweep(self) -> list[str]:
        """What purged jobs left, a bounded transaction at a time; their logs in a thread."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        while True:
            await asyncio.sleep(0)  # the loop runs between steps
            done, more = self.store.sweep_purged(SWEEP_BUDGET)
            if done:
                errors += await loop.run_in_executor(None, remove_logs, self.logs, done)
                self.store.purge_done(done)
            if not more:
                return errors

    async def _rewrite_events(self) -> None:
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
                self._catch_up_events()  # what the old file lacks
            self._report("events", self._write_events())

    def _rewrite_in_thread(self, upto: int) -> Path:
        with Store(self.store.path, readonly=True) as reader:
            return rewrite_events_file(reader, self.events_path, upto, rename=False)

    async def op_purge(self, request: dict[str, Any], r: Responder) -> None:
        older_than = request.get("older_than")
        state = request.get("state")
        if older_than is not None and (
            isinstance(older_than, bool)
            or not isinstance(older_than, int | float)
            or not 0 <= older_than < float("inf")
        ):
            raise UsageError(f"purge: older_than {older_than!r} is not a number of seconds")
        if state is not None and state not in ("SUCCEEDED", "FAILED"):
            raise UsageError(f"purge: cannot purge {state!r} jobs; use SUCCEEDED or FAILED")
        before = None if older_than is None else time.time() - float(older_than)
        ids, errors = await self.purge(before, state)
        await r.end({"ok": True, "job_ids": ids, "log_errors": errors})

    # --- requests ---------------------------------------------------------

    async def handle(self, request: dict[str, Any], r: Responder) -> None:
        op = request.get("op")
        fn = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if fn is None:
            raise UsageError(f"unknown request {op!r}")
        await fn(request, r)

    def _definition(self, request: dict[str, Any]) -> Any:
        data = request.get("definition")
        if not isinstance(data, dict):
            raise UsageError("submit: a definition is required")
        return parse_definition(data, str(request.get("source") or "<submitted>"))

    def _job(self, request: dict[str, Any]) -> Job:
        """The job a request names by id or by name (the newest of that name)."""
        ref = str(request.get("job_id", ""))
        job_id = self.controller.resolve(ref)
        if job_id is None:
            raise JobRefused(f"job {ref} does not exist")
        job = self.controller.jobs.get(job_id)
        if job is None:
            raise JobRefused(
                f"job {ref} is not known to the running controller (it ended before the "
                "controller's last start)"
            )
        return job

    async def op_info(self, request: dict[str, Any], r: Responder) -> None:
        await r.end(
            {
                "ok": True,
                "inventory": self.inventory_key,
                "hosts": len(self.inventory.hosts),
                "warnings": self.warnings,
            }
        )

    async def op_submit(self, request: dict[str, Any], r: Responder) -> None:
        job = self._accept(request)
        await r.end({"ok": True, "job_id": job.id, "warnings": self.warnings})

    async def op_run(self, request: dict[str, Any], r: Responder) -> None:
        """Submit, stream the job's output, end with how it ended. A client that reads
        more slowly than the job writes gets gaps, each said in a line on stderr (the
        logs have everything): the controller keeps at most ``RUN_BUFFER`` characters
        of output for it."""
        job = self._accept(request)
        queue = _Feed(RUN_BUFFER, job.id)
        self._subscribers.setdefault(job.id, set()).add(queue)
        await r.send({"ok": True, "job_id": job.id, "warnings": self.warnings})
        try:
            waiter = asyncio.ensure_future(self.controller.wait(job))
            waiter.add_done_callback(lambda _f: queue.put(None))
            closed = asyncio.ensure_future(r.wait_closed())
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    getter.cancel()
                    if not job.done:  # the client went away: the job goes with it
                        self.controller.terminate(job.id, "mnp run client went away")
                    return
                msg = getter.result()
                if msg is None and job.done:
                    break
                if msg is not None and msg.get("stopping") and not job.done:
                    closed.cancel()
                    await r.fail(
                        InfraError(
                            f"the controller stopped; job {job.id} was not failed and runs "
                            "again when a controller starts for this home (mnp controller start)"
                        )
                    )
                    return
                if msg is not None and "out" in msg:
                    await r.send(msg)
            closed.cancel()
            await r.end(self._outcome(job))
        finally:
            subs = self._subscribers.get(job.id)
            if subs is not None:
                subs.discard(queue)
                if not subs:
                    del self._subscribers[job.id]

    def _outcome(self, job: Job) -> dict[str, Any]:
        return {
            "ok": True,
            "job_id": job.id,
            "state": job.state.value,
            "reason": job.reason,
            "exit_code": job_exit_code(job),
            "timings": [a.timings() for a in job.attempts if a.placed_at is not None],
        }

    async def op_wait(self, request: dict[str, Any], r: Responder) -> None:
        job = self._job(request)
        await self.controller.wait(job)
        await r.end(self._outcome(job))

    async def op_cancel(self, request: dict[str, Any], r: Responder) -> None:
        job = self.controller.cancel(self._job(request).id, str(request.get("reason") or ""))
        self.flush()
        await r.end({"ok": True, "job_id": job.id, "name": job.defn.name, "state": job.state.value})

    async def op_terminate(self, request: dict[str, Any], r: Responder) -> None:
        job = self.controller.terminate(self._job(request).id, str(request.get("reason") or ""))
        self.flush()
        await r.end({"ok": True, "job_id": job.id, "name": job.defn.name, "state": job.state.value})

    async def op_hosts(self, request: dict[str, Any], r: Responder) -> None:
        """Every host's capacity, what is free of it, and its load now (``load``: the
        1-minute load average, ``memory_used``: bytes in use on the host, whoever uses
        them; None for a host that is down or did not answer in time)."""
        loads = await self.controller.host_loads()
        rows = []
        for h in self.inventory.hosts:
            cap = self.controller.capacity.get(h.name)
            conn = self.controller.agents.get(h.name)
            sample = loads.get(h.name, {})
            averages = sample.get("load")
            rows.append(
                {
                    "name": h.name,
                    "address": h.address,
                    "state": "up" if cap is not None and cap.up and conn else "down",
                    "vcpus": cap.vcpus if cap else None,
                    "vcpus_free": cap.free_vcpus if cap else None,
                    "memory": cap.memory if cap else None,
                    "memory_free": cap.free_memory if cap else None,
                    "gpus": len(cap.gpus) if cap else None,
                    "gpus_free": len(cap.free_gpus) if cap else None,
                    "tasks": cap.tasks if cap else 0,
                    "load": averages[0] if isinstance(averages, list) and averages else None,
                    "memory_used": sample.get("memory_used"),
                    "error": self.controller.host_errors.get(h.name),
                }
            )
        await r.end({"ok": True, "hosts": rows})

    async def op_queues(self, request: dict[str, Any], r: Responder) -> None:
        self.flush()
        counts = self.store.counts_by_queue_state()
        rows = [
            {
                "name": q.name,
                "priority": q.priority,
                "state": q.state,
                "compute_environments": list(q.compute_environments),
                "counts": counts.get(q.name, {}),
            }
            for q in sorted(self.inventory.queues.values(), key=lambda q: -q.priority)
        ]
        await r.end({"ok": True, "queues": rows})


class _Feed:
    """What one ``mnp run`` client has yet to be sent: messages in order, of which the
    output (``"out"``) ones hold at most ``limit`` characters. Output that does not fit
    is dropped -- and what follows, until the client has taken everything kept -- then
    a note on stderr says how much the client missed. Other messages (the job's end)
    are never dropped."""

    def __init__(self, limit: int, job_id: str) -> None:
        self.limit = limit
        self.job_id = job_id
        self.items: collections.deque[dict[str, Any] | None] = collections.deque()
        self.size = 0  # characters of output in items
        self.dropped = 0  # characters dropped since the last note
        self._ready = asyncio.Event()

    def put(self, msg: dict[str, Any] | None) -> None:
        if msg is not None and "out" in msg:
            n = len(msg["out"])
            if self.dropped or self.size + n > self.limit:
                self.dropped += n
                return
            self.size += n
        self.items.append(msg)
        self._ready.set()

    async def get(self) -> dict[str, Any] | None:
        while not self.items or (self.items[0] is None and self.dropped):
            if self.dropped:  # said before the end, and before more output
                text = (
                    f"mnp: {self.dropped:,} characters of output not shown here: this client "
                    f"read more slowly than the job wrote; mnp logs {self.job_id} has it all\n"
                )
                self.dropped = 0
                return {"out": text, "fd": 2, "tid": "mnp", "label": None}
            self._ready.clear()
            await self._ready.wait()
        msg = self.items.popleft()
        if msg is not None and "out" in msg:
            self.size -= len(msg["out"])
        return msg


class _Log:
    """One task's stdout or stderr file. Nothing here raises: a failure (the file cannot
    be made, the disk is full) drops the output from then on and is returned, once, as
    ``PATH: ERROR``; ``error`` keeps it."""

    def __init__(self, job: Job, path: Path) -> None:
        self.job = job
        self.path = path
        self.error: str | None = None
        self.file: IO[str] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # task output is exact: surrogate escapes are written as the bytes they stand for
            self.file = open(path, "a", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        except OSError as e:
            self.error = f"{e.filename or path}: {e.strerror or e}"

    def write(self, data: str) -> str | None:
        try:
            return self._do(lambda f: f.write(data))
        except UnicodeEncodeError:  # a surrogate that stands for no byte: not from an agent
            text = data.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            return self._do(lambda f: f.write(text))

    def flush(self) -> str | None:
        return self._do(lambda f: f.flush())

    def close(self) -> str | None:
        error = self._do(lambda f: f.close())
        self.file = None
        return error

    def _do(self, action: Callable[[IO[str]], object]) -> str | None:
        if self.file is None:
            return None
        try:
            action(self.file)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.file.close()  # the fd goes even when the flush in it fails again
            self.file = None
            self.error = f"{self.path}: {e.strerror or e}"
            return self.error
        return None


def _highest_log_id(logs: Path) -> int:
    """The highest job id with a folder in ``logs/`` (0 if none)."""
    try:
        names = os.listdir(logs)
    except OSError:
        return 0
    return max((int(n) for n in names if n.isdigit()), default=0)


def _events_tail(path: Path) -> tuple[int, int] | None:
    """The ``seq`` of the last whole line of ``events.jsonl`` and the highest top-level
    job id among its last lines ((0, 0) if none, None if it cannot be read); a torn last
    line (the controller died mid-write) is cut off."""
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = max(0, end - 65536)
            f.seek(start)
            tail = f.read()
    except FileNotFoundError:
        return 0, 0
    except OSError as e:
        log.error("events: cannot read %s: %s", path, e.strerror or e)
        return None
    cut = tail.rfind(b"\n") + 1
    if cut < len(tail) and (cut or start == 0):
        try:
            os.truncate(path, start + cut)
        except OSError as e:
            log.error("events: cannot cut the torn last line of %s: %s", path, e.strerror or e)
    last: int | None = None
    top = 0
    for line in reversed(tail[:cut].splitlines()):
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            event = json.loads(line)
            if last is None:
                last = int(event["seq"])
            root = top_of(str(event["job_id"]))
            if root.isdigit():
                top = max(top, int(root))
    return last or 0, top


def make_handler_factory(
    home: Path, inventory: Inventory, inventory_key: str = "", retention: float | None = None
) -> Callable[[Callable[[], None]], Any]:
    """What ``daemon.serve_forever`` runs: build the service, then hand back its handler."""

    async def make_handler(stop: Callable[[], None]) -> tuple[Handler, Any]:
        service = Service(home, inventory, inventory_key, retention=retention)
        try:
            await service.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await service.shutdown()
            raise
        return service.handle, service.shutdown

    return make_handler
