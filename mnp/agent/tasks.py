"""What the agent keeps about a task, and about killing a set of processes."""

from __future__ import annotations

from .proc import job_part

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Callable, Collection, Dict, Iterable, List, Optional, Set, Tuple

    from .limits import TaskLimits
    from .loop import Feeder, Stream
    from .proc import Proc, Snapshot
    from .sweep import StaleRule


FIRST_CHECK = 0.005  # a teardown looks again after this, doubling up to MAX_CHECK
MAX_CHECK = 0.2
INF = float("inf")


class Task:
    __slots__ = (
        "tid",
        "pid",
        "streams",
        "feeder",
        "reaped",
        "teardown",
        "gone",
        "termed",
        "deadline",
        "born",
        "born_ticks",
        "pipes",
        "limits",
    )

    def __init__(
        self,
        tid: str,
        pid: int,
        streams: List[Stream],
        feeder: Optional[Feeder],
        born: float = 0.0,
        born_ticks: int = 0,
        pipes: Optional[Set[int]] = None,
    ):
        self.tid = tid
        self.born = born  # time.monotonic() at spawn
        self.born_ticks = born_ticks  # proc.now_ticks() just before the spawn
        self.pipes = pipes or set()  # inodes of its stdout and stderr pipes
        self.pid = pid  # also its session and process group id
        self.streams = streams
        self.feeder = feeder
        self.reaped = False
        self.teardown: Optional[Teardown] = None
        self.gone = False
        self.termed = False  # its process group was sent SIGTERM (a `kill` or `sweep`)
        self.deadline = INF  # a sweep's: SIGKILL what is left of it by then
        self.limits: Optional[TaskLimits] = None  # its memory limit and CPUs (limits.py)


class Orphan:
    """A process the agent adopted (its parent died; the agent is the subreaper), and
    the tasks it may belong to: one when its session, process group, tag or output
    pipes say whose it is; otherwise every task that could have started it (started
    before it), those whose main process had just ended first. It dies with the last
    of its owners to end -- never while a task it may belong to still runs -- and at
    once when it has none (what is left of tasks that are over)."""

    __slots__ = ("pid", "start", "owners")

    def __init__(self, pid: int, start: int, owners: Set[str]) -> None:
        self.pid = pid
        self.start = start
        self.owners = owners


class Teardown:
    """Killing a set of processes: SIGTERM what matches, SIGKILL it after `grace`,
    finished when a scan finds nothing (and the task's main process is reaped). A
    `kill` sends its task's process group SIGTERM at once, before the first scan, and so
    does a `sweep` to the groups of its tasks that run for a while; the first scan then
    waits (a little) for their main processes to be reaped."""

    def __init__(self, key: str, kind: str, name: str, task: Optional[Task], kill_at: float):
        self.key = key
        # "task", "tag" (a tid with no task here), "sweep", "stale", "all", "stray" (an
        # adopted orphan that no task could own: name is its pid)
        self.kind = kind
        self.name = name  # tid, or job part for "sweep"
        self.task = task
        self.kill_at = kill_at
        self.killing_since: Optional[float] = None
        self.group_gone = False
        self.termed: Set[Tuple[int, int]] = set()
        # groups sent SIGTERM as a whole just before: the next step counts their members
        # as termed instead of signalling each again
        self.quiet: Set[int] = set()
        self.pre: Set[int] = set()  # main processes SIGTERMed (with their group) before a scan
        self.signalled: Set[Tuple[int, int]] = set()
        self.delay = FIRST_CHECK
        self.next_check = 0.0
        self.steps = 0
        self.rule: Optional[StaleRule] = None  # kind "stale" only


def targets(
    td: Teardown,
    snap: Snapshot,
    agent_pid: int,
    tasks: Iterable[Task],
    all_tids: Collection[str],
    extra: Iterable[int] = (),
    foreign: Optional[Callable[[int], bool]] = None,
) -> Dict[int, Proc]:
    """The live processes `td` must kill now, according to `snap`; `extra`: more seeds
    (the adopted orphans that are the teardown's to kill). `foreign(pid)`: whether a
    process found by its tid tag is another running agent's task on this machine (a
    retry of the same tid that a restarted controller had a new agent start while this
    one still tears down): a task's, a `kill`'s and the agent's last teardown leave it
    alone. (A job's `sweep` does not ask: the ranks an MPI launcher starts over SSH
    carry the main node's tags.)"""
    seeds: List[int] = list(extra)

    def ours(pids: Iterable[int]) -> Iterable[int]:
        return pids if foreign is None else [p for p in pids if not foreign(p)]

    if td.kind in ("task", "tag"):
        task = td.task
        if task is not None:
            if not task.reaped:
                seeds.append(task.pid)
            members = snap.by_group.get(task.pid)
            if members and not td.group_gone:
                seeds.extend(members)
            elif task.reaped:
                # the group emptied: its number may now name someone else's group
                td.group_gone = True
        seeds.extend(ours(snap.by_tag.get(td.name, ())))
    elif td.kind == "sweep":
        for tag, pids in snap.by_tag.items():
            if job_part(tag) == td.name:
                seeds.extend(pids)
        for task in tasks:
            if job_part(task.tid) == td.name and not task.reaped:
                seeds.append(task.pid)
                seeds.extend(snap.by_group.get(task.pid, ()))
    elif td.kind == "stale":
        rule = td.rule
        assert rule is not None
        own = {t.pid for t in tasks if not t.gone}
        for pid, tag in snap.tags.items():
            if rule.stale(snap.procs[pid], tag, snap, own):
                seeds.append(pid)
    elif td.kind == "stray":
        pass  # its one process is in `extra`
    else:  # all: every child of the agent, and every tag it ever gave
        seeds.extend(snap.children.get(agent_pid, ()))
        for tag, pids in snap.by_tag.items():
            if tag in all_tids:
                seeds.extend(ours(pids))
    return snap.tree(seeds)
