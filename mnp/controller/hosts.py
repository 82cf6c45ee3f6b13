"""The controller's hosts: one agent connection each, what each can take, whether it is up.

``HostPool`` opens every inventory host's agent through its transport (bounded
fan-out), keeps each connection's heartbeat, reconnects a lost host with backoff,
and holds each host's capacity (``HostCapacity``) and why a host is down. It
knows no jobs: what an agent reports goes to its owner (``on_event``), and so does
the loss of a host (``on_lost``, after the pool has marked it down). Two kinds of
agent answer are the pool's own: ``port`` (a free TCP port, for MASTER_PORT) and
``load`` (``mnp hosts``).

The first op on every new connection is its stale sweep, whose content the owner
computes (``stale``: which jobs still live). While the owner restores the jobs of
an earlier controller (``hold_stale``), new agents wait for theirs, so that no
sweep ever judges a restored job's retry left over.
"""

from __future__ import annotations

import asyncio
import os
import secrets as pysecrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from mnp.errors import InfraError, MnpError
from mnp.model import HostSpec, Inventory
from mnp.sched.alloc import HostCapacity
from mnp.transport.base import UNRESPONSIVE, AgentConnection, Event, Transport

HEARTBEAT_INTERVAL = 3.0  # seconds between pings to each agent (MNP_HEARTBEAT_INTERVAL)
HEARTBEAT_DEADLINE = 10.0  # an agent silent this long is given up on (MNP_HEARTBEAT_TIMEOUT)
ABANDONED_KEPT = 64  # agent ids given up on, listed in every stale sweep
LOAD_WITHIN = 2.0  # seconds `mnp hosts` waits for the agents' load samples
LOAD_FRESH = 1.0  # seconds a load sample is reused
PORT_WITHIN = 10.0  # seconds an agent may take to name a free port


def heartbeat_from_env(env: Mapping[str, str] | None = None) -> tuple[float, float]:
    """(interval, deadline) of the agents' heartbeat: ``MNP_HEARTBEAT_INTERVAL`` and
    ``MNP_HEARTBEAT_TIMEOUT`` (seconds) where set to positive numbers, else the defaults."""
    env = os.environ if env is None else env

    def num(name: str, default: float) -> float:
        try:
            value = float(env.get(name, ""))
        except ValueError:
            return default
        return value if value > 0 else default

    interval = num("MNP_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)
    return interval, max(num("MNP_HEARTBEAT_TIMEOUT", HEARTBEAT_DEADLINE), interval)


async def connect_agent(
    host: HostSpec,
    transport: Transport,
    token: str,
    *,
    ready_within: float,
    open_within: float | None = None,
    on_open: Callable[[AgentConnection], None] | None = None,
) -> tuple[AgentConnection, Event]:
    """The one way to reach an agent: open ``host``'s transport with the controller's
    token (for SSH: TCP, key exchange, host key check, authentication, exec request),
    then wait up to ``ready_within`` seconds for the agent's ``ready`` line. Returns the
    connection (not yet reading events: ``AgentConnection.start``) and its facts.

    ``open_within``: seconds the transport may take to open (``TimeoutError`` after).
    ``on_open`` is called with the connection once the stream is open, before the
    handshake: ``mnp hosts check`` times the two steps apart, tells their failures
    apart and closes the connection whatever happens. Errors leave as raised.
    """
    opening = transport.open(host, ["--ctl", token])
    stream = await (opening if open_within is None else asyncio.wait_for(opening, open_within))
    conn = AgentConnection(host.name, stream)
    if on_open is not None:
        on_open(conn)
    return conn, await conn.handshake(ready_within)


class HostPool:
    def __init__(
        self,
        inventory: Inventory,
        transports: Mapping[str, Transport],
        token: str,
        *,
        on_event: Callable[[str, Event], None],
        on_lost: Callable[[str, str], None],
        on_up: Callable[[str], None],
        stale: Callable[[], Event],
        heartbeat: tuple[float, float] | None = None,
        connect_fanout: int = 64,
    ) -> None:
        self.inventory = inventory
        self.transports = dict(transports)  # by HostSpec.transport; managed ones are added
        self.token = token
        self.on_event = on_event
        self.on_lost = on_lost
        self.on_up = on_up
        self.stale = stale
        self.heartbeat = heartbeat if heartbeat is not None else heartbeat_from_env()
        self.connect_fanout = connect_fanout
        self.agents: dict[str, AgentConnection] = {}
        self.capacity: dict[str, HostCapacity] = {}
        self.host_errors: dict[str, str] = {}
        self.drained: dict[str, str] = {}  # host → why it takes no new work
        self.abandoned_agents: list[str] = []  # agent ids given up on while they may still run
        self.closed = False
        self._pending: dict[str, asyncio.Future[Event]] = {}  # request id → its answer
        self.loads: dict[str, Event] = {}  # host → its last `load` event (with "at")
        self._holding_stale = False
        self._unswept: set[str] = set()
        self._bg: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[None]] = set()  # connections of lost hosts closing

    # --- connecting -----------------------------------------------------------------

    async def connect_all(self) -> None:
        """Connect to every host at once (bounded); raises when none answers. New agents'
        stale sweeps wait until ``release_stale`` (the owner restores jobs meanwhile)."""
        sem = asyncio.Semaphore(self.connect_fanout)

        async def one(name: str) -> None:
            async with sem:
                await self._connect(name)

        self._holding_stale = True
        await asyncio.gather(*(one(h.name) for h in self.inventory.hosts))
        if not self.agents:
            self._holding_stale = False
            details = "; ".join(self.host_errors.values()) or "the inventory has no hosts"
            raise InfraError(f"no host reachable: {details}")

    def release_stale(self) -> None:
        """Send the sweeps held since ``connect_all`` (before any spawn can go out), and
        keep trying the hosts that did not answer."""
        self._holding_stale = False
        for name in sorted(self._unswept):
            conn = self.agents.get(name)
            if conn is not None:
                self._send_stale(conn)
        self._unswept.clear()
        for h in self.inventory.hosts:
            if h.name not in self.agents:
                self._spawn_bg(self._reconnect(h.name))

    def _known(self, name: str) -> bool:
        return any(h.name == name for h in self.inventory.hosts)

    async def _connect(self, name: str) -> bool:
        if not self._known(name):
            return False  # removed (reload, an allocation that ended) while it was tried
        host = self.inventory.host(name)
        transport = self.transports[host.transport]
        try:
            conn, facts = await connect_agent(
                host, transport, self.token, ready_within=host.ssh.connect_timeout + 20
            )
        except MnpError as e:
            self.host_errors[host.name] = str(e)
            return False
        if self.closed or not self._known(name):
            await conn.close()
            return False
        conn.start(self._on_event, self._on_lost, self.heartbeat)
        if self._holding_stale:
            self._unswept.add(host.name)  # swept once the jobs to keep are known
        else:
            self._send_stale(conn)
        self.agents[host.name] = conn
        self.host_errors.pop(host.name, None)
        gpus = tuple(int(g["index"]) for g in facts.get("gpus", []))
        if host.gpus is not None:
            gpus = tuple(range(host.gpus))
        old = self.capacity.get(host.name)
        if old is not None and old.tasks:
            old.up = True  # grants from before the loss are returned as their attempts end
        else:
            self.capacity[host.name] = HostCapacity(
                name=host.name,
                vcpus=float(host.vcpus if host.vcpus is not None else facts.get("cores", 1)),
                memory=int(host.memory if host.memory is not None else facts.get("memory", 0)),
                gpus=gpus,
                cpus=tuple(int(c) for c in facts.get("cpus", ())),
            )
        self.capacity[host.name].drained = self.drained.get(host.name)
        self.on_up(host.name)
        return True

    def _send_stale(self, conn: AgentConnection) -> None:
        """The first op on a connection, computed now from every job the owner holds
        (the agent also leaves alone whatever it spawns itself, before or after)."""
        msg = self.stale()
        if self.abandoned_agents:
            msg["abandoned"] = list(self.abandoned_agents)
        try:
            conn.send(msg)
        except MnpError:
            pass  # the connection died already; the reader reports it

    async def _reconnect(self, name: str) -> None:
        """Try again with exponential backoff (0.5 s doubling to 30 s) until the host is back."""
        delay = 0.5
        while not self.closed and self._known(name):
            await asyncio.sleep(delay)
            if self.closed or not self._known(name) or await self._connect(name):
                return
            delay = min(delay * 2, 30.0)

    def _on_lost(self, host: str, why: str) -> None:
        """The connection is gone (or its agent stopped answering): the host is down until
        a reconnect; the owner then ends what ran there, with ``lost_reason``."""
        if self.closed or not self._known(host):
            return  # we closed it (see close() and drop())
        self.host_errors[host] = why
        cap = self.capacity.get(host)
        if cap is not None:
            cap.up = False
        lost = self.agents.pop(host, None)
        reason = f"Host lost: {host}"
        if lost is not None:
            if lost.abandoned is not None:
                # it may run again (SIGCONT): until it sees its stdin closed, its tasks
                # are left over for the next agent's stale sweep, on any host
                reason += f" ({UNRESPONSIVE})"
                agent_id = str(lost.facts.get("agent_id") or "")
                if agent_id and agent_id not in self.abandoned_agents:
                    self.abandoned_agents.append(agent_id)
                    del self.abandoned_agents[:-ABANDONED_KEPT]
            closing = asyncio.get_running_loop().create_task(lost.close())
            self._closing.add(closing)  # awaited by close(), never cancelled
            closing.add_done_callback(self._closing.discard)
        if self._known(host):
            self._spawn_bg(self._reconnect(host))
        self.on_lost(host, reason)

    # --- hosts that come and go while it runs ---------------------------------------

    def add(self, name: str) -> None:
        """Connect a host just added to ``inventory`` (reload, a managed allocation),
        now and then with backoff until it answers or is removed again."""
        if name in self.agents or self.closed:
            return

        async def first() -> None:
            if not await self._connect(name):
                await self._reconnect(name)

        self._spawn_bg(first())

    def drop(self, name: str, why: str | None = None) -> None:
        """Forget a host already removed from ``inventory``: close its agent (which
        kills what it runs). ``why`` set: what ran there is lost (``on_lost``, ``Host
        lost: NAME (why)``), as when an allocation ends under its jobs."""
        conn = self.agents.pop(name, None)
        cap = self.capacity.get(name)
        if cap is not None:
            cap.up = False
        self.host_errors.pop(name, None)
        self.drained.pop(name, None)
        self.loads.pop(name, None)
        if conn is not None:
            closing = asyncio.get_running_loop().create_task(conn.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        if why is not None and cap is not None and cap.tasks:
            self.on_lost(name, f"Host lost: {name} ({why})")
        self.capacity.pop(name, None)

    def drain(self, name: str, reason: str) -> None:
        """``name`` takes no new work; what runs there goes on."""
        self.drained[name] = reason
        cap = self.capacity.get(name)
        if cap is not None:
            cap.drained = reason

    def resume(self, name: str) -> None:
        self.drained.pop(name, None)
        cap = self.capacity.get(name)
        if cap is not None:
            cap.drained = None

    # --- talking to agents ----------------------------------------------------------

    def send(self, host: str, msg: Event) -> bool:
        """Send ``msg`` to ``host``'s agent; False when it is not connected."""
        conn = self.agents.get(host)
        if conn is None or not conn.alive:
            return False
        try:
            conn.send(msg)
        except MnpError:
            return False
        return True

    def _on_event(self, host: str, msg: Event) -> None:
        if msg.get("ev") in ("port", "load"):
            fut = self._pending.get(str(msg.get("id")))
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        self.on_event(host, msg)

    async def _ask(self, conn: AgentConnection, op: str, within: float) -> Event:
        rid = pysecrets.token_hex(4)
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            conn.send({"op": op, "id": rid})
            return await asyncio.wait_for(fut, within)
        finally:
            self._pending.pop(rid, None)

    async def free_port(self, host: str) -> int | None:
        """A TCP port free on ``host`` now (MASTER_PORT); None if its agent cannot say."""
        conn = self.agents.get(host)
        if conn is None or not conn.alive:
            return None
        try:
            return int((await self._ask(conn, "port", PORT_WITHIN))["port"])
        except (TimeoutError, MnpError):
            return None

    async def host_loads(self, within: float = LOAD_WITHIN) -> dict[str, Event]:
        """Each connected host's load now: its agent's ``load`` event (``load``: the 1, 5
        and 15-minute load averages, ``memory_used``: bytes), asked of every agent at
        once. A sample younger than ``LOAD_FRESH`` seconds is reused; a host whose agent
        does not answer within ``within`` seconds, or does not serve ``load`` (an
        older agent: its ``ready`` lists the ``ops`` it serves), is left out."""
        now = time.time()

        async def one(host: str, conn: AgentConnection) -> None:
            try:
                self.loads[host] = {**await self._ask(conn, "load", within), "at": time.time()}
            except (TimeoutError, MnpError):
                self.loads.pop(host, None)

        asking = [
            one(host, conn)
            for host, conn in self.agents.items()
            if conn.alive
            and "load" in (conn.facts.get("ops") or ())
            and now - float(self.loads.get(host, {}).get("at", 0)) >= LOAD_FRESH
        ]
        if asking:
            await asyncio.gather(*asking)
        return {h: ev for h, ev in self.loads.items() if h in self.agents}

    # --- closing --------------------------------------------------------------------

    def _spawn_bg(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def close(self) -> None:
        """Close every connection (each agent then kills what it started) and wait for
        those of lost hosts still closing."""
        self.closed = True
        await asyncio.gather(
            *(c.close() for c in self.agents.values()), *self._closing, return_exceptions=True
        )
        # then the transports' shared resources (OpenSSH masters and their socket directory)
        await asyncio.gather(*(t.close() for t in self.transports.values()), return_exceptions=True)
        for task in list(self._bg):
            task.cancel()
