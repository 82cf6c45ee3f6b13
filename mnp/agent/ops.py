"""The agent protocol's op table (PROTOCOL.md, "Controller → agent"): one handler per
op, `handler(agent, msg)`, raising `BadRequest` for a field it cannot take. `spawn` is
in spawn.py, `sweep` and `stale` in sweep.py; the small ones are here."""

from __future__ import annotations

import time

from .facts import load
from .proc import send, send_group, snapshot
from .request import BadRequest, grace_of, tid_of
from .spawn import op_spawn
from .sweep import op_stale, op_sweep
from .tasks import Teardown

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Callable, Dict

    from .agent import Agent


def op_signal(agent: Agent, msg: Dict[str, Any]) -> None:
    tid = tid_of(msg)
    sig = msg.get("sig")
    if not isinstance(sig, int) or isinstance(sig, bool) or not 0 < sig < 65:
        raise BadRequest("sig must be a signal number")
    task = agent.tasks.get(tid)
    if task is None:
        raise BadRequest("no task %s on this agent" % tid)
    if not send_group(task.pid, sig) and not task.reaped:
        send(task.pid, sig)


def op_kill(agent: Agent, msg: Dict[str, Any]) -> None:
    tid = tid_of(msg)
    grace = grace_of(msg, agent.grace)
    teardowns = agent.teardowns
    task = agent.tasks.get(tid)
    if task is not None:
        teardowns.start("t:" + tid, "task", tid, task, grace)
        return
    # No task (any more): its `gone` was sent. Tids are reused by retries, so a second
    # `gone` would be read as the next attempt's: answer only if the tag is still on
    # this host, and tear that down.
    if ("t:" + tid) not in teardowns.active:
        probe = Teardown("", "tag", tid, None, 0.0)
        if not teardowns.targets_of(probe, snapshot(agent.tagger)):
            return
    teardowns.start("t:" + tid, "tag", tid, None, grace)


def op_ping(agent: Agent, msg: Dict[str, Any]) -> None:
    agent.out.emit({"ev": "pong", "id": msg.get("id"), "t": time.time()})


def op_facts(agent: Agent, msg: Dict[str, Any]) -> None:
    agent.out.emit(dict(ev="facts", **agent.facts()))


def op_load(agent: Agent, msg: Dict[str, Any]) -> None:
    agent.out.emit(dict(ev="load", id=msg.get("id"), t=time.time(), **load()))


def op_port(agent: Agent, msg: Dict[str, Any]) -> None:
    """A TCP port free on this host now (for MASTER_PORT), not one handed out lately."""
    port = agent.free_port()
    agent.out.emit({"ev": "port", "id": msg.get("id"), "port": port, "t": time.time()})


def op_pmi_release(agent: Agent, msg: Dict[str, Any]) -> None:
    """The merged key-value space of a PMI barrier, for this agent's nodes (ranks.py)."""
    agent.ranks.release(msg)


def op_shutdown(agent: Agent, msg: Dict[str, Any]) -> None:
    agent.shutdown(grace_of(msg, agent.grace), detached=False)


# the one op table: what `ready`/`facts` list as `ops`, and what PROTOCOL.md documents
OPS: Dict[str, Callable[[Agent, Dict[str, Any]], None]] = {
    "spawn": op_spawn,
    "signal": op_signal,
    "kill": op_kill,
    "sweep": op_sweep,
    "stale": op_stale,
    "ping": op_ping,
    "facts": op_facts,
    "port": op_port,
    "load": op_load,
    "shutdown": op_shutdown,
    "pmi_release": op_pmi_release,
}
