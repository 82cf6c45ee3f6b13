"""Admission: a job from its submission to the run queue, and the end of a job.

``Admission`` gives jobs their ids and records, resolves their dependencies, takes
back the jobs a previous controller left (``restore``), releases jobs and array
children as ``mnp.sched.lifecycle`` decides (PENDING → RUNNABLE, or FAILED when a
dependency never can be met), and applies a job's end (``finish``): its waiters,
the jobs that depend on it, its array siblings and parent. It starts nothing; the
``Starter`` places what is RUNNABLE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mnp import jobref
from mnp.controller.managed import could_run_managed
from mnp.controller.state import Shared
from mnp.errors import InfraError, JobRefused
from mnp.jobs import ARRAY_CUT, WAITING, Attempt, Job
from mnp.model import Dependency, JobDefinition, JobState, Request, Resources
from mnp.sched import lifecycle
from mnp.sched.autoscale import Need
from mnp.sched.decide import could_ever_run

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
    released: int | None = None
    """An array parent: how many children were released (they have rows: indexes 0 to
    ``released - 1``); the others are still a range. None: those restored that are not
    PENDING."""
    ended: int | None = None
    """An array parent: how many of its released children have ended (None: of those
    restored)."""
    cut: int | None = None
    """An array parent: children from this index on ended unreleased (``Job.cut``)."""
    cut_reason: str | None = None


class Admission:
    def __init__(self, shared: Shared) -> None:
        self.s = shared
        self.named: dict[str, str] = {}  # name -> id of the newest top-level job held
        self.seq = 0
        self.next_id = 1  # without a recorder
        self.waiting_on: dict[str, list[Job]] = {}  # job id → jobs waiting for it to end
        # node sizes of managed environments learned so far (``Managed.known_vcpus``)
        self.managed_vcpus: Callable[[], Mapping[str, int]] = dict

    # --- submit -----------------------------------------------------------

    def submit(self, defn: JobDefinition) -> Job:
        s = self.s
        if s.closed:
            raise InfraError("controller is shutting down")
        inventory = s.inventory
        queue = inventory.queues.get(defn.queue)
        if queue is None:
            allowed = ", ".join(sorted(inventory.queues))
            raise JobRefused(f"queue {defn.queue!r} does not exist; queues: {allowed}")
        if queue.state != "ENABLED":
            raise JobRefused(f"queue {defn.queue!r} is DISABLED and refuses new jobs")
        probe = request_for("probe", defn, 0)
        capacity = s.hosts.capacity
        if not could_ever_run(
            probe, queue, inventory.compute_environments, capacity
        ) and not could_run_managed(
            inventory,
            defn.queue,
            Need(
                "probe",
                len(probe.nodes),
                max(r.vcpus for r in probe.nodes),
                defn.timeout.attempt_duration,
            ),  # fmt: skip
            self.managed_vcpus(),
        ):
            if s.hosts.host_errors:
                down = "; ".join(f"{h}: {e}" for h, e in sorted(s.hosts.host_errors.items()))
                raise InfraError(
                    f"the job needs hosts that are not usable now ({describe_request(probe)}, "
                    f"{len(s.hosts.agents)} of {len(inventory.hosts)} hosts usable); {down}"
                )
            raise JobRefused(
                "MISCONFIGURATION:JOB_RESOURCE_REQUIREMENT: no compute environment of queue "
                f"{queue.name!r} has hosts that could ever run this job "
                f"({describe_request(probe)})"
            )
        defn = self._resolve_dependencies(defn)
        now = s.clock()
        job_id = self._allocate_id()
        job = self._new_job(job_id, defn, now)
        if defn.array is not None:
            self.seq += defn.array.size  # child i's seq is the parent's + 1 + i
        if s.recorder is not None:
            s.recorder.jobs_added([job])
        job.emit_change(job.id, JobState.SUBMITTED, JobState.SUBMITTED, now, None, None)
        job.set_state(JobState.PENDING, now)
        self.release_if_ready(job, now, soon=True)
        return job

    def _allocate_id(self) -> str:
        if self.s.recorder is not None:
            return self.s.recorder.next_id()
        job_id = str(self.next_id)
        self.next_id += 1
        return job_id

    def _new_job(self, job_id: str, defn: JobDefinition, now: float) -> Job:
        self.seq += 1
        job = Job(job_id, defn, self.seq, self.s.emit, now)
        job.request = request_for(job_id, defn, self.seq)
        self.s.jobs[job_id] = job
        self._hold_name(job)
        self._can_grow(job)
        return job

    def _can_grow(self, parent: Job) -> None:
        if parent.is_array:
            parent.grow = lambda index: self._new_child(parent, index, self.s.clock())

    def _new_child(self, parent: Job, index: int, now: float) -> Job:
        """Array child ``index`` comes into being (it is released, or can never run): its
        object, row and events, SUBMITTED then PENDING. Until then it is a number in its
        parent's range; its ``seq`` was kept for it at submit (FIFO order holds)."""
        s = self.s
        child_id = f"{parent.id}:{index}"
        seq = parent.seq + 1 + index
        child = Job(child_id, parent.defn, seq, s.emit, now, parent=parent, array_index=index)
        child.request = request_for(child_id, parent.defn, seq)
        s.jobs[child_id] = child
        parent.held.append(child)
        parent.waiting += 1
        if s.recorder is not None:
            s.recorder.jobs_added([child])
        child.emit_change(child_id, JobState.SUBMITTED, JobState.SUBMITTED, now, None, None)
        child.set_state(JobState.PENDING, now)
        return child

    def _child_at(self, parent: Job, index: int, now: float) -> Job:
        """Child ``index`` of ``parent``: the one held (restored), else a new one."""
        children = parent.held
        if children and (children[-1].array_index or 0) >= index:
            held = self.s.jobs.get(f"{parent.id}:{index}")
            if held is not None:
                return held
        return self._new_child(parent, index, now)

    def _release_no_more(self, parent: Job, reason: str, now: float) -> None:
        """Admission of ``parent``'s children ends (cancel, terminate, a failed SEQUENTIAL
        child): the children that never had an object (from ``lifecycle.unreleased``
        on) end FAILED with ``reason`` in one step -- one event for them all
        (``ARRAY_CUT``), which the recorder keeps beside the parent's row
        (``mnp.store.gaps``) -- and the jobs waiting for any of them are woken."""
        size = lifecycle.array_size(parent)
        first = lifecycle.unreleased(parent)
        parent.admitted = size
        if first >= size or parent.cut is not None:
            return
        parent.cut, parent.cut_reason = first, reason
        parent.finished += size - first
        event: dict[str, Any] = {
            "time": now,
            "type": ARRAY_CUT,
            "job_id": parent.id,
            "name": parent.defn.name,
            "queue": parent.defn.queue,
            "status": JobState.FAILED.value,
            "reason": reason,
            "array_range": [first, size - 1],
            "count": size - first,
        }
        if parent.defn.tags:
            event["tags"] = dict(parent.defn.tags)
        parent.emit(event)
        prefix = f"{parent.id}:"
        for target in [t for t in self.waiting_on if t.startswith(prefix)]:
            if first <= int(target[len(prefix) :]):
                self._wake(target, now)

    # --- crash recovery ---------------------------------------------------

    def restore(self, items: Sequence[Restored], now: float) -> None:
        """Take back the unfinished jobs a previous controller accepted (SPEC §6 "Crash
        safety"). Their agents killed whatever ran when that controller died, so an
        attempt that was STARTING/RUNNING is lost: it is retried without counting against
        the job's attempts (the infrastructure failed, not the job)."""
        s = self.s
        parents: dict[str, Job] = {}
        counts: dict[str, tuple[int | None, int | None]] = {}
        restored: list[Job] = []
        for it in sorted(items, key=lambda i: i.seq):
            parent = parents.get(it.parent) if it.parent else None
            job = Job(
                it.id,
                it.defn,
                it.seq,
                s.emit,
                it.created,
                state=it.state,
                reason=it.reason,
                parent=parent,
                array_index=it.array_index,
            )
            job.attempts = [Attempt(n + 1, final=JobState.FAILED) for n in range(it.attempts)]
            job.request = request_for(it.id, it.defn, it.seq)
            s.jobs[it.id] = job
            if it.parent is None:
                self._hold_name(job)
            self.seq = max(self.seq, it.seq + (lifecycle.array_size(job)))
            if it.id.isdigit():  # without a recorder, ids go on after the restored ones
                self.next_id = max(self.next_id, int(it.id) + 1)
            if parent is not None:
                parent.held.append(job)
            elif it.defn.array is not None:
                parents[it.id] = job
                counts[it.id] = (it.released, it.ended)
                job.cut, job.cut_reason = it.cut, it.cut_reason
            restored.append(job)
        for parent in parents.values():
            parent.held.sort(key=lambda c: c.array_index or 0)
            released, ended = counts[parent.id]
            held = parent.held
            parent.admitted = (
                sum(1 for c in held if c.state is not JobState.PENDING)
                if released is None
                else released
            )
            parent.finished = sum(1 for c in held if c.done) if ended is None else ended
            if parent.cut is not None:  # those ended unreleased are never released
                parent.admitted = lifecycle.array_size(parent)
                parent.finished += parent.admitted - parent.cut
            parent.waiting = sum(1 for c in parent.held if c.state in WAITING)
            self._can_grow(parent)
            parent.ready = parent.admitted > 0
        for job in restored:
            if job.state in (JobState.STARTING, JobState.RUNNING):
                job.bonus_attempts += 1
                job.set_state(JobState.RUNNABLE, now, LOST_REASON)
                s.enqueue(job)
            elif job.state is JobState.RUNNABLE:
                s.enqueue(job)
            elif job.state is JobState.SUBMITTED:
                job.set_state(JobState.PENDING, now)
        for job in restored:
            if job.state is not JobState.PENDING or job.done:
                continue
            if job.is_array and job.ready:
                self._admit_children(job, now)
                outcome = lifecycle.array_outcome(job)
                if outcome is not None:  # every child had ended before the restart
                    job.exit_code = lifecycle.array_exit_code(job)
                    self.finish(job, outcome.state, outcome.reason, now)
            elif job.parent is None or job.parent.ready:
                self.release_if_ready(job, now)
        s.request_schedule()

    # --- names and dependencies -------------------------------------------

    def state_of(self, job_id: str) -> JobState | None:
        """A job's state, or None when no such job exists (held, or stored by the
        recorder: a job that ended before a restart)."""
        job = self.s.jobs.get(job_id)
        if job is not None:
            return job.state
        root, sep, index = job_id.partition(":")
        parent = self.s.jobs.get(root) if sep else None
        if parent is not None and index.isdigit():
            i, size = int(index), lifecycle.array_size(parent)
            if parent.cut is not None and parent.cut <= i < size:
                return JobState.FAILED  # ended unreleased (cancel, terminate)
            if parent.admitted <= i < size:
                return JobState.PENDING  # not released yet (a released one has its row)
        recorder = self.s.recorder
        stored = recorder.stored_job(job_id) if recorder is not None else None
        return stored[0] if stored is not None else None

    def _array_size(self, job_id: str) -> int | None:
        job = self.s.jobs.get(job_id)
        if job is not None:
            return job.defn.array.size if job.is_array and job.defn.array is not None else None
        recorder = self.s.recorder
        stored = recorder.stored_job(job_id) if recorder is not None else None
        return stored[1] if stored is not None else None

    def resolve(self, ref: str) -> str | None:
        """The id of the job ``ref`` refers to, or None (``mnp.jobref``): an id (``42``,
        ``42:7``), or a name (``train``, ``train:7``) for the newest top-level job of
        that name, held or stored. An id comes first."""
        root, suffix = jobref.split(ref)
        if self.state_of(root) is None:
            held = self.named.get(root)
            recorder = self.s.recorder
            stored = recorder.newest_named(root) if recorder is not None else None
            found = [i for i in (held, stored) if i is not None]
            if not found:
                return None
            root = max(found, key=jobref.id_order)
        job_id = root + suffix
        return job_id if self.state_of(job_id) is not None else None

    def _hold_name(self, job: Job) -> None:
        newest = self.named.get(job.defn.name)
        if newest is None or jobref.id_order(job.id) > jobref.id_order(newest):
            self.named[job.defn.name] = job.id

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

    # --- release ----------------------------------------------------------

    def release_if_ready(self, job: Job, now: float, soon: bool = False) -> None:
        """PENDING → RUNNABLE (or, for an array parent, admit its children) once every
        dependency is met; FAILED as soon as one can never be (``lifecycle.release``).
        ``soon``: an array's first children are released at the loop's next turn, so that
        the commit that accepts it (``submit``) holds one row."""
        if job.state is not JobState.PENDING:
            return
        step = lifecycle.release(job, self.state_of)
        if isinstance(step, lifecycle.Wait):
            self.waiting_on.setdefault(step.target, []).append(job)
        elif isinstance(step, lifecycle.Fail):
            self._fail_pending(job, step.reason, now)
        elif job.is_array:
            job.ready = True
            if soon:
                asyncio.get_running_loop().call_soon(self._admit_accepted, job)
            else:
                self._admit_children(job, now)
        else:
            job.set_state(JobState.RUNNABLE, now)
            self.s.enqueue(job)
            self.s.request_schedule()

    def _fail_pending(self, job: Job, reason: str, now: float) -> None:
        if job.is_array:
            self.stop_admitting(job, reason, now)
            for child in job.held:
                if not child.done:
                    self.s.dequeue(child)
                    self.finish(child, JobState.FAILED, reason, now)
            if not job.done:  # no child at all left to end it
                self.finish(job, JobState.FAILED, reason, now)
        else:
            self.s.dequeue(job)
            self.finish(job, JobState.FAILED, reason, now)

    def _wake(self, job_id: str, now: float) -> None:
        for waiter in self.waiting_on.pop(job_id, []):
            self.release_if_ready(waiter, now)

    def _admit_children(self, parent: Job, now: float) -> None:
        """Release array children, in index order, as ``lifecycle.room`` allows (one at
        a time: a child that fails at once makes room for the next)."""
        while lifecycle.room(parent) > 0:
            child = self._child_at(parent, parent.admitted, now)
            parent.admitted += 1
            self.release_if_ready(child, now)

    def _admit_accepted(self, parent: Job) -> None:
        if self.s.jobs.get(parent.id) is parent and not parent.done and not self.s.closed:
            self._admit_children(parent, self.s.clock())

    def top_up(self, parent: Job, now: float) -> None:
        """Release more of ``parent``'s children if there is room now (some were placed)."""
        if not parent.done:
            self._admit_children(parent, now)

    def stop_admitting(self, parent: Job, reason: str, now: float) -> None:
        """Release no more of ``parent``'s children (cancel, terminate): those never
        released end FAILED with ``reason`` (``_release_no_more``). Nothing for a job
        that is no array, or has ended."""
        if not parent.is_array or parent.done:
            return
        self._release_no_more(parent, reason, now)

    def end_if_over(self, parent: Job, now: float) -> None:
        """End array ``parent`` if every child has: after a cancel or terminate that
        left none to end it (all had ended, or were never released)."""
        if not parent.is_array or parent.done:
            return
        outcome = lifecycle.array_outcome(parent)
        if outcome is not None:
            parent.exit_code = lifecycle.array_exit_code(parent)
            self.finish(parent, outcome.state, outcome.reason, now)

    # --- a job's end ------------------------------------------------------

    def finish(self, job: Job, state: JobState, reason: str | None, now: float) -> None:
        """``job`` ends in ``state``: its waiters get it, the jobs that wait for it are
        released (or fail), and its array parent admits the next children or ends."""
        job.set_state(state, now, lifecycle.final_reason(reason, job.note))
        for fut in self.s.waiters.pop(job.id, []):
            if not fut.done():
                fut.set_result(job)
        if job.id in self.waiting_on:
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
                if sib.id in self.waiting_on:
                    self._wake(sib.id, now)
            self._release_no_more(parent, why, now)  # and those never released
        self._admit_children(parent, now)
        outcome = lifecycle.array_outcome(parent)
        if outcome is not None:
            parent.exit_code = lifecycle.array_exit_code(parent)
            self.finish(parent, outcome.state, outcome.reason, now)

    def cancel(self, job: Job, reason: str, now: float) -> None:
        """SUBMITTED/PENDING/RUNNABLE → FAILED; what already runs goes on (AWS Batch)."""
        self.stop_admitting(job, reason, now)
        for j in lifecycle.cancelled(job):
            if not j.done:
                self.s.dequeue(j)
                self.finish(j, JobState.FAILED, reason, now)
        self.end_if_over(job, now)

    # --- forgetting -------------------------------------------------------

    def withdraw(self, job: Job) -> None:
        """Forget a job that was just submitted, as if it never had been: its acceptance
        could not be recorded. Only a job that has not been placed yet can go."""
        jobs = self.s.jobs
        for j in (job, *job.held):
            if j.attempts:
                raise ValueError(f"job {j.id} has started; it cannot be withdrawn")
        for j in (*job.held, job):
            self.s.dequeue(j)
            jobs.pop(j.id, None)
        name = job.defn.name
        if self.named.get(name) == job.id:
            del self.named[name]
            for other in jobs.values():
                if other.parent is None and other.defn.name == name:
                    self._hold_name(other)
        gone = {job.id, *(c.id for c in job.held)}
        for target, waiting in list(self.waiting_on.items()):
            kept = [w for w in waiting if w.id not in gone]
            if kept:
                self.waiting_on[target] = kept
            else:
                del self.waiting_on[target]

    def forget(self, job_ids: Sequence[str]) -> None:
        """Drop finished top-level jobs (and their children) from memory: they were
        purged from the store. A new job can no longer name them as a dependency.
        Unfinished ones are kept (the store never purges them)."""
        jobs = self.s.jobs
        for job_id in job_ids:
            job = jobs.get(job_id)
            if job is None or not job.done or any(not c.done for c in job.held):
                continue
            for j in (*job.held, job):
                jobs.pop(j.id, None)
                self.waiting_on.pop(j.id, None)


def request_for(key: str, defn: JobDefinition, seq: int) -> Request:
    """What ``mnp.sched.decide`` is asked to place for a job: one node's resources per
    node (a single job: one)."""
    if defn.multinode is not None:
        mn = defn.multinode
        nodes = tuple(mn.group_of(i)[1].resources for i in range(mn.num_nodes))
        return Request(
            key, defn.queue, seq, nodes, exclusive=mn.exclusive,
            timeout=defn.timeout.attempt_duration,
        )  # fmt: skip
    return Request(key, defn.queue, seq, (defn.resources,), timeout=defn.timeout.attempt_duration)


def describe_request(req: Request) -> str:
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
