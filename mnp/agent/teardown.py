"""How a task is torn down, and every other kill the agent does (`kill`, `sweep`,
`stale`, shutdown, an orphan no task owns): the teardowns in progress, and the /proc
scan that drives them.

A teardown SIGTERMs what it must kill, SIGKILLs what is left after its grace, and is
finished when a scan finds nothing (and its task's main process is reaped); then it
replies (`gone`, `swept`, `stale`). One scan a tick serves every teardown in progress;
ticks are spaced by the CPU time the last scan took.

Besides processes a teardown may have more to remove (a task's container, its cgroup):
that is a `Step`, registered in `Teardowns.steps`, called at the teardown's start, at
each scan, and at its end. The tick and the reap loop do not change for a new step.
"""

from __future__ import annotations

import signal
import time

from .proc import agent_alive, job_part, send, send_group, snapshot
from .tasks import FIRST_CHECK, MAX_CHECK, Teardown, targets

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Callable, Dict, List, Optional, Sequence

    from .agent import Agent
    from .loop import Timer
    from .proc import Proc, Snapshot
    from .sweep import StaleRule
    from .tasks import Task


GIVE_UP = 5.0  # seconds after SIGKILL before a teardown reports survivors and ends
PRE_WAIT = 0.05  # how long a teardown waits for a main process it sent SIGTERM to die


class Step:
    """One more thing teardowns do besides signalling processes: e.g. removing a task's
    container (`podman rm`) on its teardown and a job's on its `sweep`, or those labelled
    with a stale agent on `stale`; or removing a task's cgroup. `td.kind` says which
    teardown it is ("task", "tag", "sweep", "stale", "all", "stray"), `td.name` the tid
    or job part, `td.rule` the stale sweep's rule. The base class does nothing."""

    def begin(self, td: Teardown) -> None:
        """The teardown starts (its task's group had SIGTERM already, if it runs)."""

    def seeds(self, td: Teardown, snap: Snapshot) -> Sequence[int]:
        """More processes (and their trees) the teardown must kill, found in `snap`."""
        return ()

    def spare(self, td: Teardown, found: Dict[int, Proc], snap: Snapshot, killing: bool) -> None:
        """Take out of `found` (what the teardown would signal now) what it must not
        signal (`killing`: it sends SIGKILL now, else SIGTERM)."""

    def spares_group(self, task: Task) -> bool:
        """True when the task's process group must not get a teardown's SIGTERM (what
        runs in it ends by other means; SIGKILL time still kills it)."""
        return False

    def pending(self, td: Teardown) -> bool:
        """True while the teardown must not finish yet (something still being removed);
        the scans go on, backing off, until it says False. Must not block."""
        return False

    def end(self, td: Teardown) -> int:
        """The teardown finishes (nothing of it is left), before its reply, or is dropped
        (a tag sweep a new spawn of its tid cuts short). Returns how many things it
        removed: they count in the reply's `killed`."""
        return 0


class Teardowns:
    """The teardowns in progress (by key: "t:TID", "s:JOB", "stale", "*", "o:PID"), and
    the tick that scans /proc for them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.active: Dict[str, Teardown] = {}
        self.steps: List[Step] = []
        self.tick_timer: Optional[Timer] = None
        self.last_tick = 0.0
        self.tick_gap = FIRST_CHECK

    def start(
        self,
        key: str,
        kind: str,
        name: str,
        task: Optional[Task],
        grace: float,
        termed: Sequence[Task] = (),
        rule: Optional[StaleRule] = None,
    ) -> Teardown:
        """Start (or hurry) a teardown. `termed`: tasks whose groups were just sent SIGTERM
        on its behalf (a sweep's own tasks; at shutdown, the "all" teardown's)."""
        now = time.monotonic()
        kill_at = now + grace
        td = self.active.get(key)
        if td is not None:
            td.kill_at = min(td.kill_at, kill_at)
            td.next_check = 0.0
        else:
            td = self.active[key] = Teardown(key, kind, name, task, kill_at)
            td.rule = rule
            if task is not None:
                task.teardown = td
                td.kill_at = min(td.kill_at, task.deadline)  # a sweep's, if sooner
                if not task.reaped:
                    # SIGTERM its group now, before any scan
                    self.term_group(task)
                    termed = (task,)
                elif task.termed:
                    td.quiet.add(task.pid)
            # a main process just sent SIGTERM is given PRE_WAIT to die before the first
            # scan (its reap cuts the wait short): the one scan then finds it gone
            td.next_check = now + PRE_WAIT if termed else 0.0
            for step in self.steps:
                step.begin(td)
        for t in termed:
            td.quiet.add(t.pid)
            td.pre.add(t.pid)
        self.soon(min(td.next_check, td.kill_at))
        return td

    def term_group(self, task: Task) -> None:
        """SIGTERM the task's process group, once (unless a step spares it); no teardown
        signals its members again."""
        if not task.termed:
            if not any(step.spares_group(task) for step in self.steps):
                send_group(task.pid, signal.SIGTERM)
            task.termed = True
            for td in self.active.values():
                td.quiet.add(task.pid)

    def reaped(self) -> None:
        """A child was reaped: look again now, not after the back-off; a teardown that
        has not scanned yet waits until every main process it sent SIGTERM to is reaped."""
        if not self.active:
            return
        by_pid = self.agent.by_pid
        for td in self.active.values():
            if td.steps or not any(pid in by_pid for pid in td.pre):
                td.next_check = 0.0
        self.soon()

    def soon(self, at: float = 0.0) -> None:
        """Scan at `at` or as soon after as allowed: scans are spaced by twice the CPU time
        the last one took (and 5 ms), so teardowns never take more than a third of the
        agent's time."""
        loop = self.agent.loop
        when = max(at, time.monotonic(), self.last_tick + self.tick_gap)
        if self.tick_timer is not None:
            if self.tick_timer[0] <= when:
                return
            loop.cancel(self.tick_timer)
        self.tick_timer = loop.call_at(when, self.tick)

    def tick(self) -> None:
        """One /proc scan, then every teardown due takes its next step."""
        self.tick_timer = None
        if not self.active:
            return
        cpu = time.process_time()
        snap = snapshot(self.agent.tagger)
        now = time.monotonic()
        self.last_tick = now
        # spaced by the scan's CPU time, not its wall time: on a busy machine the wall
        # time is mostly waiting for a core, and the gap would balloon with it
        self.tick_gap = max(FIRST_CHECK, 2 * (time.process_time() - cpu))
        for td in list(self.active.values()):
            if td.next_check <= now or (td.killing_since is None and td.kill_at <= now):
                self._step(td, snap, now)
        if self.active:
            when = min(
                td.next_check if td.killing_since is not None else min(td.next_check, td.kill_at)
                for td in self.active.values()
            )
            loop = self.agent.loop
            loop.cancel(self.tick_timer)  # one a step may have set (a new teardown)
            self.tick_timer = loop.call_at(max(when, now + self.tick_gap), self.tick)

    def _step(self, td: Teardown, snap: Snapshot, now: float) -> None:
        td.steps += 1
        found = self.targets_of(td, snap)
        task = td.task
        killing = td.kill_at <= now
        if killing:
            if td.killing_since is None:
                td.killing_since = now
                td.delay = FIRST_CHECK
            if task is not None and not td.group_gone:
                send_group(task.pid, signal.SIGKILL)
            for p in found.values():
                send(p.pid, signal.SIGKILL)
                td.signalled.add((p.pid, p.start))
        else:
            if task is not None and not td.group_gone and not task.termed:
                self.term_group(task)
            for p in found.values():
                ident = (p.pid, p.start)
                if ident not in td.termed:
                    if p.pgrp not in td.quiet:  # else its group had SIGTERM just now
                        send(p.pid, signal.SIGTERM)
                    if p.state == "T":
                        send(p.pid, signal.SIGCONT)
                    td.termed.add(ident)
                    td.signalled.add(ident)
        td.quiet.clear()
        if (
            not found
            and (task is None or task.reaped)
            and not any(step.pending(td) for step in self.steps)
        ):
            self._finish(td)
            return
        if td.killing_since is not None and now - td.killing_since > GIVE_UP:
            self._error(
                td,
                "%d processes survived SIGKILL: %s"
                % (len(found), " ".join(str(p) for p in sorted(found))),
            )
            self._finish(td)
            return
        td.next_check = now + td.delay
        td.delay = min(td.delay * 2, MAX_CHECK)

    def targets_of(self, td: Teardown, snap: Snapshot) -> Dict[int, Proc]:
        """What `td` must kill now: its processes in `snap`, the adopted orphans that are
        its to kill, and what its steps add."""
        agent = self.agent
        agent.discover(snap)
        extra: List[int] = []
        if td.kind == "task":
            extra = agent.orphan_seeds({td.name}, snap)
        elif td.kind == "sweep":
            tids = {t.tid for t in agent.tasks.values() if job_part(t.tid) == td.name}
            extra = agent.orphan_seeds(tids, snap) if tids else []
        elif td.kind == "stray":
            o = agent.orphans.get(int(td.name))
            p = snap.procs.get(o.pid) if o is not None else None
            if o is not None and p is not None and p.start == o.start and not o.owners:
                extra = [o.pid]
        for step in self.steps:
            extra.extend(step.seeds(td, snap))
        found = targets(
            td, snap, agent.pid, agent.tasks.values(), agent.all_tids, extra, self._foreign(snap)
        )
        killing = td.kill_at <= time.monotonic()
        for step in self.steps:
            step.spare(td, found, snap, killing)
        return found

    def _foreign(self, snap: Snapshot) -> Callable[[int], bool]:
        """Whether a process is the task of another agent that runs on this machine (its
        `MNP_AGENT_ID` names a live agent of this boot and pid namespace, not this one)."""
        me = self.agent.identity
        here = me.split(":", 1)[0]

        def foreign(pid: int) -> bool:
            other = snap.agents.get(pid)
            if other is None or other == me:
                return False
            return agent_alive(other, here, snap.procs) is True

        return foreign

    def drop(self, td: Teardown) -> None:
        """SIGKILL at once what a tag sweep found, and forget it: a new task of that tid
        is about to carry the same tag."""
        for p in self.targets_of(td, snapshot(self.agent.tagger)).values():
            send(p.pid, signal.SIGKILL)
        for step in self.steps:
            step.end(td)
        del self.active[td.key]

    def _finish(self, td: Teardown) -> None:
        del self.active[td.key]
        # what it signalled, and the main processes it SIGTERMed before any scan saw them
        killed = len(td.signalled) + len(td.pre - {pid for pid, _ in td.signalled})
        for step in self.steps:
            killed += step.end(td)
        out = self.agent.out
        if td.kind == "task" and td.task is not None:
            td.task.teardown = None
            if not td.task.gone:
                self.agent.gone(td.task, killed)
        elif td.kind == "tag":
            out.emit({"ev": "gone", "tid": td.name, "t": time.time(), "killed": killed})
        elif td.kind == "sweep":
            out.emit({"ev": "swept", "job": td.name, "t": time.time(), "killed": killed})
        elif td.kind == "stale":
            out.emit({"ev": "stale", "t": time.time(), "killed": killed})

    def _error(self, td: Teardown, text: str) -> None:
        event: Dict[str, Any] = {"ev": "error", "msg": text}
        if td.kind in ("task", "tag"):
            event["tid"] = td.name
        self.agent.out.emit(event)
