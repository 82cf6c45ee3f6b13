"""The controller's core: one asyncio loop that applies decisions through the agents.

It holds the runtime job records (``mnp.jobs``) and the run queue. Where a job
starts comes from ``mnp.sched.decide``, what happens next to it from
``mnp.sched.lifecycle``, what its tasks are sent from the ``Launcher``; the
agents are reached through the ``HostPool``. This module applies those answers:
state changes, spawn/kill/sweep messages, and the reactions to the agents' events.
"""

from __future__ import annotations

import asyncio
import logging
import secrets as pysecrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from mnp import jobref
from mnp.controller.hosts import LOAD_WITHIN, HostPool
from mnp.controller.launch import Launcher, LaunchError
from mnp.errors import InfraError, JobRefused, MnpError
from mnp.jobs import (
    Attempt,
    Job,
    TaskRun,
    exit_status,
    printable,
)
from mnp.model import (
    TERMINAL,
    Dependency,
    Grant,
    Inventory,
    JobDefinition,
    JobState,
    Request,
    Resources,
)
from mnp.sched import lifecycle
from mnp.sched.decide import Start, could_ever_run, decide
from mnp.sched.runqueue import RunQueue
from mnp.transport.base import UNRESPONSIVE, Event, Transport


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

log = logging.getLogger("mnp")

LOST_REASON = "Controller restarted: attempt lost"

TEARDOWN_SLACK = 15.0
"""How long after ``kill_grace`` an ending attempt waits for its agents to confirm the
teardown (their own give-up after SIGKILL is 5 s) before its hosts are given up on."""


@dataclass(frozen=True)
class Restored:
    """A job as a previous controller left it in the store."""

    id: str
    defn: JobDefinition
    seq: int
    state: JobState
    created: float
    parent: str | None = None
    array_index: int | None = None
    attempts: int = 0
    reason: str | None = None


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
        self.on_output = on_output
        self.on_task_start = on_task_start
        self.on_task_end = on_task_end
        self.on_event = on_event
        self.agent_grace = agent_grace
        self.recorder = recorder
        self.teardown_slack = TEARDOWN_SLACK
        self.hosts = HostPool(
            inventory,
            transports,
            self.token,
            on_event=self._on_agent_event_guarded,
            on_lost=self._on_host_lost,
            on_up=lambda _host: self._kick(),
            stale=self._stale_sweep,
            heartbeat=heartbeat,
            connect_fanout=connect_fanout,
        )
        # the pool's, under the names the service and the tests read
        self.agents = self.hosts.agents
        self.capacity = self.hosts.capacity
        self.host_errors = self.hosts.host_errors
        self.jobs: dict[str, Job] = {}
        self._named: dict[str, str] = {}  # name -> id of the newest top-level job held
        self.events: list[dict[str, Any]] = []
        self._seq = 0
        self._event_seq = 0
        self._next_id = 1
        self._runnable: dict[str, Job] = {}
        self._runq = RunQueue()  # their requests, per queue in seq order
        self._tasks: dict[str, tuple[Job, Attempt, TaskRun]] = {}
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        self._waiting_on: dict[str, list[Job]] = {}  # job id → jobs waiting for it to end
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # attempts ending, waiting for their agents: id → (deadline, job, attempt)
        self._ending: dict[int, tuple[float, Job, Attempt]] = {}
        self._ending_timer: asyncio.TimerHandle | None = None
        self._kick_scheduled = False
        # while a scheduling pass runs: its spawns per host, sent as one write per host
        self._batch: dict[str, list[tuple[Event, TaskRun]]] | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.launcher = Launcher(inventory, self.hosts)

    # --- hosts ------------------------------------------------------------

    async def start(self, restored: Sequence[Restored] = ()) -> None:
        """Connect to every host at once (bounded); unreachable ones are retried later.

        ``restored``: the unfinished jobs a previous controller left (``restore``). They
        are taken back once the hosts are connected and before any agent gets its
        ``stale`` sweep, so that no sweep judges their retries (same job ids) left over."""
        try:
            await self.hosts.connect_all()
            if restored:
                self.restore(restored, time.time())
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
        below = self.recorder.ids_below() if self.recorder is not None else self._next_id
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

    def _on_host_lost(self, host: str, reason: str) -> None:
        """The pool lost ``host`` (``reason``: ``Host lost: NAME``...): what ran there
        is gone, and the attempts it belonged to end (and may be retried elsewhere)."""
        if self._closed:
            return
        now = time.time()
        hit: dict[int, tuple[Job, Attempt]] = {}
        for tid, (job, attempt, task) in list(self._tasks.items()):
            if task.host != host or task.gone:
                continue
            task.gone = True
            if not task.exited:
                task.exited_at = now
            self._tasks.pop(tid, None)
            if self.on_task_end is not None:
                self.on_task_end(job, task)
            hit[id(attempt)] = (job, attempt)
        for job, attempt in hit.values():
            if not attempt.ending:
                self._begin_end(job, attempt, JobState.FAILED, reason, now)
            self._maybe_finish(job, attempt, now)
        for job in self.jobs.values():
            att = job.attempt
            if att is not None and host in att.pending_sweeps:
                att.pending_sweeps.discard(host)
                self._maybe_finish(job, att, now)
        self._kick()

    # --- submit -----------------------------------------------------------

    def submit(self, defn: JobDefinition) -> Job:
        if self._closed:
            raise InfraError("controller is shutting down")
        queue = self.inventory.queues.get(defn.queue)
        if queue is None:
            allowed = ", ".join(sorted(self.inventory.queues))
            raise JobRefused(f"queue {defn.queue!r} does not exist; queues: {allowed}")
        if queue.state != "ENABLED":
            raise JobRefused(f"queue {defn.queue!r} is DISABLED and refuses new jobs")
        probe = self._request_for("probe", defn, 0)
        if not could_ever_run(probe, queue, self.inventory.compute_environments, self.capacity):
            if self.host_errors:
                down = "; ".join(f"{h}: {e}" for h, e in sorted(self.host_errors.items()))
                raise InfraError(
                    f"the job needs hosts that are not usable now ({_describe_request(probe)}, "
                    f"{len(self.agents)} of {len(self.inventory.hosts)} hosts usable); {down}"
                )
            raise JobRefused(
                "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT: no compute environment of queue "
                f"{queue.name!r} has hosts that could ever run this job "
                f"({_describe_request(probe)})"
            )
        defn = self._resolve_dependencies(defn)
        now = time.time()
        job_id = self._allocate_id()
        job = self._new_job(job_id, defn, now)
        if defn.array is not None:
            for i in range(defn.array.size):
                child = self._new_job(f"{job_id}:{i}", defn, now, parent=job, index=i)
                job.children.append(child)
        if self.recorder is not None:
            self.recorder.jobs_added([job, *job.children])
        for j in (job, *job.children):
            j.emit_change(j.id, JobState.SUBMITTED, JobState.SUBMITTED, now, None, None)
        job.set_state(JobState.PENDING, now)
        for child in job.children:
            child.set_state(JobState.PENDING, now)
        self._release_if_ready(job, now)
        return job

    def _allocate_id(self) -> str:
        if self.recorder is not None:
            return self.recorder.next_id()
        job_id = str(self._next_id)
        self._next_id += 1
        return job_id

    # --- crash recovery ---------------------------------------------------

    def continue_numbering(self, last_seq: int) -> None:
        """Go on after the highest ``seq`` a previous controller gave out (FIFO order
        and the store's unique key both rely on it)."""
        self._seq = max(self._seq, last_seq)

    def restore(self, items: Sequence[Restored], now: float) -> None:
        """Take back the unfinished jobs a previous controller accepted (SPEC §6 "Crash
        safety"). Their agents killed whatever ran when that controller died, so an
        attempt that was STARTING/RUNNING is lost: it is retried without counting against
        the job's attempts (the infrastructure failed, not the job)."""
        parents: dict[str, Job] = {}
        restored: list[Job] = []
        for it in sorted(items, key=lambda i: i.seq):
            parent = parents.get(it.parent) if it.parent else None
            job = Job(
                it.id,
                it.defn,
                it.seq,
                self._emit,
                it.created,
                state=it.state,
                reason=it.reason,
                parent=parent,
                array_index=it.array_index,
            )
            job.attempts = [Attempt(n + 1, final=JobState.FAILED) for n in range(it.attempts)]
            job.request = self._request_for(it.id, it.defn, it.seq)
            self.jobs[it.id] = job
            if it.parent is None:
                self._hold_name(job)
            self._seq = max(self._seq, it.seq)
            if it.id.isdigit():  # without a recorder, ids go on after the restored ones
                self._next_id = max(self._next_id, int(it.id) + 1)
            if parent is not None:
                parent.children.append(job)
            elif it.defn.array is not None:
                parents[it.id] = job
            restored.append(job)
        for parent in parents.values():
            parent.children.sort(key=lambda c: c.array_index or 0)
            parent.admitted = sum(1 for c in parent.children if c.state is not JobState.PENDING)
            parent.finished = sum(1 for c in parent.children if c.done)
            parent.ready = parent.admitted > 0
        for job in restored:
            if job.state in (JobState.STARTING, JobState.RUNNING):
                job.bonus_attempts += 1
                job.set_state(JobState.RUNNABLE, now, LOST_REASON)
                self._enqueue(job)
            elif job.state is JobState.RUNNABLE:
                self._enqueue(job)
            elif job.state is JobState.SUBMITTED and not job.children:
                job.set_state(JobState.PENDING, now)
        for job in restored:
            if job.state is JobState.PENDING and (job.parent is None or job.parent.ready):
                if job.children and job.ready:
                    self._admit_children(job, now)
                elif not job.children:
                    self._release_if_ready(job, now)
        self._kick()

    # --- dependencies -----------------------------------------------------

    def state_of(self, job_id: str) -> JobState | None:
        """A job's state, or None when no such job exists (held, or stored by the
        recorder: a job that ended before a restart)."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job.state
        stored = self.recorder.stored_job(job_id) if self.recorder is not None else None
        return stored[0] if stored is not None else None

    def _array_size(self, job_id: str) -> int | None:
        job = self.jobs.get(job_id)
        if job is not None:
            return job.defn.array.size if job.is_array and job.defn.array is not None else None
        stored = self.recorder.stored_job(job_id) if self.recorder is not None else None
        return stored[1] if stored is not None else None

    def resolve(self, ref: str) -> str | None:
        """The id of the job ``ref`` refers to, or None (``mnp.jobref``): an id (``42``,
        ``42:7``), or a name (``train``, ``train:7``) for the newest top-level job of
        that name, held or stored. An id comes first."""
        root, suffix = jobref.split(ref)
        if self.state_of(root) is None:
            held = self._named.get(root)
            stored = self.recorder.newest_named(root) if self.recorder is not None else None
            found = [i for i in (held, stored) if i is not None]
            if not found:
                return None
            root = max(found, key=jobref.id_order)
        job_id = root + suffix
        return job_id if self.state_of(job_id) is not None else None

    def _hold_name(self, job: Job) -> None:
        newest = self._named.get(job.defn.name)
        if newest is None or jobref.id_order(job.id) > jobref.id_order(newest):
            self._named[job.defn.name] = job.id

    def _resolve_dependencies(self, defn: JobDefinition) -> JobDefinition:
        """``defn`` with every dependency named by its job id (a name means the newest job
        of that name, now: the stored definition keeps the id). Unknown jobs and
        impossible N_TO_N pairings are refused at submit. A new job can only name jobs
        that already exist, so no cycle can ever form."""
        deps: list[Dependency] = []
        seen: dict[str, str] = {}
        for dep in defn.depends_on:
            job_id = self.resolve(dep.job_id)
            if job_id is None:
                raise JobRefused(f"depends_on: job {dep.job_id} does not exist")
            if job_id in seen:
                raise JobRefused(
                    f"depends_on: {dep.job_id} and {seen[job_id]} are both job {job_id}; "
                    "list each job once"
                )
            seen[job_id] = dep.job_id
            if dep.type == "N_TO_N":
                size = self._array_size(job_id)
                if size is None or defn.array is None or defn.array.size != size:
                    raise JobRefused(
                        f"depends_on: {dep.job_id}:N_TO_N needs two array jobs of the same size"
                    )
            deps.append(Dependency(job_id=job_id, type=dep.type))
        if tuple(deps) == defn.depends_on:
            return defn
        return replace(defn, depends_on=tuple(deps))

    def _release_if_ready(self, job: Job, now: float) -> None:
        """PENDING → RUNNABLE (or, for an array parent, admit its children) once every
        dependency is met; FAILED as soon as one can never be (``lifecycle.release``)."""
        if job.state is not JobState.PENDING:
            return
        step = lifecycle.release(job, self.state_of)
        if isinstance(step, lifecycle.Wait):
            self._waiting_on.setdefault(step.target, []).append(job)
        elif isinstance(step, lifecycle.Fail):
            self._fail_pending(job, step.reason, now)
        elif job.children:
            job.ready = True
            self._admit_children(job, now)
        else:
            self._make_runnable(job, now)

    def _fail_pending(self, job: Job, reason: str, now: float) -> None:
        if job.children:
            job.admitted = len(job.children)
            for child in job.children:
                if not child.done:
                    self._dequeue(child)
                    self._finish(child, JobState.FAILED, reason, now)
            if not job.done:  # no child at all left to end it
                self._finish(job, JobState.FAILED, reason, now)
        else:
            self._dequeue(job)
            self._finish(job, JobState.FAILED, reason, now)

    def _wake(self, job_id: str, now: float) -> None:
        for waiter in self._waiting_on.pop(job_id, []):
            self._release_if_ready(waiter, now)

    def _new_job(
        self,
        job_id: str,
        defn: JobDefinition,
        now: float,
        parent: Job | None = None,
        index: int | None = None,
    ) -> Job:
        self._seq += 1
        job = Job(job_id, defn, self._seq, self._emit, now, parent=parent, array_index=index)
        job.request = self._request_for(job_id, defn, self._seq)
        self.jobs[job_id] = job
        if parent is None:
            self._hold_name(job)
        return job

    def _request_for(self, key: str, defn: JobDefinition, seq: int) -> Request:
        if defn.multinode is not None:
            mn = defn.multinode
            nodes = tuple(mn.group_of(i)[1].resources for i in range(mn.num_nodes))
            return Request(key, defn.queue, seq, nodes, exclusive=mn.exclusive)
        return Request(key, defn.queue, seq, (defn.resources,))

    def _enqueue(self, job: Job) -> None:
        self._runnable[job.id] = job
        if job.request is not None:
            self._runq.add(job.request)

    def _dequeue(self, job: Job) -> None:
        if self._runnable.pop(job.id, None) is not None and job.request is not None:
            self._runq.discard(job.request)

    def _make_runnable(self, job: Job, now: float) -> None:
        job.set_state(JobState.RUNNABLE, now)
        self._enqueue(job)
        self._kick()

    def _admit_children(self, parent: Job, now: float) -> None:
        """Release array children, in index order, as ``lifecycle.room`` allows (one at
        a time: a child that fails at once makes room for the next)."""
        while lifecycle.room(parent) > 0:
            child = parent.children[parent.admitted]
            parent.admitted += 1
            self._release_if_ready(child, now)

    # --- scheduling -------------------------------------------------------

    def _kick(self) -> None:
        if not self._kick_scheduled and not self._closed:
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._schedule_pass)

    def _schedule_pass(self) -> None:
        self._kick_scheduled = False
        if not self._runnable:
            return
        starts = decide(
            self._runq.by_queue(),
            self.inventory.queues,
            self.inventory.compute_environments,
            self.capacity,
        )
        now = time.time()
        batch: dict[str, list[tuple[Event, TaskRun]]] = {}
        self._batch = batch
        try:
            for start in starts:
                job = self._runnable[start.key]
                self._dequeue(job)
                try:
                    self._launch(job, start, now)
                except Exception as e:  # one job's failure never stops the pass
                    self._abort(job, e, start.grants)
        finally:
            self._batch = None
            for host in list(batch):
                self._flush_spawns(host, batch)

    def _flush_spawns(self, host: str, batch: dict[str, list[tuple[Event, TaskRun]]]) -> None:
        """Send the spawns a pass collected for ``host`` in one write (one SSH packet)."""
        items = batch.pop(host, None)
        if not items:
            return
        try:
            self.agents[host].send_many([msg for msg, _ in items])
        except (MnpError, KeyError) as e:
            for _, task in items:
                self._spawn_failed(task, e)

    # --- launching --------------------------------------------------------

    def _launch(self, job: Job, start: Start, now: float) -> None:
        attempt = Attempt(len(job.attempts) + 1, ce=start.ce, grants=start.grants, placed_at=now)
        job.attempts.append(attempt)
        job.exit_code = job.signal = None
        job.set_state(JobState.STARTING, now)
        self._record_attempt(job, attempt)
        if job.is_multinode:
            self._spawn_bg(self._launch_multinode(job, attempt))
            return
        task, argv, env, _ = self.launcher.single(job, attempt, start.grants[0])
        defn = job.defn
        if defn.secrets:  # read off the loop first; the task starts once they are here
            self._spawn_bg(self._launch_with_secrets(job, attempt, task, argv, env))
            return
        self._spawn(job, attempt, task, argv, env)

    async def _launch_with_secrets(
        self, job: Job, attempt: Attempt, task: TaskRun, argv: list[str], env: dict[str, str]
    ) -> None:
        try:
            attempt.secrets = await self.launcher.secrets(job.defn)
            if attempt.ending or job.attempt is not attempt:
                return  # terminated while the secrets were read
            self._spawn(job, attempt, task, argv, env)
        except Exception as e:
            self._abort(job, e)

    def _spawn(
        self,
        job: Job,
        attempt: Attempt,
        task: TaskRun,
        argv: list[str],
        env: dict[str, str],
        files: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Start a task; False when it cannot start, and its attempt is ending."""
        if self.on_task_start is not None:
            why = self.on_task_start(job, task)
            if why is not None:
                self._begin_end(job, attempt, JobState.FAILED, why, time.time())
                return False
        env.update(attempt.secrets)
        msg: dict[str, Any] = {
            "op": "spawn",
            "tid": task.tid,
            "argv": argv,
            "env": env,
            "cwd": job.defn.cwd,
        }
        if job.defn.python_env not in (None, "none"):
            msg["pyenv"] = job.defn.python_env
        if files:
            msg["files"] = files
        # registered only now: nothing above may leave a task that was never sent
        attempt.tasks[task.tid] = task
        self._tasks[task.tid] = (job, attempt, task)
        if self._batch is not None and task.host in self.agents:
            self._batch.setdefault(task.host, []).append((msg, task))
            return True
        try:
            self.agents[task.host].send(msg)
        except (MnpError, KeyError) as e:
            self._spawn_failed(task, e)
            return False
        return True

    def _spawn_failed(self, task: TaskRun, e: Exception) -> None:
        self._on_agent_event(
            task.host,
            {"ev": "exited", "tid": task.tid, "code": 126, "signal": None, "error": str(e)},
        )
        self._on_agent_event(task.host, {"ev": "gone", "tid": task.tid, "killed": 0})

    async def host_loads(self, within: float = LOAD_WITHIN) -> dict[str, Event]:
        """Each connected host's load now (``HostPool.host_loads``)."""
        return await self.hosts.host_loads(within)

    async def _launch_multinode(self, job: Job, attempt: Attempt) -> None:
        try:
            await self._launch_nodes(job, attempt)
        except Exception as e:  # fails this job only
            self._abort(job, e)

    async def _launch_nodes(self, job: Job, attempt: Attempt) -> None:
        """The main node first (SPEC §6); the others once it runs (``_on_main_running``)."""
        if not await self.launcher.nodes(job, attempt):
            return
        mn = job.defn.multinode
        assert mn is not None
        self._start_node(job, attempt, mn.main_node)
        if attempt.nodes[mn.main_node].held:
            self._on_main_running(job, attempt, time.time())

    def _start_node(self, job: Job, attempt: Attempt, index: int) -> None:
        node = attempt.nodes[index]
        if node.held:
            node.set_state(JobState.RUNNING, time.time())
            return
        for task, argv, env, files in self.launcher.node(job, attempt, node):
            node.tasks.append(task)
            if not self._spawn(job, attempt, task, argv, env, files):
                return

    def _on_main_running(self, job: Job, attempt: Attempt, now: float) -> None:
        mn = job.defn.multinode
        assert mn is not None and attempt.launch is not None
        job.set_state(JobState.RUNNING, now)
        self._arm_timeout(job, attempt)
        for node in attempt.nodes:
            if attempt.ending:
                return
            if node.index != mn.main_node:
                self._start_node(job, attempt, node.index)
        self._check_all_running(attempt, now)

    def _check_all_running(self, attempt: Attempt, now: float) -> None:
        if attempt.running_at is None and all(
            n.state is not JobState.STARTING for n in attempt.nodes
        ):
            attempt.running_at = now
            job = attempt.nodes[0].job if attempt.nodes else None
            if job is not None:
                self._record_attempt(job, attempt)

    def _record_attempt(self, job: Job, attempt: Attempt) -> None:
        if self.recorder is not None:
            self.recorder.attempt(job, attempt)

    # --- one job's failure stays that job's -------------------------------

    def _abort(
        self,
        job: Job,
        error: Exception,
        grants: Sequence[Grant] = (),
        what: str = "Launch failed",
    ) -> None:
        """Handling ``job`` raised ``error``: the job fails with it as its reason (no
        retry), what it holds is given back, and the controller goes on. ``grants``:
        those taken for a launch that failed before its attempt held them."""
        if isinstance(error, LaunchError | MnpError):
            reason = str(error)
        else:
            log.error("job %s: %s", job.id, what.lower(), exc_info=error)
            reason = f"{what}: {type(error).__name__}: {error}"
        now = time.time()
        attempt = job.attempt
        if grants and (attempt is None or attempt.grants is not grants):
            for grant in grants:  # the launch failed before an attempt held them
                cap = self.capacity.get(grant.host)
                if cap is not None:
                    cap.give(grant)
            attempt = None
        try:
            if attempt is not None and attempt.stopped_at is None:
                self._begin_end(job, attempt, JobState.FAILED, reason, now, retry=False)
                self._maybe_finish(job, attempt, now)  # if it was ending already
            elif not job.done:
                self._dequeue(job)
                self._finish(job, JobState.FAILED, reason, now)
        except Exception:  # its ending failed too: end it by force
            log.exception("job %s: ending it after a failed launch failed", job.id)
            self._force_end(job, attempt, reason, now)
        self._kick()

    def _force_end(self, job: Job, attempt: Attempt | None, reason: str, now: float) -> None:
        if attempt is not None and attempt.stopped_at is None:
            attempt.stopped_at = now
            attempt.secrets = {}
            for task in attempt.tasks.values():
                self._tasks.pop(task.tid, None)
            for grant in attempt.grants:
                cap = self.capacity.get(grant.host)
                if cap is not None:
                    cap.give(grant)
        if not job.done:
            try:
                self._finish(job, JobState.FAILED, reason, now)
            except Exception:
                log.exception("job %s: cannot be ended", job.id)

    def _on_agent_event_guarded(self, host: str, msg: Event) -> None:
        """``_on_agent_event``, where a failure ends the job the event is about (if
        any) instead of the host's reader."""
        try:
            self._on_agent_event(host, msg)
        except Exception as e:
            tid = msg.get("tid") if isinstance(msg.get("tid"), str) else None
            entry = self._tasks.get(tid) if tid else None
            job = entry[0] if entry is not None else self.jobs.get(str(msg.get("job", "")))
            if job is not None and not job.done:
                self._abort(job, e, what="Controller error")
            else:
                log.exception("%s: handling %.40r failed", host, msg.get("ev"))

    # --- agent events -----------------------------------------------------

    def _on_agent_event(self, host: str, msg: Event) -> None:
        if self._closed:
            return  # what the agents report while they stop is not the jobs' doing
        ev = msg.get("ev")
        if ev == "out":
            entry = self._tasks.get(msg.get("tid", ""))
            if entry is not None and self.on_output is not None:
                self.on_output(entry[0], entry[2], int(msg.get("fd", 1)), str(msg.get("data", "")))
            return
        now = time.time()
        if ev == "started":
            entry = self._tasks.get(msg.get("tid", ""))
            if entry is not None:
                self._task_started(*entry, msg, now)
        elif ev == "exited":
            entry = self._tasks.get(msg.get("tid", ""))
            if entry is not None:
                self._task_exited(*entry, msg, now)
        elif ev == "gone":
            entry = self._tasks.pop(msg.get("tid", ""), None)
            if entry is not None:
                job, attempt, task = entry
                task.gone = True
                if not task.exited:
                    task.exited_at = now
                if self.on_task_end is not None:
                    self.on_task_end(job, task)
                self._maybe_finish(job, attempt, now)
        elif ev == "swept":
            job_obj = self.jobs.get(str(msg.get("job", "")))
            if job_obj is not None and job_obj.attempt is not None:
                job_obj.attempt.pending_sweeps.discard(host)
                self._maybe_finish(job_obj, job_obj.attempt, now)
        elif ev == "error" and msg.get("tid"):
            # a refused spawn (malformed, duplicate tid): it never started and never will
            entry = self._tasks.get(str(msg["tid"]))
            if entry is not None and entry[2].started_at is None and not entry[2].exited:
                why = f"agent refused the task: {msg.get('msg')}"
                self._on_agent_event(
                    host, {"ev": "exited", "tid": msg["tid"], "code": 126, "error": why}
                )
                self._on_agent_event(host, {"ev": "gone", "tid": msg["tid"], "killed": 0})

    def _task_started(
        self, job: Job, attempt: Attempt, task: TaskRun, msg: Event, now: float
    ) -> None:
        task.pid = msg.get("pid")
        task.started_at = now
        if attempt.ending:
            return
        if not job.is_multinode:
            attempt.running_at = now
            job.set_state(JobState.RUNNING, now)
            self._record_attempt(job, attempt)
            self._arm_timeout(job, attempt)
            return
        node = attempt.nodes[task.node_index or 0]
        if all(t.started_at is not None for t in node.tasks):
            node.set_state(JobState.RUNNING, now)
            mn = job.defn.multinode
            assert mn is not None
            if node.index == mn.main_node:
                self._on_main_running(job, attempt, now)
            else:
                self._check_all_running(attempt, now)

    def _task_exited(
        self, job: Job, attempt: Attempt, task: TaskRun, msg: Event, now: float
    ) -> None:
        task.exited_at = now
        task.exit_code = msg.get("code")
        task.signal = msg.get("signal")
        task.error = msg.get("error")
        task.usage = msg.get("usage")  # issue 14 hook: what the task used (PROTOCOL.md)
        if task.error and self.on_output is not None:
            self.on_output(job, task, 2, f"mnp: {task.tid}: {task.error}\n")
        if not job.is_multinode:
            attempt.main_exit_at = now
            end = lifecycle.task_ended(job, attempt, task)
            if end is not None:
                attempt.exit_code, attempt.signal = task.exit_code, task.signal
                self._begin_end(job, attempt, end.final, end.reason, now)
            return
        node = attempt.nodes[task.node_index or 0]
        if not all(t.exited for t in node.tasks):
            return
        node.exit_code, node.signal, failed = lifecycle.node_result(node)
        code = exit_status(node.exit_code, node.signal)
        if attempt.ending:
            # torn down by us: the node ends as the job does
            node.set_state(attempt.final or JobState.FAILED, now, attempt.reason)
            return
        node.set_state(
            JobState.SUCCEEDED if code == 0 else JobState.FAILED,
            now,
            failed.error if failed else None,
        )
        end = lifecycle.task_ended(job, attempt, task)
        if end is not None:
            attempt.main_exit_at = now
            attempt.exit_code, attempt.signal = node.exit_code, node.signal
            self._begin_end(job, attempt, end.final, end.reason, now)

    # --- ending -----------------------------------------------------------

    def _arm_timeout(self, job: Job, attempt: Attempt) -> None:
        limit = lifecycle.time_limit(job)
        if limit is None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.pop(job.id, None)
            end = lifecycle.timed_out(job, attempt)
            if end is not None:
                job.timed_out = True
                self._begin_end(job, attempt, end.final, end.reason, time.time(), retry=end.retry)

        self._timers[job.id] = loop.call_later(limit, fire)

    def _begin_end(
        self,
        job: Job,
        attempt: Attempt,
        final: JobState,
        reason: str | None,
        now: float,
        *,
        retry: bool = True,
    ) -> None:
        """Decide how the attempt ends, then tear down whatever still runs."""
        if attempt.ending:
            return
        attempt.final = final
        attempt.reason = reason = printable(reason)
        attempt.retryable = retry
        timer = self._timers.pop(job.id, None)
        if timer is not None:
            timer.cancel()
        grace = job.defn.timeout.kill_grace
        if job.is_multinode:
            for node in attempt.nodes:
                if node.held and node.state not in TERMINAL:
                    node.set_state(final, now, reason)
            # a sweep ends the agent's own tasks of the job too (each still reports
            # `exited` and `gone`): one teardown and one /proc scan per host, no `kill`s
            for host in {g.host for g in attempt.grants}:
                if self._send(host, {"op": "sweep", "job": job.id, "grace": grace}):
                    attempt.pending_sweeps.add(host)
        for task in attempt.tasks.values():
            if task.gone or task.exited:  # an exited task's agent cleans up itself
                continue
            if task.host not in attempt.pending_sweeps:
                self._send(task.host, {"op": "kill", "tid": task.tid, "grace": grace})
        self._maybe_finish(job, attempt, now)
        if attempt.stopped_at is None and not self._closed:
            # the attempt ends whatever its agents do: a host whose agent has not
            # confirmed the teardown by then is given up on, as a lost host is
            deadline = time.monotonic() + grace + self.teardown_slack
            self._ending[id(attempt)] = (deadline, job, attempt)
            if self._ending_timer is None:
                self._ending_timer = asyncio.get_running_loop().call_later(1.0, self._check_ending)

    def _check_ending(self) -> None:
        """Once a second while attempts are ending: give up on the hosts of those whose
        teardown is overdue."""
        self._ending_timer = None
        now = time.monotonic()
        for key, (deadline, job, attempt) in list(self._ending.items()):
            if attempt.stopped_at is not None:
                self._ending.pop(key, None)
            elif deadline <= now:
                self._ending.pop(key, None)
                self._teardown_overdue(job, attempt)
        if self._ending and not self._closed:
            self._ending_timer = asyncio.get_running_loop().call_later(1.0, self._check_ending)

    def _teardown_overdue(self, job: Job, attempt: Attempt) -> None:
        hosts = {t.host for t in attempt.tasks.values() if not t.gone} | attempt.pending_sweeps
        limit = job.defn.timeout.kill_grace + self.teardown_slack
        now = time.time()
        for host in sorted(hosts):
            conn = self.agents.get(host)
            if conn is not None and conn.alive:
                conn.abandon(
                    f"{UNRESPONSIVE} (the teardown of job {job.id} was not confirmed "
                    f"within {limit:g}s)"
                )
                continue
            # no connection left to wait on (host loss ends its tasks; this is a backstop)
            attempt.pending_sweeps.discard(host)
            for task in attempt.tasks.values():
                if task.host == host and not task.gone:
                    task.gone = True
                    self._tasks.pop(task.tid, None)
                    if self.on_task_end is not None:
                        self.on_task_end(job, task)
        self._maybe_finish(job, attempt, now)

    def _send(self, host: str, msg: Event) -> bool:
        if self._batch is not None and host in self._batch:
            self._flush_spawns(host, self._batch)  # keep the host's messages in order
        return self.hosts.send(host, msg)

    def _maybe_finish(self, job: Job, attempt: Attempt, now: float) -> None:
        if not attempt.ending or attempt.stopped_at is not None:
            return
        if attempt.pending_sweeps or any(not t.gone for t in attempt.tasks.values()):
            return
        attempt.reaped_at = now
        attempt.stopped_at = now
        self._ending.pop(id(attempt), None)
        attempt.secrets = {}
        for grant in attempt.grants:
            cap = self.capacity.get(grant.host)
            if cap is not None:
                cap.give(grant)
        for node in attempt.nodes:
            if node.state not in TERMINAL:
                node.set_state(attempt.final or JobState.FAILED, now, attempt.reason)
        job.exit_code, job.signal = attempt.exit_code, attempt.signal
        self._record_attempt(job, attempt)
        step = lifecycle.after_attempt(job, attempt)
        if isinstance(step, lifecycle.Retry):
            job.set_state(JobState.RUNNABLE, now, step.reason)
            self._enqueue(job)
        else:
            self._finish(job, step.state, step.reason, now)
        self._kick()

    def _finish(self, job: Job, state: JobState, reason: str | None, now: float) -> None:
        job.set_state(state, now, lifecycle.final_reason(reason, job.note))
        for fut in self._waiters.pop(job.id, []):
            if not fut.done():
                fut.set_result(job)
        if job.id in self._waiting_on:
            self._wake(job.id, now)
        parent = job.parent
        if parent is None or parent.done:
            return
        parent.finished += 1
        doomed = lifecycle.never_run(parent, state)
        if doomed is not None:
            # the rest can never run: fail them here, without recursing per child
            why = f"Dependent job {job.id} failed"
            for sib in doomed:
                sib.set_state(JobState.FAILED, now, why)
                parent.finished += 1
                if sib.id in self._waiting_on:
                    self._wake(sib.id, now)
            parent.admitted = len(parent.children)
        self._admit_children(parent, now)
        outcome = lifecycle.array_outcome(parent)
        if outcome is not None:
            parent.exit_code = lifecycle.array_exit_code(parent)
            self._finish(parent, outcome.state, outcome.reason, now)

    def cancel(self, job_id: str, reason: str) -> Job:
        """SUBMITTED/PENDING/RUNNABLE → FAILED; what already runs goes on (AWS Batch).
        ``job_id`` may be a name (:meth:`resolve`)."""
        job = self.jobs.get(self.resolve(job_id) or job_id)
        if job is None:
            raise JobRefused(f"job {job_id} does not exist")
        now = time.time()
        if job.children:
            job.admitted = len(job.children)  # admit no more children
        for j in lifecycle.cancelled(job):
            if not j.done:
                self._dequeue(j)
                self._finish(j, JobState.FAILED, reason, now)
        return job

    def terminate(self, job_id: str, reason: str) -> Job:
        """Like cancel, and STARTING/RUNNING ones are ended. ``job_id`` may be a name."""
        job = self.jobs.get(self.resolve(job_id) or job_id)
        if job is None:
            raise JobRefused(f"job {job_id} does not exist")
        now = time.time()
        job.admitted = len(job.children)  # admit no more children while cascading
        for j, running in lifecycle.terminated(job):
            if j.done:
                continue
            attempt = j.attempt
            if running and attempt is not None:
                self._begin_end(j, attempt, JobState.FAILED, reason, now, retry=False)
            else:
                self._dequeue(j)
                self._finish(j, JobState.FAILED, reason, now)
        return job

    def note(self, job: Job, text: str) -> None:
        """Add ``text`` to the job's final reason (after the reason itself, if any): for
        what went wrong beside the job, such as its output lost. The first note is kept."""
        if job.note is None:
            job.note = text

    def withdraw(self, job: Job) -> None:
        """Forget a job that was just submitted, as if it never had been: its acceptance
        could not be recorded. Only a job that has not been placed yet can go."""
        for j in (job, *job.children):
            if j.attempts:
                raise ValueError(f"job {j.id} has started; it cannot be withdrawn")
        for j in (*job.children, job):
            self._dequeue(j)
            self.jobs.pop(j.id, None)
        name = job.defn.name
        if self._named.get(name) == job.id:
            del self._named[name]
            for other in self.jobs.values():
                if other.parent is None and other.defn.name == name:
                    self._hold_name(other)
        gone = {job.id, *(c.id for c in job.children)}
        for target, waiting in list(self._waiting_on.items()):
            kept = [w for w in waiting if w.id not in gone]
            if kept:
                self._waiting_on[target] = kept
            else:
                del self._waiting_on[target]

    def forget(self, job_ids: Sequence[str]) -> None:
        """Drop finished top-level jobs (and their children) from memory: they were
        purged from the store. A new job can no longer name them as a dependency.
        Unfinished ones are kept (the store never purges them)."""
        for job_id in job_ids:
            job = self.jobs.get(job_id)
            if job is None or not job.done or any(not c.done for c in job.children):
                continue
            for j in (*job.children, job):
                self.jobs.pop(j.id, None)
                self._waiting_on.pop(j.id, None)

    # --- waiting and closing ----------------------------------------------

    async def wait(self, job: Job) -> Job:
        if job.done:
            return job
        fut: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job.id, []).append(fut)
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

    def _spawn_bg(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def close(self) -> None:
        """Stop: the agents kill what runs, and nothing of that is recorded. A job that was
        STARTING or RUNNING keeps that state, as after a crash, and the next controller
        retries it without counting the attempt (``restore``): a graceful stop or restart
        never fails a job nor uses up one of its attempts. An attempt whose end was already
        decided (terminated, timed out, its main process exited) ends as decided: the
        agents' closing is its teardown."""
        self._closed = True
        now = time.time()
        for job in list(self.jobs.values()):
            attempt = job.attempt
            if attempt is not None and attempt.ending and attempt.stopped_at is None:
                attempt.pending_sweeps.clear()
                for t in attempt.tasks.values():
                    t.gone = True
                self._maybe_finish(job, attempt, now)
        self.launcher.close()
        for timer in self._timers.values():
            timer.cancel()
        if self._ending_timer is not None:
            self._ending_timer.cancel()
        await self.hosts.close()
        for task in list(self._bg):
            task.cancel()


def _describe_request(req: Request) -> str:
    r: Resources = max(req.nodes, key=lambda x: (x.gpus, x.vcpus, x.memory))
    parts = [f"{len(req.nodes)} node(s)" if len(req.nodes) > 1 else "1 task"]
    parts.append(f"vcpus={r.vcpus:g}")
    if r.memory:
        parts.append(f"memory={r.memory // (1024 * 1024)}MiB")
    if r.gpus:
        parts.append(f"gpus={r.gpus}")
    if req.exclusive:
        parts.append("exclusive")
    return ", ".join(parts)
