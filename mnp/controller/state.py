"""What the controller's rooms share, in one object: the jobs, the run queue, the
tasks that run, the hooks, the recorder, the clock and the host pool.

``Controller`` (``core``) makes one ``Shared`` and hands it to each room
(``admission``, ``attempts``, ``starting``); a room reaches the others' records
through it, never by importing ``core``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mnp.controller.hosts import HostPool
from mnp.jobs import Attempt, Job, TaskRun
from mnp.model import Grant, Inventory, JobState
from mnp.sched.runqueue import RunQueue


class Recorder(Protocol):
    """Where the controller's records go besides memory (the daemon's store)."""

    def next_id(self) -> str: ...

    def ids_below(self) -> int:
        """Every job id ``next_id`` gave out so far is below this number."""
        ...

    def jobs_added(self, jobs: Sequence[Job]) -> None: ...

    def event(self, event: dict[str, Any]) -> int:
        """Record a state change; return its ``seq``."""
        ...

    def attempt(self, job: Job, attempt: Attempt) -> None: ...

    def stored_job(self, job_id: str) -> tuple[JobState, int | None] | None:
        """The state and array size (an array parent's, else None) of a stored job that
        the controller does not hold (one that ended before a restart); None if none."""
        ...

    def newest_named(self, name: str) -> str | None:
        """The id of the newest stored top-level job called ``name``, or None."""
        ...


OutputHandler = Callable[[Job, TaskRun, int, str], None]
TaskStartHandler = Callable[[Job, TaskRun], str | None]
"""Called before a task is spawned; a string is why it cannot start (its attempt fails)."""
TaskEndHandler = Callable[[Job, TaskRun], None]
EventSink = Callable[[dict[str, Any]], None]


@dataclass(eq=False)
class Shared:
    """The records and the means every room of the controller works with."""

    inventory: Inventory
    hosts: HostPool
    recorder: Recorder | None
    emit: EventSink
    """Where every job's state changes go (``Job``'s sink)."""
    on_output: OutputHandler | None = None
    on_task_start: TaskStartHandler | None = None
    on_task_end: TaskEndHandler | None = None
    clock: Callable[[], float] = time.time
    """The wall clock: read where something happens (an event, a timer), then passed on
    as ``now``."""
    jobs: dict[str, Job] = field(default_factory=dict)
    runnable: dict[str, Job] = field(default_factory=dict)
    runq: RunQueue = field(default_factory=RunQueue)  # their requests, per queue in seq order
    tasks: dict[str, tuple[Job, Attempt, TaskRun]] = field(default_factory=dict)
    waiters: dict[str, list[asyncio.Future[Job]]] = field(default_factory=dict)
    closed: bool = False
    schedule_pass: Callable[[], None] | None = None
    """The scheduling pass (``Starter.schedule_pass``) that ``request_schedule`` runs."""
    _schedule_requested: bool = field(default=False, init=False)
    bg: set[asyncio.Task[Any]] = field(default_factory=set)

    def enqueue(self, job: Job) -> None:
        self.runnable[job.id] = job
        if job.request is not None:
            self.runq.add(job.request)

    def dequeue(self, job: Job) -> None:
        if self.runnable.pop(job.id, None) is not None and job.request is not None:
            self.runq.discard(job.request)

    def request_schedule(self) -> None:
        """Run one scheduling pass soon (once, however often it is asked before then)."""
        if not self._schedule_requested and not self.closed:
            self._schedule_requested = True
            asyncio.get_running_loop().call_soon(self._run_schedule_pass)

    def _run_schedule_pass(self) -> None:
        self._schedule_requested = False
        if self.schedule_pass is not None:
            self.schedule_pass()

    def give_back(self, grants: Sequence[Grant]) -> None:
        """Return what ``grants`` held to their hosts' capacity."""
        for grant in grants:
            cap = self.hosts.capacity.get(grant.host)
            if cap is not None:
                cap.give(grant)

    def record_attempt(self, job: Job, attempt: Attempt) -> None:
        if self.recorder is not None:
            self.recorder.attempt(job, attempt)

    def task_gone(self, job: Job, task: TaskRun) -> None:
        """``task`` is over on its host: forget it, and tell ``on_task_end``."""
        self.tasks.pop(task.tid, None)
        if self.on_task_end is not None:
            self.on_task_end(job, task)

    def spawn_bg(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.bg.add(task)
        task.add_done_callback(self.bg.discard)
