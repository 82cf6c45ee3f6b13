"""Attempts: a placed attempt's life, from its tasks' first event to its end.

``Attempts`` holds what the agents are told about running attempts (spawns batched
per host during a scheduling pass, kills, sweeps) and reacts to what they report
(``started``, ``exited``, ``gone``, ``swept``, a refused spawn, a lost host). How
an attempt ends -- its main task exited, its timer fired, a node failed -- comes
from ``mnp.sched.lifecycle``; this room applies it: it tears down what still runs,
gives up on hosts that never confirm the teardown, and once every task is gone
gives the capacity back and retries the job or has ``Admission`` finish it. A
failure while handling one job ends that job only (``abort``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from mnp.controller.admission import Admission
from mnp.controller.launch import LaunchError
from mnp.controller.state import Shared
from mnp.errors import MnpError
from mnp.jobs import Attempt, Job, TaskRun, exit_status, printable
from mnp.model import TERMINAL, Grant, JobState
from mnp.sched import lifecycle
from mnp.transport.base import UNRESPONSIVE, Event

log = logging.getLogger("mnp")

TEARDOWN_SLACK = 15.0
"""How long after ``kill_grace`` an ending attempt waits for its agents to confirm the
teardown (their own give-up after SIGKILL is 5 s) before its hosts are given up on."""

Batch = dict[str, list[tuple[Event, TaskRun]]]
MainRunning = Callable[[Job, Attempt, float], None]


class Attempts:
    def __init__(self, shared: Shared, admission: Admission) -> None:
        self.s = shared
        self.admission = admission
        self.teardown_slack = TEARDOWN_SLACK
        # starts a multi-node attempt's other nodes once its main node runs (Starter's)
        self.main_running: MainRunning | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # attempts ending, waiting for their agents: id → (deadline, job, attempt)
        self._ending: dict[int, tuple[float, Job, Attempt]] = {}
        self._ending_timer: asyncio.TimerHandle | None = None
        # while a scheduling pass runs: its spawns per host, sent as one write per host
        self._batch: Batch | None = None

    # --- sending ----------------------------------------------------------

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Collect the spawns sent meanwhile; then send each host's in one write."""
        batch: Batch = {}
        self._batch = batch
        try:
            yield
        finally:
            self._batch = None
            for host in list(batch):
                self._flush_spawns(host, batch)

    def send_spawn(self, task: TaskRun, msg: Event) -> bool:
        """Send ``task``'s spawn (registered already); False when it could not be sent
        (its attempt is ending)."""
        if self._batch is not None and task.host in self.s.hosts.agents:
            self._batch.setdefault(task.host, []).append((msg, task))
            return True
        try:
            self.s.hosts.agents[task.host].send(msg)
        except (MnpError, KeyError) as e:
            self._spawn_failed(task, e)
            return False
        return True

    def _flush_spawns(self, host: str, batch: Batch) -> None:
        """Send the spawns a pass collected for ``host`` in one write (one SSH packet)."""
        items = batch.pop(host, None)
        if not items:
            return
        try:
            self.s.hosts.agents[host].send_many([msg for msg, _ in items])
        except (MnpError, KeyError) as e:
            for _, task in items:
                self._spawn_failed(task, e)

    def _spawn_failed(self, task: TaskRun, e: Exception) -> None:
        self.on_event(
            task.host,
            {"ev": "exited", "tid": task.tid, "code": 126, "signal": None, "error": str(e)},
        )
        self.on_event(task.host, {"ev": "gone", "tid": task.tid, "killed": 0})

    def _send(self, host: str, msg: Event) -> bool:
        if self._batch is not None and host in self._batch:
            self._flush_spawns(host, self._batch)  # keep the host's messages in order
        return self.s.hosts.send(host, msg)

    # --- agent events -----------------------------------------------------

    def on_event_guarded(self, host: str, msg: Event) -> None:
        """``on_event``, where a failure ends the job the event is about (if any)
        instead of the host's reader."""
        try:
            self.on_event(host, msg)
        except Exception as e:
            tid = msg.get("tid") if isinstance(msg.get("tid"), str) else None
            entry = self.s.tasks.get(tid) if tid else None
            job = entry[0] if entry is not None else self.s.jobs.get(str(msg.get("job", "")))
            if job is not None and not job.done:
                self.abort(job, e, what="Controller error")
            else:
                log.exception("%s: handling %.40r failed", host, msg.get("ev"))

    def on_event(self, host: str, msg: Event) -> None:
        s = self.s
        if s.closed:
            return  # what the agents report while they stop is not the jobs' doing
        ev = msg.get("ev")
        if ev == "out":
            entry = s.tasks.get(msg.get("tid", ""))
            if entry is not None and s.on_output is not None:
                s.on_output(entry[0], entry[2], int(msg.get("fd", 1)), str(msg.get("data", "")))
            return
        now = s.clock()
        if ev == "started":
            entry = s.tasks.get(msg.get("tid", ""))
            if entry is not None:
                self._task_started(*entry, msg, now)
        elif ev == "exited":
            entry = s.tasks.get(msg.get("tid", ""))
            if entry is not None:
                self._task_exited(*entry, msg, now)
        elif ev == "gone":
            entry = s.tasks.get(msg.get("tid", ""))
            if entry is not None:
                job, attempt, task = entry
                task.gone = True
                if not task.exited:
                    task.exited_at = now
                s.task_gone(job, task)
                self.maybe_finish(job, attempt, now)
        elif ev == "swept":
            job_obj = s.jobs.get(str(msg.get("job", "")))
            if job_obj is not None and job_obj.attempt is not None:
                job_obj.attempt.pending_sweeps.discard(host)
                self.maybe_finish(job_obj, job_obj.attempt, now)
        elif ev in ("pmi_barrier", "pmi_fail"):
            entry = s.tasks.get(str(msg.get("tid", "")))
            if entry is not None:
                self._pmi_event(entry[0], entry[1], msg, now)
        elif ev == "error" and msg.get("tid"):
            # a refused spawn (malformed, duplicate tid): it never started and never will
            entry = s.tasks.get(str(msg["tid"]))
            if entry is not None and entry[2].started_at is None and not entry[2].exited:
                why = f"agent refused the task: {msg.get('msg')}"
                self.on_event(host, {"ev": "exited", "tid": msg["tid"], "code": 126, "error": why})
                self.on_event(host, {"ev": "gone", "tid": msg["tid"], "killed": 0})

    def _pmi_event(self, job: Job, attempt: Attempt, msg: Event, now: float) -> None:
        """A direct MPI launch's barrier (relayed back to every node once all arrived)
        or a rank's failure (the job ends at once, with that rank's code)."""
        world = attempt.mpi
        if world is None or attempt.ending or msg.get("kvsname") != world.kvsname:
            return
        if msg["ev"] == "pmi_fail":
            code = msg.get("code")
            attempt.exit_code = code if isinstance(code, int) and 0 <= code < 256 else 1
            attempt.signal = None
            reason = str(msg.get("reason") or "MPI rank failed")
            self.begin_end(job, attempt, JobState.FAILED, reason, now)
            return
        node, epoch, puts = msg.get("node"), msg.get("epoch"), msg.get("puts")
        if not (isinstance(node, int) and isinstance(epoch, int) and isinstance(puts, dict)):
            self.begin_end(job, attempt, JobState.FAILED, "MPI barrier: malformed event", now)
            return
        out = world.barrier(node, epoch, {str(k): str(v) for k, v in puts.items()})
        if isinstance(out, str):
            self.begin_end(job, attempt, JobState.FAILED, out, now)
        elif out is not None:
            for release in out:
                self._send(release.pop("host"), release)

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
            self.s.record_attempt(job, attempt)
            self.arm_timeout(job, attempt)
            return
        node = attempt.nodes[task.node_index or 0]
        _take_port(attempt, msg.get("port"))
        if all(t.started_at is not None for t in node.tasks):
            node.set_state(JobState.RUNNING, now)
            mn = job.defn.multinode
            assert mn is not None
            if node.index == mn.main_node:
                assert self.main_running is not None
                self.main_running(job, attempt, now)
            else:
                self.check_all_running(attempt, now)

    def check_all_running(self, attempt: Attempt, now: float) -> None:
        """Record when every node of a multi-node attempt has left STARTING."""
        if attempt.running_at is None and all(
            n.state is not JobState.STARTING for n in attempt.nodes
        ):
            attempt.running_at = now
            job = attempt.nodes[0].job if attempt.nodes else None
            if job is not None:
                self.s.record_attempt(job, attempt)

    def _task_exited(
        self, job: Job, attempt: Attempt, task: TaskRun, msg: Event, now: float
    ) -> None:
        task.exited_at = now
        task.exit_code = msg.get("code")
        task.signal = msg.get("signal")
        task.error = msg.get("error")
        task.usage = msg.get("usage")  # what the task used (PROTOCOL.md: exited)
        if task.error and self.s.on_output is not None:
            self.s.on_output(job, task, 2, f"mnp: {task.tid}: {task.error}\n")
        if not job.is_multinode:
            attempt.main_exit_at = now
            end = lifecycle.task_ended(job, attempt, task)
            if end is not None:
                attempt.exit_code, attempt.signal = task.exit_code, task.signal
                self.begin_end(job, attempt, end.final, end.reason, now)
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
        if attempt.mpi is not None and task.node_index in attempt.mpi.hosts:
            # an MPI world ends when all its ranks have: as the main node ended
            ranks = [t for n in attempt.nodes if n.index in attempt.mpi.hosts for t in n.tasks]
            mn = job.defn.multinode
            assert mn is not None
            main = attempt.nodes[mn.main_node]
            if not all(t.exited for t in ranks) or not main.tasks:
                return
            task = main.tasks[0]
        end = lifecycle.task_ended(job, attempt, task)
        if end is not None:
            attempt.main_exit_at = now
            attempt.exit_code, attempt.signal = node.exit_code, node.signal
            self.begin_end(job, attempt, end.final, end.reason, now)

    def on_host_lost(self, host: str, reason: str) -> None:
        """The pool lost ``host`` (``reason``: ``Host lost: NAME``...): what ran there
        is gone, and the attempts it belonged to end (and may be retried elsewhere)."""
        s = self.s
        if s.closed:
            return
        now = s.clock()
        hit: dict[int, tuple[Job, Attempt]] = {}
        for job, attempt, task in list(s.tasks.values()):
            if task.host != host or task.gone:
                continue
            task.gone = True
            if not task.exited:
                task.exited_at = now
            s.task_gone(job, task)
            hit[id(attempt)] = (job, attempt)
        for job, attempt in hit.values():
            if not attempt.ending:
                self.begin_end(job, attempt, JobState.FAILED, reason, now)
            self.maybe_finish(job, attempt, now)
        for job in s.jobs.values():
            att = job.attempt
            if att is not None and host in att.pending_sweeps:
                att.pending_sweeps.discard(host)
                self.maybe_finish(job, att, now)
        s.request_schedule()

    # --- ending -----------------------------------------------------------

    def arm_timeout(self, job: Job, attempt: Attempt) -> None:
        limit = lifecycle.time_limit(job)
        if limit is None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.pop(job.id, None)
            end = lifecycle.timed_out(job, attempt)
            if end is not None:
                job.timed_out = True
                now = self.s.clock()
                self.begin_end(job, attempt, end.final, end.reason, now, retry=end.retry)

        self._timers[job.id] = loop.call_later(limit, fire)

    def begin_end(
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
        self.maybe_finish(job, attempt, now)
        if attempt.stopped_at is None and not self.s.closed:
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
                self._teardown_overdue(job, attempt, self.s.clock())
        if self._ending and not self.s.closed:
            self._ending_timer = asyncio.get_running_loop().call_later(1.0, self._check_ending)

    def _teardown_overdue(self, job: Job, attempt: Attempt, now: float) -> None:
        hosts = {t.host for t in attempt.tasks.values() if not t.gone} | attempt.pending_sweeps
        limit = job.defn.timeout.kill_grace + self.teardown_slack
        for host in sorted(hosts):
            conn = self.s.hosts.agents.get(host)
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
                    self.s.task_gone(job, task)
        self.maybe_finish(job, attempt, now)

    def maybe_finish(self, job: Job, attempt: Attempt, now: float) -> None:
        """Once an ending attempt's tasks are all gone: give its capacity back, then
        retry the job or finish it (``lifecycle.after_attempt``)."""
        if not attempt.ending or attempt.stopped_at is not None:
            return
        if attempt.pending_sweeps or any(not t.gone for t in attempt.tasks.values()):
            return
        attempt.reaped_at = now
        attempt.stopped_at = now
        self._ending.pop(id(attempt), None)
        attempt.secrets = {}
        self.s.give_back(attempt.grants)
        for node in attempt.nodes:
            if node.state not in TERMINAL:
                node.set_state(attempt.final or JobState.FAILED, now, attempt.reason)
        job.exit_code, job.signal = attempt.exit_code, attempt.signal
        self.s.record_attempt(job, attempt)
        step = lifecycle.after_attempt(job, attempt)
        if isinstance(step, lifecycle.Retry):
            job.set_state(JobState.RUNNABLE, now, step.reason)
            self.s.enqueue(job)
        else:
            self.admission.finish(job, step.state, step.reason, now)
        self.s.request_schedule()

    def terminate(self, job: Job, reason: str, now: float) -> None:
        """Like ``Admission.cancel``, and STARTING/RUNNING ones are ended."""
        self.admission.stop_admitting(job, reason, now)  # no more children while cascading
        for j, running in lifecycle.terminated(job):
            if j.done:
                continue
            if running and (attempt := j.attempt) is not None:
                self.begin_end(j, attempt, JobState.FAILED, reason, now, retry=False)
            else:
                self.s.dequeue(j)
                self.admission.finish(j, JobState.FAILED, reason, now)
        self.admission.end_if_over(job, now)

    # --- one job's failure stays that job's -------------------------------

    def abort(
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
        now = self.s.clock()
        attempt = job.attempt
        if grants and (attempt is None or attempt.grants is not grants):
            self.s.give_back(grants)  # the launch failed before an attempt held them
            attempt = None
        try:
            if attempt is not None and attempt.stopped_at is None:
                self.begin_end(job, attempt, JobState.FAILED, reason, now, retry=False)
                self.maybe_finish(job, attempt, now)  # if it was ending already
            elif not job.done:
                self.s.dequeue(job)
                self.admission.finish(job, JobState.FAILED, reason, now)
        except Exception:  # its ending failed too: end it by force
            log.exception("job %s: ending it after a failed launch failed", job.id)
            self._force_end(job, attempt, reason, now)
        self.s.request_schedule()

    def _force_end(self, job: Job, attempt: Attempt | None, reason: str, now: float) -> None:
        if attempt is not None and attempt.stopped_at is None:
            attempt.stopped_at = now
            attempt.secrets = {}
            for task in attempt.tasks.values():
                self.s.tasks.pop(task.tid, None)
            self.s.give_back(attempt.grants)
        if not job.done:
            try:
                self.admission.finish(job, JobState.FAILED, reason, now)
            except Exception:
                log.exception("job %s: cannot be ended", job.id)

    def close(self, now: float) -> None:
        """The controller stops: an attempt whose end was decided ends now (the agents'
        closing is its teardown); no timer fires any more."""
        for job in list(self.s.jobs.values()):
            attempt = job.attempt
            if attempt is not None and attempt.ending and attempt.stopped_at is None:
                attempt.pending_sweeps.clear()
                for t in attempt.tasks.values():
                    t.gone = True
                self.maybe_finish(job, attempt, now)
        for timer in self._timers.values():
            timer.cancel()
        if self._ending_timer is not None:
            self._ending_timer.cancel()


def _take_port(attempt: Attempt, port: object) -> None:
    """MASTER_PORT as the main node's agent picked it at the spawn (``port`` of its
    ``started``; ``Launcher.nodes``): the nodes started after it are wired with it."""
    launch = attempt.launch
    if not attempt.port_key or launch is None or launch.master_port is not None:
        return
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        attempt.launch = dataclasses.replace(launch, master_port=port)
