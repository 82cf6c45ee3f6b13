"""The fake transport: agents answered from memory, for tests and benchmarks.

In the spirit of httpx's ``MockTransport(handler)``: ``FakeTransport(handler)`` hands the
controller one :class:`FakeAgent` per host, a byte stream that speaks the agent protocol
(mnp/agent/PROTOCOL.md) with no process behind it. Every message the controller writes
is recorded (``sent``, per host, and ``log``, in the order they came) and answered by
``handler(host, msg)``, which returns the events the agent sends back (a list of event
dicts, ``[]`` for none), or ``None`` for the default answer:

- ``ready`` first (``facts``: 2 cores, 8 GiB, no GPUs), ``facts`` the same again;
- ``spawn``: at once ``started``, ``exited`` code 0 and ``gone``, as if every task were
  ``true`` on an infinitely fast host;
- ``kill``: ``exited`` (SIGTERM) if the task had not exited, then ``gone``; nothing for a
  task that is already gone (as the real agent);
- ``sweep``: ``kill`` of every task of that job on this host, then ``swept``;
- ``stale`` → ``stale``, ``ping`` → ``pong``, ``port`` → a new port, ``load`` → a load;
- ``signal``: nothing; ``shutdown``: the stream ends.

A test drives what happens later with :meth:`FakeTransport.push` (any event, e.g. a task
exiting with code 3), :meth:`FakeTransport.exit` (``exited`` and ``gone`` of a task) and
:meth:`FakeTransport.lose` (the stream ends: the controller sees the host lost). The
agent keeps which tasks it holds from the events it sends, so ``kill`` and ``sweep`` end
exactly those. :func:`hold` is a handler that starts tasks and leaves them running.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections import deque
from collections.abc import Callable

from mnp.errors import TransportError
from mnp.model import HostSpec, Inventory
from mnp.transport.base import AgentStream, Event, Transport

CORES = 2
_encode = json.JSONEncoder(separators=(",", ":")).encode  # as a real agent encodes
_decode = json.JSONDecoder().decode
MEMORY = 8 * 1024**3
SIGTERM = 15

Handler = Callable[[str, Event], list[Event] | None]
"""``handler(host, msg)``: the events the fake agent on ``host`` answers ``msg`` with
(``[]``: none), or None for the default answer."""

_ports = itertools.count(20000)
_JOB_PART = re.compile(r"[:#.]")


def job_part(tid: str) -> str:
    """The text of a task id before its first ``:``, ``#`` or ``.`` (PROTOCOL.md)."""
    return _JOB_PART.split(tid, 1)[0]


def hold(host: str, msg: Event) -> list[Event] | None:
    """A handler whose tasks start and keep running, until a ``kill``/``sweep`` or a
    test's :meth:`FakeTransport.exit` ends them."""
    if msg.get("op") == "spawn":
        return [started(str(msg["tid"]))]
    return None


def started(tid: str) -> Event:
    return {"ev": "started", "tid": tid, "pid": 4242, "t": time.time()}


def exited(tid: str, code: int | None = 0, signal: int | None = None) -> Event:
    return {"ev": "exited", "tid": tid, "code": code, "signal": signal, "t": time.time()}


def gone(tid: str) -> Event:
    return {"ev": "gone", "tid": tid, "t": time.time(), "killed": 0}


class FakeAgent(AgentStream):
    """One host's agent, answered from memory."""

    def __init__(self, transport: FakeTransport, host: str) -> None:
        self.transport = transport
        self.host = host
        self.tasks: dict[str, bool] = {}  # tid -> exited, for tasks not yet gone
        self.task_ports: dict[str, int] = {}  # tid -> the port its spawn's port_env got
        self.keyed_ports: dict[str, int] = {}  # port_key -> port, as an agent keeps them
        self._lines: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.facts: Event = {
            "ev": "ready",
            "hostname": host,
            "python": "3.11.0",
            "pid": 1,
            "cores": CORES,
            "memory": MEMORY,
            "gpus": [],
            "started": time.time(),
            "version": "fake",
            "psutil": False,
            "nvml": False,
            "rundir": f"/tmp/mnp-fake/{host}",
            "agent_id": f"fake.{host}:1:0",
            "ops": ["facts", "kill", "load", "ping", "port", "shutdown", "signal"]
            + ["spawn", "stale", "sweep"],
            "features": ["port_env"],
        }
        self.send(self.facts)

    # --- agent -> controller ---

    def send(self, event: Event) -> None:
        """Deliver ``event`` to the controller (and note what it says of a task)."""
        if self.closed:
            return
        ev, tid = event.get("ev"), event.get("tid")
        if isinstance(tid, str):
            if ev == "started":
                self.tasks.setdefault(tid, False)
                if tid in self.task_ports and "port" not in event:  # its spawn's port_env
                    event = {**event, "port": self.task_ports.pop(tid)}
            elif ev == "exited":
                self.tasks[tid] = True
            elif ev == "gone":
                self.tasks.pop(tid, None)
        self._lines.append(_encode(event).encode() + b"\n")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def readline(self) -> bytes:
        while not self._lines:
            if self.closed:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        return self._lines.popleft()

    # --- controller -> agent ---

    def write(self, data: bytes) -> None:
        if self.closed:
            raise TransportError(f"{self.host}: fake agent is gone")
        for line in data.splitlines():
            if line:
                self._receive(_decode(line.decode()))

    def _receive(self, msg: Event) -> None:
        self.transport.record(self.host, msg)
        if msg.get("op") == "spawn":
            tid = str(msg["tid"])
            self.tasks[tid] = False  # held from now on, started or not
            if msg.get("port_env"):  # the port it picks, said in its `started`
                key = str(msg.get("port_key") or tid)
                self.task_ports[tid] = self.keyed_ports.setdefault(key, next(_ports))
        answer = self.transport.handler(self.host, msg)
        if answer is None:
            answer = self.answer(msg)
        for event in answer:
            self.send(event)

    def answer(self, msg: Event) -> list[Event]:
        """The default answer to ``msg`` (see the module docstring)."""
        op = msg.get("op")
        now = time.time()
        if op == "spawn":
            tid = str(msg["tid"])
            return [started(tid), exited(tid), gone(tid)]
        if op == "kill":
            return self._end(str(msg["tid"]))
        if op == "sweep":
            job = str(msg.get("job"))
            out = [e for tid in list(self.tasks) if job_part(tid) == job for e in self._end(tid)]
            return [*out, {"ev": "swept", "job": job, "t": now, "killed": 0}]
        if op == "stale":
            return [{"ev": "stale", "t": now, "killed": 0}]
        if op == "ping":
            return [{"ev": "pong", "id": msg.get("id"), "t": now}]
        if op == "port":
            return [{"ev": "port", "id": msg.get("id"), "port": next(_ports), "t": now}]
        if op == "facts":
            return [{**self.facts, "ev": "facts"}]
        if op == "load":
            return [
                {"ev": "load", "id": msg.get("id"), "load": [0.0] * 3, "memory_used": 0, "t": now}
            ]
        if op == "shutdown":
            self.end()
        return []

    def _end(self, tid: str) -> list[Event]:
        """What a ``kill`` of ``tid`` makes the agent say."""
        if tid not in self.tasks:
            return []
        if self.tasks[tid]:
            return [gone(tid)]
        return [exited(tid, None, SIGTERM), gone(tid)]

    # --- the stream ---

    async def drain(self) -> None:
        return None

    def end(self) -> None:
        """The stream ends (the agent died, its connection was cut)."""
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def close(self) -> None:
        self.end()


class FakeTransport(Transport):
    """Opens a :class:`FakeAgent` per host; records what the controller sends them."""

    name = "fake"

    def __init__(self, handler: Handler | None = None, *, keep: bool = True) -> None:
        """``keep=False`` (benchmarks): count the spawns, keep no message (a run of
        20,000 tasks would hold every one of them in ``sent`` and ``log``)."""
        self.handler: Handler = handler or (lambda host, msg: None)
        self.keep = keep
        self.agents: dict[str, FakeAgent] = {}  # host -> its current agent
        self.sent: dict[str, list[Event]] = {}  # host -> every message, in order
        self.log: list[tuple[str, Event]] = []  # (host, message), across hosts in order
        self.down: set[str] = set()  # hosts whose agent cannot be started now
        self.opened: dict[str, int] = {}  # host -> agents started there
        self.spawns = 0

    def record(self, host: str, msg: Event) -> None:
        if self.keep:
            self.sent.setdefault(host, []).append(msg)
            self.log.append((host, msg))
        if msg.get("op") == "spawn":
            self.spawns += 1

    async def open(self, host: HostSpec, agent_args: list[str]) -> AgentStream:
        if host.name in self.down:
            raise TransportError(f"{host.name}: fake host is down")
        self.opened[host.name] = self.opened.get(host.name, 0) + 1
        agent = FakeAgent(self, host.name)
        self.agents[host.name] = agent
        return agent

    # --- for tests ---

    def push(self, host: str, *events: Event) -> None:
        """The agent on ``host`` sends ``events`` now."""
        for event in events:
            self.agents[host].send(event)

    def host_of(self, tid: str) -> str:
        """The host whose agent holds task ``tid`` (spawned there and not gone)."""
        for host, agent in self.agents.items():
            if tid in agent.tasks and not agent.closed:
                return host
        raise KeyError(f"no fake agent holds task {tid}")

    def exit(self, tid: str, code: int | None = 0, signal: int | None = None) -> None:
        """Task ``tid`` ends by itself: ``exited`` with ``code``/``signal``, then ``gone``."""
        host = self.host_of(tid)
        self.push(host, exited(tid, code, signal), gone(tid))

    def lose(self, host: str) -> None:
        """The agent's stream on ``host`` ends, as when the host or its link dies."""
        self.agents[host].end()

    def ops(self, host: str | None = None, op: str | None = None) -> list[Event]:
        """The messages sent (to ``host``, or to any host in order), of kind ``op``."""
        msgs = self.sent.get(host, []) if host is not None else [m for _, m in self.log]
        return [m for m in msgs if op is None or m.get("op") == op]

    def spawned(self) -> list[tuple[str, str]]:
        """(host, tid) of every ``spawn`` sent, in the order they were sent."""
        return [(h, str(m["tid"])) for h, m in self.log if m.get("op") == "spawn"]


def make(inventory: Inventory) -> FakeTransport:
    return FakeTransport()
