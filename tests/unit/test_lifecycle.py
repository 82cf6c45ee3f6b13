"""The job lifecycle's rules as tables (``mnp.sched.lifecycle``): dependencies, array
admission, SEQUENTIAL and N_TO_N, retries, timeouts, multi-node ends, cancel and
terminate cascades. Records are built by hand; nothing runs, nothing sleeps."""

from __future__ import annotations

from typing import Any

import pytest

from mnp.jobs import TIMEOUT_REASON, Attempt, Job, NodeRun, TaskRun
from mnp.model import JobState
from mnp.sched import lifecycle as lc
from mnp.sched.lifecycle import End, Fail, Finish, Ready, Retry, Wait
from mnp.spec import parse_definition

S = JobState


def defn(**fields: Any) -> Any:
    return parse_definition({"name": "j", "command": ["true"], **fields}, "j.toml")


def job(job_id: str = "9", state: JobState = S.PENDING, **fields: Any) -> Job:
    return Job(job_id, defn(**fields), 1, lambda e: None, 0.0, state=state)


def array(size: int, *, parallelism: int | None = None, sequential: bool = False) -> Job:
    arr: dict[str, Any] = {"size": size, "sequential": sequential}
    if parallelism is not None:
        arr["parallelism"] = parallelism
    parent = job("5", array=arr)
    parent.children = [
        Job(f"5:{i}", parent.defn, 2 + i, lambda e: None, 0.0, parent=parent, array_index=i)
        for i in range(size)
    ]
    for c in parent.children:
        c.state = S.PENDING
    parent.ready = True
    return parent


# --- dependencies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deps", "states", "want"),
    [
        ([], {}, Ready()),
        (["1"], {"1": S.SUCCEEDED}, Ready()),
        (["1"], {"1": S.RUNNING}, Wait("1")),
        (["1"], {"1": S.RUNNABLE}, Wait("1")),
        (["1"], {"1": S.FAILED}, Fail("Dependent job 1 failed")),
        (["1:afterany"], {"1": S.FAILED}, Ready()),
        (["1:afterany"], {"1": S.RUNNING}, Wait("1")),
        (["1"], {}, Ready()),  # purged: it ended long ago
        (["1", "2"], {"1": S.SUCCEEDED, "2": S.PENDING}, Wait("2")),
        (["1", "2"], {"1": S.FAILED, "2": S.PENDING}, Fail("Dependent job 1 failed")),
        (["1", "2"], {"1": S.PENDING, "2": S.FAILED}, Wait("1")),  # first unmet first
    ],
)
def test_release(deps: list[str], states: dict[str, JobState], want: object) -> None:
    j = job(depends_on=deps)
    assert lc.release(j, states.get) == want


def test_n_to_n_children_wait_on_their_peer_and_the_parent_on_plain_dependencies() -> None:
    parent = array(3)
    parent.defn = defn(array={"size": 3}, depends_on=["1:N_TO_N", "2"])
    for c in parent.children:
        c.defn = parent.defn
    assert lc.dependency_targets(parent) == [("2", False)]
    assert lc.dependency_targets(parent.children[1]) == [("1:1", False)]
    states = {"1:1": S.FAILED, "1:2": S.SUCCEEDED}
    assert lc.release(parent.children[1], states.get) == Fail("Dependent job 1:1 failed")
    assert lc.release(parent.children[2], states.get) == Ready()


# --- arrays -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "parallelism", "sequential", "admitted", "finished", "room"),
    [
        (5, None, False, 0, 0, 5),
        (5, None, False, 5, 0, 0),
        (5, 2, False, 0, 0, 2),
        (5, 2, False, 2, 0, 0),
        (5, 2, False, 2, 1, 1),
        (5, 2, False, 4, 3, 1),
        (5, 2, False, 5, 3, 0),  # none left
        (5, None, True, 0, 0, 1),
        (5, None, True, 1, 0, 0),
        (5, None, True, 1, 1, 1),
    ],
)
def test_room(
    size: int, parallelism: int | None, sequential: bool, admitted: int, finished: int, room: int
) -> None:
    parent = array(size, parallelism=parallelism, sequential=sequential)
    parent.admitted, parent.finished = admitted, finished
    assert lc.room(parent) == room


def test_no_room_before_the_parent_is_ready() -> None:
    parent = array(3)
    parent.ready = False
    assert lc.room(parent) == 0


def test_a_failed_sequential_child_dooms_the_pending_rest() -> None:
    parent = array(4, sequential=True)
    parent.admitted = 2
    parent.children[0].state = S.SUCCEEDED
    parent.children[1].state = S.FAILED
    assert lc.never_run(parent, S.FAILED) == parent.children[2:]
    assert lc.never_run(parent, S.SUCCEEDED) is None
    assert lc.never_run(array(4), S.FAILED) is None  # not sequential: the rest go on


@pytest.mark.parametrize(
    ("children", "want", "code"),
    [
        ([("S", 0, 1)] * 3, Finish(S.SUCCEEDED, None), 0),
        ([("S", 0, 1), ("F", 3, 1), ("F", 4, 1)], Finish(S.FAILED, "Array child 5:1 failed"), 3),
        ([("F", None, 0)] * 2, Finish(S.FAILED, "Cancelled"), None),  # never ran: its reason
    ],
)
def test_array_outcome(
    children: list[tuple[str, int | None, int]], want: Finish, code: int | None
) -> None:
    parent = array(len(children))
    for c, (st, exit_code, attempts) in zip(parent.children, children, strict=True):
        c.state = S.SUCCEEDED if st == "S" else S.FAILED
        c.exit_code = exit_code
        c.reason = "Cancelled" if st == "F" and not attempts else None
        c.attempts = [Attempt(1)] * attempts
    parent.finished = len(children)
    assert lc.array_outcome(parent) == want
    assert lc.array_exit_code(parent) == code


def test_no_array_outcome_while_children_run() -> None:
    parent = array(3)
    parent.finished = 2
    assert lc.array_outcome(parent) is None


# --- attempts -----------------------------------------------------------------------


def attempt_of(j: Job, final: JobState | None = None, **fields: Any) -> Attempt:
    a = Attempt(len(j.attempts) + 1, final=final, **fields)
    j.attempts.append(a)
    return a


@pytest.mark.parametrize(
    ("fields", "attempts", "final", "code", "reason", "retryable", "timed_out", "want"),
    [
        ({}, 1, S.SUCCEEDED, 0, None, True, False, Finish(S.SUCCEEDED, None)),
        ({}, 1, S.FAILED, 1, None, True, False, Finish(S.FAILED, None)),  # attempts = 1
        ({"retry": {"attempts": 3}}, 1, S.FAILED, 1, None, True, False, Retry(None)),
        ({"retry": {"attempts": 3}}, 3, S.FAILED, 1, None, True, False, Finish(S.FAILED, None)),
        ({"retry": {"attempts": 3}}, 1, S.FAILED, 1, "x", False, False, Finish(S.FAILED, "x")),
        ({"retry": {"attempts": 3}}, 1, S.FAILED, None, TIMEOUT_REASON, False, True,
         Finish(S.FAILED, TIMEOUT_REASON)),
        ({"retry": {"attempts": 3, "evaluate_on_exit": [
            {"on_exit_code": "137", "action": "RETRY"}, {"on_exit_code": "*", "action": "EXIT"}]}},
         1, S.FAILED, 2, None, True, False, Finish(S.FAILED, None)),
        ({"retry": {"attempts": 3, "evaluate_on_exit": [
            {"on_exit_code": "137", "action": "RETRY"}, {"on_exit_code": "*", "action": "EXIT"}]}},
         1, S.FAILED, 137, None, True, False, Retry(None)),
        ({"retry": {"attempts": 2, "evaluate_on_exit": [
            {"on_reason": "Host lost*", "action": "RETRY"}, {"on_reason": "*", "action": "EXIT"}]}},
         1, S.FAILED, None, "Host lost: n1", True, False, Retry("Host lost: n1")),
        # on_status_reason: a glob on the attempt's status reason, with the other globs
        ({"retry": {"attempts": 3, "evaluate_on_exit": [
            {"on_status_reason": "Memory limit*", "action": "EXIT"}]}},
         1, S.FAILED, 137, "Memory limit exceeded: 2GiB", True, False,
         Finish(S.FAILED, "Memory limit exceeded: 2GiB")),
        ({"retry": {"attempts": 3, "evaluate_on_exit": [
            {"on_status_reason": "Memory limit*", "action": "EXIT"}]}},
         1, S.FAILED, 137, "Host lost: n1", True, False, Retry("Host lost: n1")),
        ({"retry": {"attempts": 3, "evaluate_on_exit": [
            {"on_exit_code": "1", "on_status_reason": "Host lost*", "action": "RETRY"},
            {"on_exit_code": "*", "action": "EXIT"}]}},
         1, S.FAILED, 2, "Host lost: n1", True, False, Finish(S.FAILED, "Host lost: n1")),
    ],
)  # fmt: skip
def test_after_attempt(
    fields: dict[str, Any],
    attempts: int,
    final: JobState,
    code: int | None,
    reason: str | None,
    retryable: bool,
    timed_out: bool,
    want: object,
) -> None:
    j = job(**fields)
    j.timed_out = timed_out
    for _ in range(attempts - 1):
        attempt_of(j, S.FAILED)
    a = attempt_of(j, final, exit_code=code, reason=reason, retryable=retryable)
    assert lc.after_attempt(j, a) == want


def test_attempts_lost_to_a_restart_do_not_count() -> None:
    j = job(retry={"attempts": 2})
    attempt_of(j, S.FAILED)  # lost when the controller restarted
    j.bonus_attempts = 1
    a = attempt_of(j, S.FAILED, exit_code=1)
    assert lc.after_attempt(j, a) == Retry(None)


@pytest.mark.parametrize(
    ("reason", "note", "want"),
    [(None, None, None), ("r", None, "r"), (None, "n", "n"), ("r", "n", "r; n")],
)
def test_final_reason(reason: str | None, note: str | None, want: str | None) -> None:
    assert lc.final_reason(reason, note) == want


def test_timeout_ends_the_current_attempt_only() -> None:
    j = job(timeout={"attempt_duration": "5s"})
    assert lc.time_limit(j) == 5.0
    old = attempt_of(j, S.FAILED)
    current = attempt_of(j)
    assert lc.timed_out(j, old) is None
    assert lc.timed_out(j, current) == End(S.FAILED, TIMEOUT_REASON, retry=False)
    current.final = S.SUCCEEDED  # its end was decided meanwhile
    assert lc.timed_out(j, current) is None
    assert lc.time_limit(job()) is None


# --- task exits ---------------------------------------------------------------------


def test_a_single_jobs_task_decides_by_its_exit_code() -> None:
    j = job()
    a = attempt_of(j)
    ok = TaskRun("9", "h", exit_code=0, exited_at=1.0)
    bad = TaskRun("9", "h", exit_code=3, exited_at=1.0, error=None)
    assert lc.task_ended(j, a, ok) == End(S.SUCCEEDED, None)
    assert lc.task_ended(j, a, bad) == End(S.FAILED, None)
    a.final = S.FAILED  # already ending (terminated): nothing more to decide
    assert lc.task_ended(j, a, ok) is None


def multinode(on_child_failure: str = "ignore", tasks: int = 1) -> tuple[Job, Attempt]:
    j = job(
        type="multinode",
        multinode={
            "num_nodes": 3,
            "on_child_failure": on_child_failure,
            "groups": [{"target_nodes": "0:2", "tasks_per_node": tasks}],
        },
    )
    a = attempt_of(j)
    for i in range(3):
        node = NodeRun(j, i, f"h{i}", 0, False)
        node.tasks = [
            TaskRun(f"9#{i}.{t}", f"h{i}", node_index=i, task_index=t) for t in range(tasks)
        ]
        a.nodes.append(node)
    return j, a


def exit_task(task: TaskRun, code: int | None, signal: int | None = None) -> TaskRun:
    task.exit_code, task.signal, task.exited_at = code, signal, 1.0
    return task


@pytest.mark.parametrize(
    ("policy", "node", "code", "signal", "want"),
    [
        ("ignore", 0, 0, None, End(S.SUCCEEDED)),
        ("ignore", 0, 2, None, End(S.FAILED)),
        ("ignore", 0, None, 9, End(S.FAILED)),
        ("ignore", 1, 5, None, None),  # a child's failure changes nothing
        ("ignore", 1, 0, None, None),
        ("terminate", 1, 5, None, End(S.FAILED, "Child node 1 exited with code 5")),
        ("terminate", 2, None, 9, End(S.FAILED, "Child node 2 exited with code 137")),
        ("terminate", 1, 0, None, None),
    ],
)
def test_multinode_node_ends(
    policy: str, node: int, code: int | None, signal: int | None, want: End | None
) -> None:
    j, a = multinode(policy)
    task = exit_task(a.nodes[node].tasks[0], code, signal)
    assert lc.task_ended(j, a, task) == want


def test_a_node_ends_when_all_its_tasks_have_and_takes_the_first_failure() -> None:
    j, a = multinode(tasks=3)
    main = a.nodes[0]
    exit_task(main.tasks[0], 0)
    assert lc.task_ended(j, a, main.tasks[0]) is None  # two tasks still run
    exit_task(main.tasks[2], 4)
    exit_task(main.tasks[1], 6)
    assert lc.node_result(main) == (6, None, main.tasks[1])
    assert lc.task_ended(j, a, main.tasks[1]) == End(S.FAILED)


# --- users --------------------------------------------------------------------------


def test_cancel_fails_what_waits_and_leaves_what_runs() -> None:
    parent = array(4)
    states = [S.RUNNING, S.RUNNABLE, S.PENDING, S.SUCCEEDED]
    for c, st in zip(parent.children, states, strict=True):
        c.state = st
    assert lc.cancelled(parent) == parent.children[1:3]
    queued = job(state=S.RUNNABLE)
    assert lc.cancelled(queued) == [queued]
    assert lc.cancelled(job(state=S.STARTING)) == []


def test_terminate_ends_running_attempts_and_fails_the_rest_children_first() -> None:
    parent = array(3)
    running, queued, done = parent.children
    running.state = S.RUNNING
    attempt_of(running)
    queued.state = S.RUNNABLE
    done.state = S.SUCCEEDED
    assert lc.terminated(parent) == [(running, True), (queued, False)]  # the parent: via them
    single = job(state=S.STARTING)
    attempt_of(single)
    assert lc.terminated(single) == [(single, True)]
    pending = job(state=S.PENDING)
    assert lc.terminated(pending) == [(pending, False)]


# --- sparse arrays: children released as the window allows -------------------------


def test_an_array_without_parallelism_keeps_AHEAD_children_waiting() -> None:
    parent = array(2)
    parent.children = []  # none has its object yet: a range
    parent.defn = defn(array={"size": 100_000})
    assert lc.room(parent) == lc.AHEAD
    parent.admitted, parent.waiting = lc.AHEAD, lc.AHEAD
    assert lc.room(parent) == 0  # all released ones wait to be placed
    parent.waiting = lc.AHEAD - 10  # 10 of them were placed
    assert lc.room(parent) == 10
    parent.admitted, parent.waiting = 100_000 - 3, 0
    assert lc.room(parent) == 3  # no more than are left


def test_children_held_past_the_frontier_do_not_count_as_released() -> None:
    parent = array(2)
    parent.defn = defn(array={"size": 1000})
    parent.children = [
        Job(f"5:{i}", parent.defn, 2 + i, lambda e: None, 0.0, parent=parent, array_index=i)
        for i in range(1000)
    ]
    parent.admitted, parent.waiting = 10, 1000  # looked at: every child has its object
    assert lc.room(parent) == lc.AHEAD - 10


def test_only_a_failed_sequential_child_stops_admission() -> None:
    seq = array(3, sequential=True)
    assert lc.stops_admission(seq, S.FAILED)
    assert not lc.stops_admission(seq, S.SUCCEEDED)
    assert not lc.stops_admission(array(3), S.FAILED)
    assert lc.array_size(seq) == 3
    assert lc.array_size(seq.children[0]) == 0  # a child is no array
