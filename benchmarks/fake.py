"""An in-memory agent for benchmarking the controller without processes or SSH.

``FakeTransport`` hands the controller one ``FakeStream`` per host. The stream
speaks the agent protocol (mnp/agent/PROTOCOL.md) from memory: it says
``ready`` first, and answers every ``spawn`` at once with ``started``,
``exited`` (code 0) and ``gone``, as if the task were ``true`` and the host
infinitely fast. ``kill`` of a task it has already reported ``gone`` sends
nothing (as the real agent does); ``sweep`` gets ``swept``, ``port`` a port,
``ping`` a ``pong``. What the controller spends per dispatch is then all that
is left to measure.

The transport counts the spawns it received (``spawns``) and when the first
and the last arrived, so a benchmark can report dispatches per second.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque

from mnp.model import HostSpec
from mnp.transport.base import AgentStream, Transport

CORES = 2
MEMORY = 8 * 1024**3


class FakeStream(AgentStream):
    """One host's agent, answered from memory."""

    def __init__(self, transport: FakeTransport, host: str) -> None:
        self.transport = transport
        self.host = host
        self._lines: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._port = 20000
        ready = {
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
        }
        self._facts = ready
        self._push(json.dumps(ready).encode() + b"\n")

    def _push(self, line: bytes) -> None:
        self._lines.append(line)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def readline(self) -> bytes:
        while not self._lines:
            if self._closed:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        return self._lines.popleft()

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        for line in data.splitlines():
            if line:
                self._handle(json.loads(line))

    def _handle(self, msg: dict[str, object]) -> None:
        op = msg.get("op")
        now = time.time()
        if op == "spawn":
            self.transport.spawned(now)
            tid = str(msg["tid"])
            self._push(f'{{"ev":"started","tid":"{tid}","pid":4242,"t":{now}}}\n'.encode())
            self._push(
                f'{{"ev":"exited","tid":"{tid}","code":0,"signal":null,"t":{now}}}\n'.encode()
            )
            self._push(f'{{"ev":"gone","tid":"{tid}","t":{now},"killed":0}}\n'.encode())
        elif op == "sweep":
            reply = {"ev": "swept", "job": msg.get("job"), "t": now, "killed": 0}
            self._push(json.dumps(reply).encode() + b"\n")
        elif op == "port":
            self._port += 1
            reply = {"ev": "port", "id": msg.get("id"), "port": self._port, "t": now}
            self._push(json.dumps(reply).encode() + b"\n")
        elif op == "ping":
            self._push(json.dumps({"ev": "pong", "id": msg.get("id"), "t": now}).encode() + b"\n")
        elif op == "facts":
            self._push(json.dumps({**self._facts, "ev": "facts"}).encode() + b"\n")
        elif op == "shutdown":
            self._close_now()
        # "kill": every task is already gone, and the real agent then sends nothing

    async def drain(self) -> None:
        return None

    def _close_now(self) -> None:
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def close(self) -> None:
        self._close_now()


class FakeTransport(Transport):
    """Opens a ``FakeStream`` per host and counts the spawns they receive."""

    name = "fake"

    def __init__(self) -> None:
        self.spawns = 0
        self.first: float | None = None
        self.last: float | None = None
        self.streams: dict[str, FakeStream] = {}

    def spawned(self, now: float) -> None:
        self.spawns += 1
        if self.first is None:
            self.first = now
        self.last = now

    def reset(self) -> None:
        self.spawns = 0
        self.first = self.last = None

    async def open(self, host: HostSpec, agent_args: list[str]) -> AgentStream:
        stream = FakeStream(self, host.name)
        self.streams[host.name] = stream
        return stream
