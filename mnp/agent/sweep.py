"""The sweeps: `sweep` (every process of a job on this host, e.g. ranks that mpiexec
started over SSH) and `stale` (at connection, what earlier agents and controllers of
this token left behind: `StaleRule` says which). Both are teardowns (teardown.py): a
step added there (containers, cgroups) serves them too, by `td.kind`.
"""

from __future__ import annotations

import time

from .proc import agent_alive, job_part
from .request import BadRequest, grace_of

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Collection, Dict, List, Optional, Set

    from .agent import Agent
    from .proc import Proc, Snapshot
    from .tasks import Task


SETTLED = 0.1  # a sweep SIGTERMs a task of its job before scanning once it ran this long


def op_sweep(agent: Agent, msg: Dict[str, Any]) -> None:
    job = msg.get("job")
    if not isinstance(job, str) or not job:
        raise BadRequest("job must be a non-empty string")
    grace = grace_of(msg, agent.grace)
    kill_at = time.monotonic() + grace
    # the agent's own tasks of the job end as a `kill` with this grace would end them;
    # a teardown already under way keeps its course, with this deadline if sooner.
    # Those that run for SETTLED already get SIGTERM (their group) now, before the
    # first scan; younger ones are left to the scan, whose milliseconds let a task
    # started as the main node exited (`--nodes N -- echo`) finish its output.
    now = time.monotonic()
    termed: List[Task] = []
    for task in agent.tasks.values():
        if task.gone or job_part(task.tid) != job:
            continue
        task.deadline = min(task.deadline, kill_at)  # for its leftovers, if any
        if task.teardown is not None:
            task.teardown.kill_at = min(task.teardown.kill_at, kill_at)
        if task.reaped:
            continue
        if not task.termed and now - task.born >= SETTLED:
            agent.teardowns.term_group(task)
        if task.termed:
            termed.append(task)
    agent.teardowns.start("s:" + job, "sweep", job, None, grace, termed)


def op_stale(agent: Agent, msg: Dict[str, Any]) -> None:
    live = msg.get("live")
    if not (isinstance(live, list) and all(isinstance(j, str) for j in live)):
        raise BadRequest("live must be a list of job ids")
    below = msg.get("below")
    if not isinstance(below, int) or isinstance(below, bool) or below < 0:
        raise BadRequest("below must be an integer >= 0")
    abandoned = msg.get("abandoned")
    if abandoned is None:
        abandoned = []
    if not (isinstance(abandoned, list) and all(isinstance(a, str) for a in abandoned)):
        raise BadRequest("abandoned must be a list of agent identities")
    grace = grace_of(msg, agent.grace)
    old = agent.teardowns.active.get("stale")
    if old is not None:  # the newer list wins; what the old one found is killed at once
        agent.teardowns.drop(old)
    here = agent.identity.split(":", 1)[0]
    rule = StaleRule(set(live), below, here, agent.identity, set(abandoned))
    agent.teardowns.start("stale", "stale", "", None, grace, rule=rule)


class StaleRule:
    """Which processes carrying this controller's token a new agent sweeps at start:
    those of a job the controller no longer runs (a number below `below` that is not in
    `live`), those whose agent (`MNP_AGENT_ID`) was `here` (this agent's boot and pid
    namespace) and is gone, and those whose agent is in `abandoned` (agents the
    controller gave up on: hung, not answering). Never a process this agent started
    (`me`, its own identity), nor one in the session of a task of this agent: whatever
    `live` says, what the agent spawned -- before or after the `stale` -- is an attempt
    the controller started."""

    def __init__(
        self,
        live: Set[str],
        below: int,
        here: str,
        me: str = "",
        abandoned: Optional[Set[str]] = None,
    ) -> None:
        self.live = live
        self.below = below
        self.here = here
        self.me = me
        self.abandoned = abandoned or set()

    def stale(self, p: Proc, tag: str, snap: Snapshot, own: Collection[int] = ()) -> bool:
        if p.sid in own:
            return False  # a task of this agent (or what it started in its session)
        agent = snap.agents.get(p.pid)  # read with its tag
        if agent is not None and self.me and agent == self.me:
            return False
        job = job_part(tag)
        if job not in self.live and job.isdigit() and int(job) < self.below:
            return True
        if agent is None:
            return False
        if agent in self.abandoned:
            return True
        return agent_alive(agent, self.here, snap.procs) is False
