"""The controller daemon: a ``Controller`` recorded in the store, served on the socket.

``Service`` is the controller's ``Recorder``: every job it accepts is written
to SQLite (``mnp.store``), every state change appended to the store and to
``$MNP_HOME/events.jsonl``, every task's output to
``$MNP_HOME/logs/JOB/TID.out|err``. Writes are batched and flushed every
``FLUSH_EVERY`` seconds, and at once before ``submit`` answers (an accepted
job is durable). Reads (``list``, ``describe``, ``events``, ``logs``) do not go
through here: the CLI opens the store read-only and the log files directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from mnp.api import Handler, Responder
from mnp.controller import Controller, Restored
from mnp.errors import JobRefused, MnpError, UsageError
from mnp.jobs import Attempt, Job, NodeRun, TaskRun
from mnp.model import TERMINAL, Inventory, JobState
from mnp.run import OutputPrinter, job_exit_code, transports_for
from mnp.spec import definition_to_dict, parse_definition, unverified_warning
from mnp.store import Store

log = logging.getLogger("mnp")

FLUSH_EVERY = 0.02  # seconds: the batching window for store and log writes


def root_of(job_id: str) -> str:
    return job_id.split(":", 1)[0].split("#", 1)[0]


class Service:
    def __init__(self, home: Path, inventory: Inventory, inventory_key: str = "") -> None:
        self.home = home
        self.inventory = inventory
        self.inventory_key = inventory_key
        self.store = Store(home / "mnp.db")
        self.events_file = open(home / "events.jsonl", "a", encoding="utf-8")  # noqa: SIM115
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
            on_task_end=self._task_end,
            recorder=self,
        )
        self.logs = home / "logs"
        self._files: dict[tuple[str, int], IO[str]] = {}
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self.started = time.time()
        warning = unverified_warning(inventory)
        self.warnings = [warning] if warning else []  # told to every client that uses it

    # --- Recorder ---------------------------------------------------------

    def next_id(self) -> str:
        return str(self.store.next_job_id())

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
        seq = self.store.append_event(event)
        self.events_file.write(json.dumps({"seq": seq, **event}) + "\n")
        job_id = str(event["job_id"])
        if "node_index" in event:
            job = self.controller.jobs.get(root_of(job_id))
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

    def _output(self, job: Job, task: TaskRun, fd: int, data: str) -> None:
        key = (task.tid, fd)
        f = self._files.get(key)
        if f is None:
            folder = self.logs / root_of(job.id)
            folder.mkdir(parents=True, exist_ok=True)
            f = open(folder / f"{task.tid}.{'out' if fd == 1 else 'err'}", "a", encoding="utf-8")  # noqa: SIM115
            self._files[key] = f
        f.write(data)
        self._dirty()
        root = root_of(job.id)
        if root in self._subscribers:
            label = OutputPrinter.label(job, task)
            self._publish(job, {"out": data, "fd": fd, "tid": task.tid, "label": label})

    def _task_end(self, job: Job, task: TaskRun) -> None:
        for fd in (1, 2):
            f = self._files.pop((task.tid, fd), None)
            if f is not None:
                f.close()

    def _publish(self, job: Job, msg: dict[str, Any]) -> None:
        for q in self._subscribers.get(root_of(job.id), ()):
            q.put_nowait(msg)

    # --- batching ---------------------------------------------------------

    def _dirty(self) -> None:
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        try:
            self.store.flush()
        except MnpError as e:  # disk full, locked: kept buffered, tried again
            log.error("store: %s", e)
            self._dirty()
        self.events_file.flush()
        for f in self._files.values():
            f.flush()

    # --- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        for w in self.warnings:
            log.warning("%s", w)
        await self.controller.start()
        self.controller.continue_numbering(self.store.max_job_seq())
        rows = self.store.unfinished_jobs()
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
            self.controller.restore(items, time.time())
        self.flush()

    async def shutdown(self) -> None:
        await self.controller.close()
        self.flush()
        for f in self._files.values():
            f.close()
        self.events_file.close()
        self.store.close()

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
        job_id = str(request.get("job_id", ""))
        job = self.controller.jobs.get(job_id)
        if job is None:
            raise JobRefused(f"job {job_id} is not known to the running controller")
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
        job = self.controller.submit(self._definition(request))
        self.flush()
        await r.end({"ok": True, "job_id": job.id, "warnings": self.warnings})

    async def op_run(self, request: dict[str, Any], r: Responder) -> None:
        """Submit, stream the job's output, end with how it ended."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        job = self.controller.submit(self._definition(request))
        self._subscribers.setdefault(job.id, set()).add(queue)
        self.flush()
        await r.send({"ok": True, "job_id": job.id, "warnings": self.warnings})
        try:
            waiter = asyncio.ensure_future(self.controller.wait(job))
            waiter.add_done_callback(lambda _f: queue.put_nowait(None))
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
        await r.end({"ok": True, "job_id": job.id, "state": job.state.value})

    async def op_terminate(self, request: dict[str, Any], r: Responder) -> None:
        job = self.controller.terminate(self._job(request).id, str(request.get("reason") or ""))
        self.flush()
        await r.end({"ok": True, "job_id": job.id, "state": job.state.value})

    async def op_hosts(self, request: dict[str, Any], r: Responder) -> None:
        rows = []
        for h in self.inventory.hosts:
            cap = self.controller.capacity.get(h.name)
            conn = self.controller.agents.get(h.name)
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


def make_handler_factory(
    home: Path, inventory: Inventory, inventory_key: str = ""
) -> Callable[[Callable[[], None]], Any]:
    """What ``daemon.serve_forever`` runs: build the service, then hand back its handler."""

    async def make_handler(stop: Callable[[], None]) -> tuple[Handler, Any]:
        service = Service(home, inventory, inventory_key)
        try:
            await service.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await service.shutdown()
            raise
        return service.handle, service.shutdown

    return make_handler
