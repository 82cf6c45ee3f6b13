"""The transport seam: a byte stream to one agent, and the one client above it.

A ``Transport`` only knows how to start ``python3 -m mnp.agent`` somewhere and
hand back its stdin/stdout as an ``AgentStream``. Everything above the byte
stream — framing, the ``ready`` handshake, dispatching events, noticing that
the stream died — is ``AgentConnection``, shared by the local and SSH
transports so that they cannot drift apart.
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from mnp.errors import TransportError
from mnp.jsonline import dumps
from mnp.model import HostSpec

# one encoder and decoder for every message: json.dumps with arguments builds an encoder
# per call, json.loads of bytes guesses their encoding per call
_encode = dumps
_decode = json.JSONDecoder().decode

MAX_LINE = 16 * 1024 * 1024
UNRESPONSIVE = "agent not responding"
"""How a connection given up on by its heartbeat (or by the controller) is reported lost."""

Event = dict[str, Any]
EventHandler = Callable[[str, Event], None]
LostHandler = Callable[[str, str], None]


class AgentStream(abc.ABC):
    """The agent's stdin and stdout, however they are carried."""

    @abc.abstractmethod
    async def readline(self) -> bytes:
        """One line including its newline; ``b""`` at end of stream."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def drain(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the agent's stdin (it then kills its tasks and exits) and release the stream."""

    def stderr_tail(self) -> str:
        """What the agent (or ssh) said on stderr, for error messages."""
        return ""


class Transport(abc.ABC):
    """Starts the agent on a host and returns its byte stream."""

    name = "abstract"

    @abc.abstractmethod
    async def open(self, host: HostSpec, agent_args: list[str]) -> AgentStream: ...

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release shared resources (SSH connections)."""


class AgentConnection:
    """The client side of the agent protocol (mnp/agent/PROTOCOL.md) over any stream."""

    def __init__(self, host: str, stream: AgentStream) -> None:
        self.host = host
        self.stream = stream
        self.facts: Event = {}
        self.alive = False
        self.opened_at = time.time()
        self._on_event: EventHandler | None = None
        self._on_lost: LostHandler | None = None
        self._reader: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._closing = False
        self.last_heard = time.monotonic()  # when the agent last said anything
        self.abandoned: str | None = None  # why it was given up on while it may still run

    async def handshake(self, within: float) -> Event:
        """Wait for the agent's ``ready`` line and return its facts."""
        try:
            line = await asyncio.wait_for(self.stream.readline(), within)
        except TimeoutError:
            raise TransportError(
                f"{self.host}: agent did not start within {within:g}s"
                + _tail(self.stream.stderr_tail())
            ) from None
        if not line:
            raise TransportError(
                f"{self.host}: agent exited before it was ready" + _tail(self.stream.stderr_tail())
            )
        try:
            msg = json.loads(line)
        except ValueError:
            raise TransportError(
                f"{self.host}: agent said {line[:200]!r} instead of ready"
                + _tail(self.stream.stderr_tail())
            ) from None
        if not isinstance(msg, dict) or msg.get("ev") != "ready":
            raise TransportError(f"{self.host}: agent said {msg!r} instead of ready")
        self.facts = msg
        self.alive = True
        return msg

    def start(
        self,
        on_event: EventHandler,
        on_lost: LostHandler,
        heartbeat: tuple[float, float] | None = None,
    ) -> None:
        """Read events from now on. ``heartbeat`` = (interval, deadline) seconds: a
        ``ping`` every interval, and the agent is given up on (``abandon``) when it has
        said nothing -- no pong, no event -- for deadline seconds (SIGSTOPped, hung,
        its host frozen while the SSH connection stays up)."""
        self._on_event = on_event
        self._on_lost = on_lost
        loop = asyncio.get_running_loop()
        self.last_heard = time.monotonic()
        self._reader = loop.create_task(self._read_loop())
        if heartbeat is not None:
            self._beat = loop.create_task(self._heartbeat(*heartbeat))

    async def _heartbeat(self, interval: float, deadline: float) -> None:
        n = 0
        last = time.monotonic()
        while self.alive and not self._closing:
            await asyncio.sleep(interval)
            now = time.monotonic()
            stalled = now - last > 2 * interval + 1.0
            last = now
            if not self.alive or self._closing:
                return
            if stalled:
                # the controller's own loop was busy: what the agent said may be unread
                # yet; judge from the next beat, not from this one's stale clock
                self.last_heard = max(self.last_heard, now - interval)
            elif now - self.last_heard > deadline:
                self.abandon(f"{UNRESPONSIVE} (nothing heard for {deadline:g}s)")
                return
            n += 1
            try:
                self.send({"op": "ping", "id": f"hb{n}"})
            except TransportError:
                return

    def abandon(self, why: str) -> None:
        """Give up on the agent now, as if its connection had died: stop reading, report
        the loss (``why``), and leave closing the stream to whoever handles the loss. The
        agent, if it ever runs again, finds its stdin closed and kills its tasks."""
        if not self.alive or self._closing:
            return
        self.alive = False
        self.abandoned = why
        if self._reader is not None:
            self._reader.cancel()
        if self._on_lost is not None:
            self._on_lost(self.host, why)

    def send(self, msg: Event) -> None:
        if not self.alive:
            raise TransportError(f"{self.host}: agent connection is down")
        self.stream.write(_encode(msg).encode() + b"\n")

    def send_many(self, msgs: list[Event]) -> None:
        if not self.alive:
            raise TransportError(f"{self.host}: agent connection is down")
        self.stream.write("".join([_encode(m) + "\n" for m in msgs]).encode())

    async def drain(self) -> None:
        await self.stream.drain()

    async def _read_loop(self) -> None:
        reason = "agent connection closed"
        assert self._on_event is not None
        try:
            while True:
                line = await self.stream.readline()
                if not line:
                    break
                self.last_heard = time.monotonic()
                try:
                    msg = _decode(line.decode("utf-8", "surrogatepass"))
                except ValueError:  # UnicodeDecodeError is one
                    continue
                if isinstance(msg, dict):
                    self._on_event(self.host, msg)
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
            reason = f"agent connection failed: {e}"
        except asyncio.CancelledError:
            return
        self.alive = False
        if not self._closing and self._on_lost is not None:
            tail = self.stream.stderr_tail()
            self._on_lost(self.host, reason + _tail(tail))

    async def close(self) -> None:
        self._closing = True
        self.alive = False
        if self._beat is not None:
            self._beat.cancel()
        await self.stream.close()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._reader.cancel()


def _tail(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    return " (" + text.splitlines()[-1][:300] + ")"
