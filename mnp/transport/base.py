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
from mnp.model import HostSpec

MAX_LINE = 16 * 1024 * 1024

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
        self._closing = False

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

    def start(self, on_event: EventHandler, on_lost: LostHandler) -> None:
        self._on_event = on_event
        self._on_lost = on_lost
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    def send(self, msg: Event) -> None:
        if not self.alive:
            raise TransportError(f"{self.host}: agent connection is down")
        self.stream.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def send_many(self, msgs: list[Event]) -> None:
        if not self.alive:
            raise TransportError(f"{self.host}: agent connection is down")
        self.stream.write(
            b"".join(json.dumps(m, separators=(",", ":")).encode() + b"\n" for m in msgs)
        )

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
                try:
                    msg = json.loads(line)
                except ValueError:
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
