"""The controller's core: the public API, composing the rooms that do the work.

``Controller`` holds what the service and ``mnp run`` call (submit, cancel,
terminate, wait, resolve, restore, close) and makes the rooms, which share one
``state.Shared`` (jobs, run queue, tasks, hooks, recorder, clock, host pool) and
never import this module:

- ``admission``: ``Admission`` -- ids, dependencies, array children, restore, and a
  job's end (``finish``): what ``mnp.sched.lifecycle`` decides before a job runs;
- ``starting``: ``Starter`` -- the scheduling pass (``mnp.sched.decide``), each
  placed attempt's spawns (the ``Launcher``'s messages), the multi-node start order;
- ``attempts``: ``Attempts`` -- the agents' events about running tasks, timeouts,
  teardown, retry or finish (``mnp.sched.lifecycle``), one job's failure kept its own;
- ``launch``: ``Launcher`` -- a placement into each task's argv, environment, files;
- ``hosts``: ``HostPool`` -- the agents, reached by host; it knows no jobs.

Decisions come from the pure modules (``mnp.sched.decide``: where; ``lifecycle``:
what next); the rooms read the clock where something happens (``Shared.clock``) and
pass ``now`` on.
"""

from __future__ import annotations

import asyncio
import secrets as pysecrets
from collections.abc import Mapping, Sequence
from typing import Any

from mnp.controller.admission import LOST_REASON, Admission, Restored
from mnp.controller.attempts import TEARDOWN_SLACK, Attempts
from mnp.controller.hosts import LOAD_WITHIN, HostPool
from mnp.controller.launch import Launcher
from mnp.controller.starting import Starter
from mnp.controller.state import (
    EventSink,
    OutputHandler,
    Recorder,
    Shared,
    TaskEndHandler,
    TaskStartHandler,
)
from mnp.errors import JobRefused
from mnp.jobs import Job
from mnp.model import TERMINAL, Inventory, JobDefinition, JobState
from mnp.transport.base import Event, Transport

__all__ = [
    "LOST_REASON",
    "TEARDOWN_SLACK",
    "Controller",
    "EventSink",
    "OutputHandler",
    "Recorder",
    "Restored",
    "TaskEndHandler",
    "TaskStartHandler",
]


class Controller:
    def __init__(
        self,
        inventory: Inventory,
        transports: Mapping[str, Transport],
        *,
        token: str | None = None,
        on_output: OutputHandler | None = None,
        on_task_start: TaskStartHandler | None = None,
        on_task_end: TaskEndHandler | None = None,
        on_event: EventSink | None = None,
        agent_grace: float = 2.0,
        connect_fanout: int = 64,
        recorder: Recorder | None = None,
        heartbeat: tuple[float, float] | None = None,
    ) -> None:
        self.inventory = inventory
        self.token = token or pysecrets.token_hex(8)
        self.on_event = on_event
        self.agent_grace = agent_grace
        self.recorder = recorder
        self.hosts = HostPool(
            inventory,
            transports,
            self.token,
            on_event=lambda host, msg: self.attempts.on_event_guarded(host, msg),
            on_lost=lambda host, why: self.attempts.on_host_lost(host, why),
            on_up=lambda _host: self.shared.request_schedule(),
            stale=self._stale_sweep,
            heartbeat=heartbeat,
            connect_fanout=connect_fanout,
        )
        # the pool's, under the names the service and the tests read
        self.agents = self.hosts.agents
        self.capacity = self.hosts.capacity
        self.host_errors = self.hosts.host_errors
        self.shared = Shared(
            inventory,
            self.hosts,
            recorder,
            self._emit,
            on_output=on_output,
            on_task_start=on_task_start,
            on_task_end=on_task_end,
        )
        self.jobs: dict[str, Job] = self.shared.jobs
        self.events: list[dict[str, Any]] = []
        self._event_seq = 0
        self.launcher = Launcher(inventory, self.hosts)
        self.admission = Admission(self.shared)
        self.attempts = Attempts(self.shared, self.admission)
        self.starter = Starter(self.shared, self.launcher, self.attempts)
        self.attempts.main_running = self.starter.main_running
        self.shared.schedule_pass = self.starter.schedule_pass

    # the hooks and the teardown bound live in the rooms; set them here at any time

    @property
    def on_output(self) -> OutputHandler | None:
        return self.shared.on_output

    @on_output.setter
    def on_output(self, handler: OutputHandler | None) -> None:
        self.shared.on_output = handler

    @property
    def on_task_start(self) -> TaskStartHandler | None:
        return self.shared.on_task_start

    @on_task_start.setter
    def on_task_start(self, handler: TaskStartHandler | None) -> None:
        self.shared.on_task_start = handler

    @property
    def on_task_end(self) -> TaskEndHandler | None:
        return self.shared.on_task_end

    @on_task_end.setter
    def on_task_end(self, handler: TaskEndHandler | None) -> None:
        self.shared.on_task_end = handler

    @property
    def teardown_slack(self) -> float:
        """Seconds after ``kill_grace`` that an ending attempt's hosts have to confirm
        its teardown (``attempts.TEARDOWN_SLACK``)."""
        return self.attempts.teardown_slack

    @teardown_slack.setter
    def teardown_slack(self, seconds: float) -> None:
        self.attempts.teardown_slack = seconds

    # --- hosts ------------------------------------------------------------

    async def start(self, restored: Sequence[Restored] = ()) -> None:
        """Connect to every host at once (bounded); unreachable ones are retried later.

        ``restored``: the unfinished jobs a previous controller left (``restore``). They
        are taken back once the hosts are connected and before any agent gets its
        ``stale`` sweep, so that no sweep judges their retries (same job ids) left over."""
        try:
            await self.hosts.connect_all()
            if restored:
                self.restore(restored, self.shared.clock())
        finally:
            # before this returns, and so before any scheduling pass can send a spawn
            self.hosts.release_stale()

    def _stale_sweep(self) -> Event:
        """What a new agent kills before it runs anything: processes of this controller
        left on its host by jobs that are over, or by an agent that died (SIGKILL, host
        lost) -- their jobs, if still running, were given up on that host and retried.

        Only jobs that were ever placed can have processes: those unfinished are listed
        as live, and ``below`` stops at the oldest unfinished job never placed (it may be
        placed while the agent looks), so the message stays the size of what runs, not
        of the queue."""
        recorder = self.recorder
        below = recorder.ids_below() if recorder is not None else self.admission.next_id
        placed = []
        for job in self.jobs.values():
            if job.parent is not None or job.state in TERMINAL:
                continue
            if job.attempts or job.admitted:
                placed.append(job.id)
            elif job.id.isdigit():
                below = min(below, int(job.id))
        live = sorted(j for j in placed if not (j.isdigit() and int(j) >= below))
        return {"op": "stale", "live": live, "below": below, "grace": self.agent_grace}

    async def host_loads(self, within: float = LOAD_WITHIN) -> dict[str, Event]:
        """Each connected host's load now (``HostPool.host_loads``)."""
        return await self.hosts.host_loads(within)

    # --- jobs -------------------------------------------------------------

    def submit(self, defn: JobDefinition) -> Job:
        """Accept a job (``Admission.submit``): it is PENDING, or already released."""
        return self.admission.submit(defn)

    def continue_numbering(self, last_seq: int) -> None:
        """Go on after the highest ``seq`` a previous controller gave out (FIFO order
        and the store's unique key both rely on it)."""
        self.admission.seq = max(self.admission.seq, last_seq)

    def restore(self, items: Sequence[Restored], now: float) -> None:
        """Take back the unfinished jobs a previous controller accepted
        (``Admission.restore``)."""
        self.admission.restore(items, now)

    def state_of(self, job_id: str) -> JobState | None:
        """A job's state, or None when no such job exists (held, or stored by the
        recorder: a job that ended before a restart)."""
        return self.admission.state_of(job_id)

    def resolve(self, ref: str) -> str | None:
        """The id of the job ``ref`` refers to, or None (``Admission.resolve``)."""
        return self.admission.resolve(ref)

    def _find(self, job_id: str) -> Job:
        job = self.jobs.get(self.resolve(job_id) or job_id)
        if job is None:
            raise JobRefused(f"job {job_id} does not exist")
        return job

    def cancel(self, job_id: str, reason: str) -> Job:
        """SUBMITTED/PENDING/RUNNABLE → FAILED; what already runs goes on (AWS Batch).
        ``job_id`` may be a name (:meth:`resolve`)."""
        job = self._find(job_id)
        self.admission.cancel(job, reason, self.shared.clock())
        return job

    def terminate(self, job_id: str, reason: str) -> Job:
        """Like cancel, and STARTING/RUNNING ones are ended. ``job_id`` may be a name."""
        job = self._find(job_id)
        self.attempts.terminate(job, reason, self.shared.clock())
        return job

    def note(self, job: Job, text: str) -> None:
        """Add ``text`` to the job's final reason (after the reason itself, if any): for
        what went wrong beside the job, such as its output lost. The first note is kept."""
        if job.note is None:
            job.note = text

    def withdraw(self, job: Job) -> None:
        """Forget a job that was just submitted, as if it never had been
        (``Admission.withdraw``)."""
        self.admission.withdraw(job)

    def forget(self, job_ids: Sequence[str]) -> None:
        """Drop finished top-level jobs purged from the store (``Admission.forget``)."""
        self.admission.forget(job_ids)

    # --- waiting and closing ----------------------------------------------

    async def wait(self, job: Job) -> Job:
        if job.done:
            return job
        fut: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self.shared.waiters.setdefault(job.id, []).append(fut)
        return await fut

    def _emit(self, event: dict[str, Any]) -> None:
        if self.recorder is not None:
            event = {"seq": self.recorder.event(event), **event}
        else:
            self._event_seq += 1
            event = {"seq": self._event_seq, **event}
            self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    async def close(self) -> None:
        """Stop: the agents kill what runs, and nothing of that is recorded. A job that was
        STARTING or RUNNING keeps that state, as after a crash, and the next controller
        retries it without counting the attempt (``restore``): a graceful stop or restart
        never fails a job nor uses up one of its attempts. An attempt whose end was already
        decided (terminated, timed out, its main process exited) ends as decided: the
        agents' closing is its teardown."""
        self.shared.closed = True
        self.attempts.close(self.shared.clock())
        self.launcher.close()
        await self.hosts.close()
        for task in list(self.shared.bg):
            task.cancel()
