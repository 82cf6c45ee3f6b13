"""What happens next to a job (SPEC §6), decided without doing it.

The controller's core asks these functions at each turn of a job's life --
submitted, a dependency ended, a child ended, a task exited, an attempt was
reaped, a timer fired, a user cancelled -- and applies what they answer (state
changes, queueing, teardown, events). Each looks at the runtime records of
``mnp.jobs`` as they are and, where time matters, the ``now`` it is given; none
mutates a record, does I/O or reads the clock. So every rule is a row of a table
in ``tests/unit/test_lifecycle.py``.

Answers are small frozen values:

- ``release``: ``Wait(target)`` (a dependency runs), ``Fail(reason)`` (one failed:
  this job can never run) or ``Ready()`` (RUNNABLE; an array parent admits children);
- ``room``: how many array children to release now; ``never_run``: those that can
  never run after a SEQUENTIAL child failed;
- ``task_ended`` / ``timed_out``: ``End(final, reason, retry)`` -- how an attempt ends,
  decided before its teardown -- or None (nothing to decide yet);
- ``after_attempt``: ``Retry(reason)`` or ``Finish(state, reason)`` once it is reaped;
- ``array_outcome``: the parent's ``Finish`` once every child has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mnp.jobs import (
    TIMEOUT_REASON,
    WAITING,
    Attempt,
    Job,
    NodeRun,
    TaskRun,
    exit_status,
    should_retry,
)
from mnp.model import TERMINAL, JobState

OOM_PREFIX = "OutOfMemoryError:"
"""How the reason of a task killed for its memory starts (mnp/agent/limits.py)."""

StateOf = Callable[[str], JobState | None]
"""A job's state by id, or None when no such job is known (purged: it ended long ago)."""

AHEAD = 512
"""An array without a ``parallelism`` holds at most this many children that wait to be
placed (twice the scheduler's look-ahead, ``mnp.sched.decide.QUEUE_DEPTH``); the others
are an index range with no object, row or event until they are released (``room``)."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Ask again when ``target`` has ended."""

    target: str


@dataclass(frozen=True, slots=True)
class Fail:
    """The job can never run: FAILED with ``reason`` (array children too)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Ready:
    """Every dependency is met: RUNNABLE, or an array parent admits its children."""


@dataclass(frozen=True, slots=True)
class End:
    """How an attempt ends, decided as its teardown begins."""

    final: JobState
    reason: str | None = None
    retry: bool = True


@dataclass(frozen=True, slots=True)
class Retry:
    """The reaped attempt failed and another one runs: RUNNABLE again."""

    reason: str | None


@dataclass(frozen=True, slots=True)
class Finish:
    """The job is over."""

    state: JobState
    reason: str | None


# --- dependencies and arrays ------------------------------------------------------


def dependency_targets(job: Job) -> list[tuple[str, bool]]:
    """(job id, any end will do) pairs: the parent (or a plain job) waits on its own
    dependencies; array children on the matching child of N_TO_N ones."""
    deps = job.defn.depends_on
    if job.parent is not None:
        return [(f"{d.job_id}:{job.array_index}", False) for d in deps if d.type == "N_TO_N"]
    return [(d.job_id, d.type == "afterany") for d in deps if d.type != "N_TO_N"]


def release(job: Job, state_of: StateOf) -> Wait | Fail | Ready:
    """What a PENDING job does now: wait for a dependency that runs, fail for one that
    failed (``afterany`` takes any end), or go ahead. A dependency no longer known was
    purged, long after it ended: it holds nothing up."""
    for target, any_end in dependency_targets(job):
        state = state_of(target)
        if state is None:
            continue
        if state is JobState.FAILED and not any_end:
            return Fail(f"Dependent job {target} failed")
        if state not in TERMINAL:
            return Wait(target)
    return Ready()


def array_size(parent: Job) -> int:
    """How many children an array parent has (released or not); 0 for any other job."""
    arr = parent.defn.array
    return arr.size if arr is not None and parent.parent is None else 0


def room(parent: Job) -> int:
    """How many more array children to release now, in index order: as many as
    ``parallelism`` (SEQUENTIAL: one) leaves room for beside those admitted and not yet
    ended -- without a ``parallelism``, as many as keep ``AHEAD`` of them waiting to be
    placed -- and no more than are left."""
    arr = parent.defn.array
    if arr is None or not parent.ready:
        return 0
    if arr.sequential or arr.parallelism:
        limit = 1 if arr.sequential else (arr.parallelism or 0)
        free = limit - (parent.admitted - parent.finished)
    else:
        # children held past the release frontier (looked at, not released) wait too
        last = parent.held[-1].array_index or 0 if parent.held else -1
        beyond = max(0, last + 1 - parent.admitted)
        free = AHEAD - max(0, parent.waiting - beyond)
    return max(0, min(free, arr.size - parent.admitted))


def unreleased(parent: Job) -> int:
    """The first index of an array parent's children that have no object yet (neither
    released nor looked at past the release frontier)."""
    held = parent.held
    return max(parent.admitted, (held[-1].array_index or 0) + 1 if held else 0)


def stops_admission(parent: Job, state: JobState) -> bool:
    """Whether a child of ``parent`` ending in ``state`` dooms every later one: a
    SEQUENTIAL array's failed child."""
    arr = parent.defn.array
    return arr is not None and arr.sequential and state is JobState.FAILED


def never_run(parent: Job, state: JobState) -> Sequence[Job] | None:
    """After a child of ``parent`` ended in ``state``: None when admission goes on, else
    the children that can never run and fail now -- a SEQUENTIAL array's failed child
    dooms every later one still PENDING, and admits no more. (Those here have their
    object; the controller ends the ones that have none in one step, ``Job.cut``.)"""
    if not stops_admission(parent, state):
        return None
    first = parent.admitted
    return [c for c in parent.held if (c.array_index or 0) >= first and c.state is JobState.PENDING]


def array_outcome(parent: Job) -> Finish | None:
    """The parent's end once every child has ended: SUCCEEDED when all succeeded, else
    FAILED for the first failed child (a child that never ran failed for its parent's
    reason: cancel, a dependency; those ended unreleased come after every held one)."""
    if parent.finished < array_size(parent):
        return None
    first = next((c for c in parent.held if c.state is JobState.FAILED), None)
    if first is None:
        if parent.cut is not None:
            return Finish(JobState.FAILED, parent.cut_reason)
        return Finish(JobState.SUCCEEDED, None)
    return Finish(
        JobState.FAILED, first.reason if not first.attempts else f"Array child {first.id} failed"
    )


def array_exit_code(parent: Job) -> int | None:
    first = next((c for c in parent.held if c.state is JobState.FAILED), None)
    if first is None:
        return None if parent.cut is not None else 0
    return first.exit_code


# --- attempts ---------------------------------------------------------------------


def node_result(node: NodeRun) -> tuple[int | None, int | None, TaskRun | None]:
    """(exit code, signal, first failing task) of a node whose tasks have all exited:
    its first failing task's, else 0."""
    failed = next((t for t in node.tasks if t.exit_code != 0), None)
    if failed is None:
        return 0, None, None
    return failed.exit_code, failed.signal, failed


def task_ended(job: Job, attempt: Attempt, task: TaskRun) -> End | None:
    """How the attempt ends now that ``task`` exited, if that decides it: a single or
    array job's task decides by its exit code; in a multi-node job, once every task of
    its node has exited, the main node's exit ends the job as the node ended, and a
    failed child node ends it only with ``on_child_failure = "terminate"``."""
    if attempt.ending:
        return None
    mn = job.defn.multinode
    if mn is None:
        ok = task.exit_code == 0
        return End(JobState.SUCCEEDED if ok else JobState.FAILED, task.error)
    node = attempt.nodes[task.node_index or 0]
    if not all(t.exited for t in node.tasks):
        return None
    code, signal, failed = node_result(node)
    status = exit_status(code, signal)
    if node.index == mn.main_node:
        # a task killed for its memory says so, as AWS Batch does; other failures of
        # the main node give no reason (its exit code says it)
        oom = failed.error if failed and (failed.error or "").startswith(OOM_PREFIX) else None
        return End(JobState.SUCCEEDED if status == 0 else JobState.FAILED, oom)
    if status != 0 and mn.on_child_failure == "terminate":
        return End(JobState.FAILED, f"Child node {node.index} exited with code {status}")
    return None


def time_limit(job: Job) -> float | None:
    """Seconds an attempt may run, from its RUNNING (SPEC §6 "Timeouts"); its timer is
    armed then, for this long."""
    return job.defn.timeout.attempt_duration


def timed_out(job: Job, attempt: Attempt) -> End | None:
    """The attempt's end when its timer fires: FAILED, never retried -- unless it is no
    longer the job's attempt or its end was decided meanwhile."""
    if job.attempt is not attempt or attempt.ending:
        return None
    return End(JobState.FAILED, TIMEOUT_REASON, retry=False)


def after_attempt(job: Job, attempt: Attempt) -> Retry | Finish:
    """Once the attempt is reaped: another attempt (AWS Batch's retry strategy; attempts
    lost to a controller restart do not count, timed-out and terminated ones are never
    retried), or the job's end with the attempt's final state and reason."""
    final = attempt.final or JobState.FAILED
    if (
        final is not JobState.SUCCEEDED
        and attempt.retryable
        and not job.timed_out
        and should_retry(
            job.defn,
            len(job.attempts) - job.bonus_attempts,
            attempt.exit_code,
            attempt.reason or "",
        )
    ):
        return Retry(attempt.reason)
    return Finish(final, attempt.reason)


def final_reason(reason: str | None, note: str | None) -> str | None:
    """A job's last reason: its own, then what went wrong beside it (output lost)."""
    if note is None:
        return reason
    return f"{reason}; {note}" if reason else note


# --- users ------------------------------------------------------------------------


def cancelled(job: Job) -> Sequence[Job]:
    """The jobs ``cancel`` fails: the job, or an array's held children, that wait
    (SUBMITTED/PENDING/RUNNABLE; those never released ended first: ``Job.cut``);
    what runs goes on (AWS Batch)."""
    if job.is_array:
        return [c for c in job.held if c.state in WAITING]
    return [job] if job.state in WAITING else []


def terminated(job: Job) -> list[tuple[Job, bool]]:
    """What ``terminate`` of ``job`` does, in order (its children, then itself):
    (job, True) ends a STARTING/RUNNING job's attempt, (job, False) fails a job that
    has not run. An array parent fails only through its children."""
    steps: list[tuple[Job, bool]] = []
    for j in (*job.held, job):
        if j.done:
            continue
        if j.state in (JobState.STARTING, JobState.RUNNING) and j.attempt is not None:
            steps.append((j, True))
        elif not j.is_array:
            steps.append((j, False))
    return steps
