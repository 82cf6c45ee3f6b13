"""The controller: one asyncio loop that applies scheduling decisions through agents.

It holds one ``AgentConnection`` per inventory host, the runtime job records
(``mnp.jobs``) and each host's free capacity (``mnp.sched.alloc``). Pure
decisions come from ``mnp.sched.decide`` and ``mnp.wiring``; this module only
sends spawn/kill/sweep messages and reacts to the agents' events.
"""

from __future__ import annotations

import asyncio
import os
import secrets as pysecrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from mnp.errors import InfraError, JobRefused, MnpError
from mnp.files import read_regular
from mnp.jobs import Attempt, Job, NodeRun, TaskRun, exit_status, should_retry
from mnp.model import TERMINAL, Inventory, JobDefinition, JobState, Resources
from mnp.sched.alloc import HostCapacity
from mnp.sched.decide import Request, Start, could_ever_run, decide
from mnp.sched.runqueue import RunQueue
from mnp.transport.base import AgentConnection, Event, Transport
from mnp.wiring import (
    Launch,
    NodePlacement,
    hostfile_mpich,
    hostfile_ompi,
    node_command,
    substitute,
    task_environment,
    task_id,
)


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


OutputHandler = Callable[[Job, TaskRun, int, str], None]
TaskStartHandler = Callable[[Job, TaskRun], str | None]
"""Called before a task is spawned; a string is why it cannot start (its attempt fails)."""
TaskEndHandler = Callable[[Job, TaskRun], None]
EventSink = Callable[[dict[str, Any]], None]

TIMEOUT_REASON = "Job attempt duration exceeded timeout"
MAX_SECRET_BYTES = 1 << 20
LOST_REASON = "Controller restarted: attempt lost"


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
    ) -> None:
        self.inventory = inventory
        self.transports = transports
        self.token = token or pysecrets.token_hex(8)
        self.on_output = on_output
        self.on_task_start = on_task_start
        self.on_task_end = on_task_end
        self.on_event = on_event
        self.agent_grace = agent_grace
        self.connect_fanout = connect_fanout
        self.recorder = recorder
        self.agents: dict[str, AgentConnection] = {}
        self.capacity: dict[str, HostCapacity] = {}
        self.host_errors: dict[str, str] = {}
        self.jobs: dict[str, Job] = {}
        self.events: list[dict[str, Any]] = []
        self._seq = 0
        self._event_seq = 0
        self._next_id = 1
        self._runnable: dict[str, Job] = {}
        self._runq = RunQueue()  # their requests, per queue in seq order
        self._tasks: dict[str, tuple[Job, Attempt, TaskRun]] = {}
        self._waiters: dict[str, list[asyncio.Future[Job]]] = {}
        self._pending_ports: dict[str, asyncio.Future[int]] = {}
        self._waiting_on: dict[str, list[Job]] = {}  # job id → jobs waiting for it to end
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._kick_scheduled = False
        # while a scheduling pass runs: its spawns per host, sent as one write per host
        self._batch: dict[str, list[tuple[Event, TaskRun]]] | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._closed = False

    # --- hosts ------------------------------------------------------------

    async def start(self) -> None:
        """Connect to every host at once (bounded); unreachable ones are retried later."""
        sem = asyncio.Semaphore(self.connect_fanout)

        async def one(name: str) -> None:
            async with sem:
                await self._connect(name)

        await asyncio.gather(*(one(h.name) for h in self.inventory.hosts))
        if not self.agents:
            details = "; ".join(self.host_errors.values()) or "the inventory has no hosts"
            raise InfraError(f"no host reachable: {details}")
        for h in self.inventory.hosts:
            if h.name not in self.agents:
                self._spawn_bg(self._reconnect(h.name))

    async def _connect(self, name: str) -> bool:
        host = self.inventory.host(name)
        transport = self.transports[host.transport]
        try:
            stream = await transport.open(host, ["--ctl", self.token])
            conn = AgentConnection(host.name, stream)
            facts = await conn.handshake(host.ssh.connect_timeout + 20)
        except MnpError as e:
            self.host_errors[host.name] = str(e)
            return False
        if self._closed:
            await conn.close()
            return False
        conn.start(self._on_agent_event, self._on_host_lost)
        try:
            conn.send(self._stale_sweep())
        except MnpError:
            pass  # the connection died already; the reader reports it
        self.agents[host.name] = conn
        self.host_errors.pop(host.name, None)
        gpus = tuple(int(g["index"]) for g in facts.get("gpus", []))
        if host.gpus is not None:
            gpus = tuple(range(host.gpus))
        old = self.capacity.get(host.name)
        if old is not None and old.tasks:
            old.up = True  # grants from before the loss are returned as their attempts end
        else:
            self.capacity[host.name] = HostCapacity(
                name=host.name,
                vcpus=float(host.vcpus if host.vcpus is not None else facts.get("cores", 1)),
                memory=int(host.memory if host.memory is not None else facts.get("memory", 0)),
                gpus=gpus,
            )
        self._kick()
        return True

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

    async def _reconnect(self, name: str) -> None:
        """Try again with exponential backoff (0.5 s doubling to 30 s) until the host is back."""
        delay = 0.5
        while not self._closed:
            await asyncio.sleep(delay)
            if self._closed or await self._connect(name):
                return
            delay = min(delay * 2, 30.0)

    def _on_host_lost(self, host: str, why: str) -> None:
        now = time.time()
        self.host_errors[host] = why
        cap = self.capacity.get(host)
        if cap is not None:
            cap.up = False
        lost = self.agents.pop(host, None)
        if lost is not None:
            self._spawn_bg(lost.close())
        if not self._closed:
            self._spawn_bg(self._reconnect(host))
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
                self._begin_end(job, attempt, JobState.FAILED, f"Host lost: {host}", now)
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
        self._check_dependencies(defn)
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
            self._seq = max(self._seq, it.seq)
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
        """A job's state, or None when no such job exists."""
        job = self.jobs.get(job_id)
        return job.state if job is not None else None

    def _check_dependencies(self, defn: JobDefinition) -> None:
        """Unknown ids and impossible N_TO_N pairings are refused at submit. A new job can
        only name jobs that already exist, so no cycle can ever form."""
        for dep in defn.depends_on:
            target = self.jobs.get(dep.job_id)
            if target is None and self.state_of(dep.job_id) is None:
                raise JobRefused(f"depends_on: job {dep.job_id} does not exist")
            if dep.type == "N_TO_N":
                size = (
                    target.defn.array.size
                    if target is not None and target.is_array and target.defn.array is not None
                    else None
                )
                if size is None or defn.array is None or defn.array.size != size:
                    raise JobRefused(
                        f"depends_on: {dep.job_id}:N_TO_N needs two array jobs of the same size"
                    )

    def _dependency_targets(self, job: Job) -> list[tuple[str, bool]]:
        """(job id, any end will do) pairs: the parent (or a plain job) waits on its own
        dependencies; array children on the matching child of N_TO_N ones."""
        if job.parent is not None:
            return [
                (f"{d.job_id}:{job.array_index}", False)
                for d in job.defn.depends_on
                if d.type == "N_TO_N"
            ]
        return [(d.job_id, d.type == "afterany") for d in job.defn.depends_on if d.type != "N_TO_N"]

    def _release_if_ready(self, job: Job, now: float) -> None:
        """PENDING → RUNNABLE (or, for an array parent, admit its children) once every
        dependency is met; FAILED as soon as one can never be."""
        if job.state is not JobState.PENDING:
            return
        for target, any_end in self._dependency_targets(job):
            state = self.state_of(target)
            if state is None:
                continue  # purged: it ended long ago
            if state is JobState.FAILED and not any_end:
                self._fail_pending(job, f"Dependent job {target} failed", now)
                return
            if state not in TERMINAL:
                self._waiting_on.setdefault(target, []).append(job)
                return
        if job.children:
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
        """Move array children from PENDING to RUNNABLE, in index order, as
        ``parallelism`` (or SEQUENTIAL: one at a time) allows."""
        arr = parent.defn.array
        assert arr is not None
        if not parent.ready:
            return
        limit = 1 if arr.sequential else (arr.parallelism or len(parent.children))
        while parent.admitted < len(parent.children) and parent.admitted - parent.finished < limit:
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
                self._launch(job, start, now)
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
        grant = start.grants[0]
        defn = job.defn
        parent = job.parent
        launch = Launch(
            job_id=job.id,
            job_name=defn.name,
            attempt=attempt.number,
            queue=defn.queue,
            ce=start.ce,
            array_index=job.array_index,
            array_size=defn.array.size if defn.array is not None and parent is not None else None,
            host=grant.host,
            gpus=grant.gpus,
            host_has_gpus=bool(self.capacity[grant.host].gpus),
        )
        attempt.launch = launch
        env = task_environment(defn, launch)
        argv = substitute(defn.command, defn.parameters)
        task = TaskRun(launch.job_id, grant.host)
        self._spawn(job, attempt, task, argv, env)

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
        try:
            secret_env = self._secrets(job.defn)
        except JobRefused as e:  # a secret cannot be read now: the attempt fails, says why
            self._begin_end(job, attempt, JobState.FAILED, str(e), time.time())
            return False
        attempt.tasks[task.tid] = task
        self._tasks[task.tid] = (job, attempt, task)
        env.update(secret_env)
        msg: dict[str, Any] = {
            "op": "spawn",
            "tid": task.tid,
            "argv": argv,
            "env": env,
            "cwd": job.defn.cwd,
        }
        if files:
            msg["files"] = files
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

    def _secrets(self, defn: JobDefinition) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, ref in defn.secrets.items():
            if ref.file is not None:
                try:
                    raw = read_regular(os.path.expanduser(ref.file), MAX_SECRET_BYTES)
                except OSError as e:
                    raise JobRefused(
                        f"secret {name}: cannot read {ref.file}: {e.strerror}"
                    ) from None
                if len(raw) > MAX_SECRET_BYTES:
                    raise JobRefused(f"secret {name}: {ref.file} is larger than 1 MiB")
                try:
                    out[name] = raw.decode("utf-8").rstrip("\n")
                except UnicodeDecodeError:
                    raise JobRefused(f"secret {name}: {ref.file} is not UTF-8 text") from None
            elif ref.env is not None:
                if ref.env not in os.environ:
                    raise JobRefused(f"secret {name}: ${ref.env} is not set for the controller")
                out[name] = os.environ[ref.env]
        return out

    async def _free_port(self, host: str) -> int | None:
        conn = self.agents.get(host)
        if conn is None or not conn.alive:
            return None
        rid = pysecrets.token_hex(4)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending_ports[rid] = fut
        try:
            conn.send({"op": "port", "id": rid})
            return await asyncio.wait_for(fut, 10)
        except (TimeoutError, MnpError):
            return None
        finally:
            self._pending_ports.pop(rid, None)

    async def _launch_multinode(self, job: Job, attempt: Attempt) -> None:
        defn = job.defn
        mn = defn.multinode
        assert mn is not None
        main_host = attempt.grants[mn.main_node].host
        port = await self._free_port(main_host)
        if attempt.ending or job.attempt is not attempt:
            return
        placements = []
        for i, grant in enumerate(attempt.grants):
            gi, group = mn.group_of(i)
            spec = self.inventory.host(grant.host)
            placements.append(
                NodePlacement(
                    index=i,
                    host=grant.host,
                    address=spec.address,
                    slots=group.tasks_per_node,
                    group=gi,
                    gpus=grant.gpus,
                    host_has_gpus=bool(self.capacity[grant.host].gpus),
                )
            )
        launch = Launch(
            job_id=job.id,
            job_name=defn.name,
            attempt=attempt.number,
            queue=defn.queue,
            ce=attempt.ce,
            nodes=tuple(placements),
            main_node=mn.main_node,
            master_port=port,
        )
        attempt.launch = launch
        for p in placements:
            group = mn.groups[p.group]
            held = node_command(defn, group, p.index) is None
            attempt.nodes.append(NodeRun(job, p.index, p.host, p.group, held))
        hostfiles = (hostfile_mpich(placements), hostfile_ompi(placements))
        self._start_node(job, attempt, mn.main_node, hostfiles)
        if attempt.nodes[mn.main_node].held:
            self._on_main_running(job, attempt, time.time())

    def _start_node(
        self, job: Job, attempt: Attempt, index: int, hostfiles: tuple[str, str]
    ) -> None:
        defn = job.defn
        mn = defn.multinode
        assert mn is not None and attempt.launch is not None
        node = attempt.nodes[index]
        now = time.time()
        if node.held:
            node.set_state(JobState.RUNNING, now)
            return
        group = mn.groups[node.group]
        argv = node_command(defn, group, index)
        assert argv is not None
        rundir = str(self.agents[node.host].facts.get("rundir") or "/tmp")
        base = f"{rundir}/{job.id}.{attempt.number}"
        launch = replace(
            attempt.launch, hostfile=f"{base}/hostfile", hostfile_ompi=f"{base}/hostfile.ompi"
        )
        files = [
            {"path": launch.hostfile, "data": hostfiles[0]},
            {"path": launch.hostfile_ompi, "data": hostfiles[1]},
        ]
        for t in range(group.tasks_per_node):
            env = task_environment(defn, launch, index, t)
            tid = task_id(launch, index, t, group.tasks_per_node)
            task = TaskRun(tid, node.host, node_index=index, task_index=t)
            node.tasks.append(task)
            if not self._spawn(job, attempt, task, list(argv), env, files if t == 0 else None):
                return

    def _on_main_running(self, job: Job, attempt: Attempt, now: float) -> None:
        mn = job.defn.multinode
        assert mn is not None and attempt.launch is not None
        job.set_state(JobState.RUNNING, now)
        self._arm_timeout(job, attempt)
        hostfiles = (hostfile_mpich(attempt.launch.nodes), hostfile_ompi(attempt.launch.nodes))
        for node in attempt.nodes:
            if attempt.ending:
                return
            if node.index != mn.main_node:
                self._start_node(job, attempt, node.index, hostfiles)
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

    # --- agent events -----------------------------------------------------

    def _on_agent_event(self, host: str, msg: Event) -> None:
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
        elif ev == "port":
            fut = self._pending_ports.get(str(msg.get("id")))
            if fut is not None and not fut.done():
                fut.set_result(int(msg["port"]))

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
        if task.error and self.on_output is not None:
            self.on_output(job, task, 2, f"mnp: {task.tid}: {task.error}\n")
        if not job.is_multinode:
            attempt.main_exit_at = now
            if not attempt.ending:
                attempt.exit_code, attempt.signal = task.exit_code, task.signal
                ok = task.exit_code == 0
                self._begin_end(
                    job, attempt, JobState.SUCCEEDED if ok else JobState.FAILED, task.error, now
                )
            return
        mn = job.defn.multinode
        assert mn is not None
        node = attempt.nodes[task.node_index or 0]
        if not all(t.exited for t in node.tasks):
            return
        failed = next((t for t in node.tasks if t.exit_code != 0), None)
        node.exit_code = failed.exit_code if failed else 0
        node.signal = failed.signal if failed else None
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
        if node.index == mn.main_node:
            attempt.main_exit_at = now
            attempt.exit_code, attempt.signal = node.exit_code, node.signal
            self._begin_end(
                job, attempt, JobState.SUCCEEDED if code == 0 else JobState.FAILED, None, now
            )
        elif code != 0 and mn.on_child_failure == "terminate":
            attempt.main_exit_at = now
            attempt.exit_code, attempt.signal = node.exit_code, node.signal
            self._begin_end(
                job,
                attempt,
                JobState.FAILED,
                f"Child node {node.index} exited with code {code}",
                now,
            )

    # --- ending -----------------------------------------------------------

    def _arm_timeout(self, job: Job, attempt: Attempt) -> None:
        limit = job.defn.timeout.attempt_duration
        if limit is None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.pop(job.id, None)
            if job.attempt is attempt and not attempt.ending:
                job.timed_out = True
                self._begin_end(
                    job, attempt, JobState.FAILED, TIMEOUT_REASON, time.time(), retry=False
                )

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
        attempt.reason = reason
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

    def _send(self, host: str, msg: Event) -> bool:
        if self._batch is not None and host in self._batch:
            self._flush_spawns(host, self._batch)  # keep the host's messages in order
        conn = self.agents.get(host)
        if conn is None or not conn.alive:
            return False
        try:
            conn.send(msg)
        except MnpError:
            return False
        return True

    def _maybe_finish(self, job: Job, attempt: Attempt, now: float) -> None:
        if not attempt.ending or attempt.stopped_at is not None:
            return
        if attempt.pending_sweeps or any(not t.gone for t in attempt.tasks.values()):
            return
        attempt.reaped_at = now
        attempt.stopped_at = now
        for grant in attempt.grants:
            cap = self.capacity.get(grant.host)
            if cap is not None:
                cap.give(grant)
        for node in attempt.nodes:
            if node.state not in TERMINAL:
                node.set_state(attempt.final or JobState.FAILED, now, attempt.reason)
        job.exit_code, job.signal = attempt.exit_code, attempt.signal
        self._record_attempt(job, attempt)
        failed = attempt.final is not JobState.SUCCEEDED
        if (
            failed
            and attempt.retryable
            and not job.timed_out
            and should_retry(
                job.defn,
                len(job.attempts) - job.bonus_attempts,
                attempt.exit_code,
                attempt.reason or "",
            )
        ):
            job.set_state(JobState.RUNNABLE, now, attempt.reason)
            self._enqueue(job)
        else:
            assert attempt.final is not None
            self._finish(job, attempt.final, attempt.reason, now)
        self._kick()

    def _finish(self, job: Job, state: JobState, reason: str | None, now: float) -> None:
        if job.note is not None:
            reason = f"{reason}; {job.note}" if reason else job.note
        job.set_state(state, now, reason)
        for fut in self._waiters.pop(job.id, []):
            if not fut.done():
                fut.set_result(job)
        if job.id in self._waiting_on:
            self._wake(job.id, now)
        parent = job.parent
        if parent is None or parent.done:
            return
        parent.finished += 1
        arr = parent.defn.array
        assert arr is not None
        if arr.sequential and state is JobState.FAILED:
            # the rest can never run: fail them here, without recursing per child
            why = f"Dependent job {job.id} failed"
            for sib in parent.children[parent.admitted :]:
                if sib.state is JobState.PENDING:
                    sib.set_state(JobState.FAILED, now, why)
                    parent.finished += 1
                    if sib.id in self._waiting_on:
                        self._wake(sib.id, now)
            parent.admitted = len(parent.children)
        self._admit_children(parent, now)
        if parent.finished == len(parent.children):
            first = next((c for c in parent.children if c.state is JobState.FAILED), None)
            parent.exit_code = first.exit_code if first else 0
            reason = None
            if first is not None:
                # a child that never ran failed for its parent's reason (cancel, dependency)
                reason = first.reason if not first.attempts else f"Array child {first.id} failed"
            self._finish(
                parent, JobState.SUCCEEDED if first is None else JobState.FAILED, reason, now
            )

    def cancel(self, job_id: str, reason: str) -> Job:
        """SUBMITTED/PENDING/RUNNABLE → FAILED; what already runs goes on (AWS Batch)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise JobRefused(f"job {job_id} does not exist")
        now = time.time()
        waiting = (JobState.SUBMITTED, JobState.PENDING, JobState.RUNNABLE)
        if job.children:
            job.admitted = len(job.children)
            for child in job.children:
                if child.state in waiting:
                    self._dequeue(child)
                    self._finish(child, JobState.FAILED, reason, now)
        elif job.state in waiting:
            self._dequeue(job)
            self._finish(job, JobState.FAILED, reason, now)
        return job

    def terminate(self, job_id: str, reason: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobRefused(f"job {job_id} does not exist")
        now = time.time()
        job.admitted = len(job.children)  # admit no more children while cascading
        for child in job.children:
            self._terminate_one(child, reason, now)
        self._terminate_one(job, reason, now)
        return job

    def _terminate_one(self, job: Job, reason: str, now: float) -> None:
        if job.done:
            return
        attempt = job.attempt
        if job.state in (JobState.STARTING, JobState.RUNNING) and attempt is not None:
            self._begin_end(job, attempt, JobState.FAILED, reason, now, retry=False)
            return
        if job.children:
            return  # the parent ends when its children have
        self._dequeue(job)
        self._finish(job, JobState.FAILED, reason, now)

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
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        await asyncio.gather(*(c.close() for c in self.agents.values()), return_exceptions=True)
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
