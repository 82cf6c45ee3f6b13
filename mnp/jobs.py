"""Runtime records of jobs, attempts, nodes and tasks, and their state changes.

The controller owns these objects; every state change goes through
``Job.set_state`` (or ``NodeRun.set_state``) so that each one is timed and
reported as exactly one event (SPEC §6 "Events").
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mnp.model import TERMINAL, Grant, JobDefinition, JobState, JobType, Request
from mnp.pmi.world import World
from mnp.wiring import Launch

WAITING = frozenset({JobState.SUBMITTED, JobState.PENDING, JobState.RUNNABLE})
"""States of a job that has not been placed (``cancel`` ends these)."""

Emit = Callable[[dict[str, Any]], None]

TIMEOUT_REASON = "Job attempt duration exceeded timeout"


def printable(text: str | None) -> str | None:
    """``text`` as valid Unicode: bytes that were not UTF-8 (a path or an argument, kept
    as surrogate escapes) are written ``\\xNN``. Reasons are stored and shown as text."""
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape" if _escapable(text) else "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")
    return text


def _escapable(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


@dataclass(slots=True)
class TaskRun:
    """One process tree started by an agent."""

    tid: str
    host: str
    node_index: int | None = None
    task_index: int = 0
    pid: int | None = None
    started_at: float | None = None
    exited_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    gone: bool = False
    # what it used, from the agent's `exited` (PROTOCOL.md): max_rss_bytes, cpu_seconds
    usage: dict[str, Any] | None = None

    @property
    def exited(self) -> bool:
        return self.exited_at is not None


@dataclass(slots=True)
class NodeRun:
    """One node of a multi-node attempt."""

    job: Job
    index: int
    host: str
    group: int
    held: bool  # no command: held for the main node's use
    state: JobState = JobState.STARTING
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    tasks: list[TaskRun] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.job.id}#{self.index}"

    def set_state(self, state: JobState, now: float, reason: str | None = None) -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        reason = printable(reason)
        self.reason = reason or self.reason
        self.job.emit_change(
            self.id, state, previous, now, reason, self.exit_code, node_index=self.index
        )


@dataclass(slots=True)
class Attempt:
    number: int
    ce: str = ""
    grants: tuple[Grant, ...] = ()
    launch: Launch | None = None
    placed_at: float | None = None
    running_at: float | None = None  # every node (or the task) RUNNING
    main_exit_at: float | None = None
    reaped_at: float | None = None  # every process gone
    stopped_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    final: JobState | None = None  # decided when its end began
    retryable: bool = True
    tasks: dict[str, TaskRun] = field(default_factory=dict)
    nodes: list[NodeRun] = field(default_factory=list)
    pending_sweeps: set[str] = field(default_factory=set)
    secrets: dict[str, str] = field(default_factory=dict)  # read at launch; never stored
    mpi: World | None = None  # its MPI ranks' world (direct MPI launch); never stored
    port_key: str | None = None  # MASTER_PORT comes from the main node's agent (its spawns' key)

    @property
    def ending(self) -> bool:
        return self.final is not None

    def usage(self) -> dict[str, dict[str, Any]] | None:
        """What each task of the attempt used (by tid), as its agent reported at its
        exit; None before any task exited."""
        out = {tid: t.usage for tid, t in self.tasks.items() if t.usage is not None}
        return out or None

    def timings(self) -> dict[str, float | None]:
        def delta(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(b - a, 6)

        return {
            "placement_to_running": delta(self.placed_at, self.running_at),
            "main_exit_to_reaped": delta(self.main_exit_at, self.reaped_at),
        }


def _no_events(event: dict[str, Any]) -> None:
    """What a job made up for a reader emits: nothing."""


ARRAY_CUT = "array-children-ended"
"""The one event that ends an array's unreleased children, all at once (``Job.cut``):
``array_range`` [first, last], ``count``, ``status`` and ``reason``. ``mnp events``
reads it as each child's FAILED event (``mnp.store.gaps.child_ends``)."""


@dataclass(slots=True)
class Job:
    id: str
    defn: JobDefinition
    seq: int
    emit: Emit
    created: float
    state: JobState = JobState.SUBMITTED
    reason: str | None = None
    parent: Job | None = None
    array_index: int | None = None
    held: list[Job] = field(default_factory=list)
    """An array parent's children that have their object (released, or restored), in
    index order; ``children`` has them all."""
    grow: Callable[[int], Job] | None = None
    """An array parent: gives child ``index`` its object (the controller's ``_new_child``)."""
    attempts: list[Attempt] = field(default_factory=list)
    exit_code: int | None = None
    signal: int | None = None
    started_at: float | None = None
    stopped_at: float | None = None
    timed_out: bool = False
    request: Request | None = None
    admitted: int = 0  # array parent: children released so far (in index order)
    waiting: int = 0  # array parent: children held (in memory) that wait to be placed
    finished: int = 0  # array parent: children that reached a terminal state
    ready: bool = False  # array parent: its own dependencies are met
    cut: int | None = None
    """An array parent: children from this index on ended (FAILED, ``cut_reason``) without
    ever being released: they have no object, row or events of their own."""
    cut_reason: str | None = None
    bonus_attempts: int = 0  # attempts lost to a controller restart: not counted
    note: str | None = None  # added to the final reason (e.g. "Output lost: PATH: ...")

    @property
    def children(self) -> list[Job]:
        """Every child of an array parent, in index order ([] for any other job). Those
        not released yet get their object now, PENDING (``grow``): the controller itself
        reads ``held`` (and ``cut``) instead. Those that ended unreleased (``cut``) are
        made up here, FAILED, for the reader: the controller never holds them."""
        arr = self.defn.array
        held = self.held
        if arr is None or self.parent is not None:
            return held
        if self.grow is not None:
            start = max(self.admitted, (held[-1].array_index or 0) + 1 if held else 0)
            for index in range(start, arr.size):
                self.grow(index)
        if self.cut is None:
            return held
        return held + [self.ended_unreleased(i) for i in range(self.cut, arr.size)]

    @children.setter
    def children(self, value: list[Job]) -> None:
        self.held = value

    def ended_unreleased(self, index: int) -> Job:
        """Child ``index``, one of those that ended unreleased (``cut``), as a job object
        that no controller holds: FAILED for ``cut_reason``, never started."""
        child = Job(
            f"{self.id}:{index}",
            self.defn,
            self.seq + 1 + index,
            _no_events,
            self.created,
            state=JobState.FAILED,
            reason=self.cut_reason,
            parent=self,
            array_index=index,
        )
        child.stopped_at = self.stopped_at
        return child

    @property
    def is_array(self) -> bool:
        return self.defn.array is not None and self.parent is None

    @property
    def is_multinode(self) -> bool:
        return self.defn.type is JobType.MULTINODE

    @property
    def attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def set_state(self, state: JobState, now: float, reason: str | None = None) -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        parent = self.parent
        if parent is not None and (previous in WAITING) is not (state in WAITING):
            parent.waiting += 1 if state in WAITING else -1
        if reason is not None:
            reason = self.reason = printable(reason)
        if state is JobState.RUNNING and self.started_at is None:
            self.started_at = now
        if state in TERMINAL:
            self.stopped_at = now
        self.emit_change(self.id, state, previous, now, reason, self.exit_code)

    def emit_change(
        self,
        job_id: str,
        state: JobState,
        previous: JobState,
        now: float,
        reason: str | None,
        exit_code: int | None,
        node_index: int | None = None,
    ) -> None:
        event: dict[str, Any] = {
            "time": now,
            "type": "job-state-change",
            "job_id": job_id,
            "name": self.defn.name,
            "queue": self.defn.queue,
            "status": state.value,
            "previous": previous.value if previous is not state else None,
            "reason": reason,
            "attempt": len(self.attempts),
            "exit_code": exit_code,
        }
        if node_index is not None:
            event["node_index"] = node_index
        if self.array_index is not None:
            event["array_index"] = self.array_index
        if self.defn.tags:
            event["tags"] = dict(self.defn.tags)
        if state in TERMINAL and node_index is None and self.attempts:
            usage = self.attempts[-1].usage()
            if usage is not None:
                event["usage"] = usage
        self.emit(event)


def should_retry(
    defn: JobDefinition, attempts_made: int, exit_code: int | None, reason: str
) -> bool:
    """AWS Batch's retry strategy: attempts left, then the first matching rule decides;
    a rule matches when its ``on_exit_code``, ``on_reason`` and ``on_status_reason``
    globs all do. mnp keeps one reason per attempt, its status reason (``mnp describe``'s
    ``reason:``): ``on_reason`` and ``on_status_reason`` both match it."""
    if attempts_made >= defn.retry.attempts:
        return False
    code = "" if exit_code is None else str(exit_code)
    for rule in defn.retry.evaluate_on_exit:
        if (
            fnmatch.fnmatchcase(code, rule.on_exit_code)
            and fnmatch.fnmatchcase(reason or "", rule.on_reason)
            and fnmatch.fnmatchcase(reason or "", rule.on_status_reason)
        ):
            return rule.action == "RETRY"
    return True


def exit_status(code: int | None, signal: int | None) -> int:
    """A shell's view of how a process ended: the code, or 128 + signal."""
    if code is not None:
        return code
    if signal is not None:
        return 128 + signal
    return 1


def output_label(job: Job, task: TaskRun) -> str | None:
    """What a task's output lines are prefixed with (``srun -l``): ``N`` for node N,
    ``N.T`` for task T of node N when nodes run several, ``I`` for array child I."""
    if task.node_index is not None:
        mn = job.defn.multinode
        slots = mn is not None and any(g.tasks_per_node > 1 for g in mn.groups)
        return f"{task.node_index}.{task.task_index}" if slots else str(task.node_index)
    if job.array_index is not None:
        return str(job.array_index)
    return None


def job_exit_code(job: Job) -> int:
    """What ``mnp run`` exits with for a job that has ended."""
    from mnp.sink import EXIT_STDOUT_CLOSED, INTERRUPTED, STDOUT_CLOSED

    if job.state is JobState.SUCCEEDED:
        return 0
    if job.timed_out or job.reason == TIMEOUT_REASON:
        return 124
    if job.reason == INTERRUPTED:
        return 130
    if job.reason == STDOUT_CLOSED:
        return EXIT_STDOUT_CLOSED
    if job.is_array:  # those that ended unreleased (``cut``) never ran: no code of theirs
        failed = [c for c in job.held if c.state is JobState.FAILED]
        if any(c.timed_out for c in failed):
            return 124
        codes = [exit_status(c.exit_code, c.signal) for c in failed if c.attempts]
        return next((c for c in codes if c), 1)
    if job.exit_code is None and job.signal is None:
        return 1
    return exit_status(job.exit_code, job.signal) or 1
