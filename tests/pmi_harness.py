"""A direct MPI launch in one process, for the tests: ranks on fake nodes, real MPICH.

Each fake node is one ``AsyncNode`` (the agent's PMI server) serving its ranks
through ``PMI_FD`` socketpairs; an in-process ``Exchange`` stands in for the
controller. Like ``srun --kill-on-bad-exit``, an abort or a rank lost before
``finalize`` kills the other ranks; then, like mnp's teardown will, the
harness removes the shared memory MPICH's killed ranks left in ``/dev/shm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from mnp.agent.pmi import NodeServer, shm_leftovers
from mnp.model import NodeGroup
from mnp.pmi.exchange import Complete, Exchange, Rejected
from mnp.pmi.layout import job_attributes, layout, rank_env


@dataclass
class World:
    """What a launch left: each rank's output and exit status, and the PMI events."""

    output: dict[int, str] = field(default_factory=dict)
    returncodes: dict[int, int] = field(default_factory=dict)
    aborts: list[tuple[int, int, str]] = field(default_factory=list)
    lost: list[tuple[int, str]] = field(default_factory=list)
    barriers: int = 0
    exchanged_keys: int = 0
    leftovers: list[str] = field(default_factory=list)  # /dev/shm names removed after


class _Controller:
    """The controller's part: one Exchange, a future per barrier epoch."""

    def __init__(self, nodes: Sequence[int], world: World) -> None:
        self.exchange = Exchange.of(nodes)
        self.done: dict[int, asyncio.Future[Mapping[str, str]]] = {}
        self.world = world

    async def arrive(self, node: int, epoch: int, puts: dict[str, str]) -> Mapping[str, str]:
        fut = self.done.setdefault(epoch, asyncio.get_running_loop().create_future())
        result = self.exchange.arrive(node, epoch, puts)
        if isinstance(result, Rejected):
            raise RuntimeError(result.reason)
        if isinstance(result, Complete):
            self.world.barriers += 1
            self.world.exchanged_keys += len(result.kvs)
            fut.set_result(result.kvs)
        return await fut


async def launch(
    groups: Sequence[NodeGroup],
    argv: Sequence[Sequence[str]],
    *,
    within: float = 60.0,
    kvsname: str | None = None,
    via: str = "fd",
) -> World:
    """Run ``argv[i]`` as the ranks of ``groups[i]`` (taken in node order) and wait for all.

    ``via="fd"``: each rank inherits its end of a socketpair (``PMI_FD``);
    ``via="port"``: each node listens on loopback and ranks connect
    (``PMI_PORT``/``PMI_ID``), as ranks in a container would.
    """
    kvsname = kvsname or f"mnp-test-{uuid.uuid4().hex[:12]}"
    lay = layout(groups)
    by_start = sorted(range(len(groups)), key=lambda i: groups[i].start)
    world = World()
    ctl = _Controller(lay.nodes, world)
    procs: dict[int, asyncio.subprocess.Process] = {}

    def kill_all() -> None:
        for p in procs.values():
            if p.returncode is None:
                # not p.kill(): Popen.send_signal polls first and may reap the
                # child under asyncio's watcher, which then reports 255
                with contextlib.suppress(ProcessLookupError):  # reaped, not yet noted
                    os.kill(p.pid, signal.SIGKILL)

    def on_abort(rank: int, code: int, msg: str) -> None:
        world.aborts.append((rank, code, msg))
        kill_all()

    def on_lost(rank: int, phase: str) -> None:
        world.lost.append((rank, phase))
        kill_all()

    servers: list[asyncio.Task[None]] = []
    listeners: list[asyncio.Server] = []
    handlers: list[asyncio.Task[None]] = []
    for node in lay.nodes:
        here = lay.on_node(node)

        async def exchange(epoch: int, puts: dict[str, str], node: int = node) -> Mapping[str, str]:
            return await ctl.arrive(node, epoch, puts)

        server = AsyncNode(
            kvsname,
            lay.size,
            {r.rank: r.appnum for r in here},
            job_attributes(lay),
            exchange,
            on_abort,
            on_lost,
        )
        address = ""
        if via == "port":

            async def accept(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                server: AsyncNode = server,
            ) -> None:
                task = asyncio.current_task()
                assert task is not None
                handlers.append(task)
                await server.serve(reader, writer)

            listeners.append(await asyncio.start_server(accept, "127.0.0.1", 0))
            address = f"127.0.0.1:{listeners[-1].sockets[0].getsockname()[1]}"
        for r in here:
            if via == "port":
                procs[r.rank] = await _start(
                    argv[by_start[r.appnum]], rank_env(lay, r.rank, port=address)
                )
                continue
            ours, theirs = socket.socketpair()
            env = rank_env(lay, r.rank, fd=theirs.fileno())
            procs[r.rank] = await _start(argv[by_start[r.appnum]], env, theirs.fileno())
            theirs.close()
            reader, writer = await asyncio.open_connection(sock=ours)
            servers.append(asyncio.ensure_future(server.serve(reader, writer, r.rank)))

    async def collect(rank: int, p: asyncio.subprocess.Process) -> None:
        assert p.stdout is not None
        out = await p.stdout.read()
        world.output[rank] = out.decode(errors="replace")
        world.returncodes[rank] = await p.wait()

    async def everything() -> None:
        await asyncio.gather(*(collect(r, p) for r, p in procs.items()), *servers)
        await asyncio.gather(*handlers)  # every rank has exited: its connection is closed

    try:
        await asyncio.wait_for(everything(), within)
    finally:
        kill_all()
        for listener in listeners:
            listener.close()
    world.leftovers = remove_leftovers(kvsname, len(lay.nodes))
    return world


def remove_leftovers(kvsname: str, nodes: int) -> list[str]:
    """Remove MPICH's shared memory of a launch; return what was there."""
    found = []
    for node_id in range(nodes):
        for path in shm_leftovers(kvsname, node_id):
            try:
                os.unlink(path)
                found.append(path)
            except FileNotFoundError:
                pass
    return found


async def _start(
    argv: Sequence[str], pmi_env: Mapping[str, str], fd: int | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **pmi_env},
        pass_fds=[] if fd is None else [fd],
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


class AsyncNode:
    """``NodeServer`` over asyncio sockets, with an awaitable barrier exchange.

    ``exchange(epoch, puts)`` returns the merged key-value space of that barrier
    (the agent will ask the controller); raising fails the barrier.
    """

    def __init__(
        self,
        kvsname: str,
        size: int,
        appnums: Mapping[int, int],
        jobattrs: Mapping[str, str],
        exchange: Callable[[int, dict[str, str]], Awaitable[Mapping[str, str]]],
        on_abort: Callable[[int, int, str], None],
        on_lost: Callable[[int, str], None],
    ) -> None:
        self.exchange = exchange
        self.writers: dict[Hashable, asyncio.StreamWriter] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.server = NodeServer(
            kvsname, size, appnums, jobattrs, self._send, self._barrier, on_abort, on_lost
        )

    def _send(self, conn: Hashable, data: bytes) -> None:
        w = self.writers.get(conn)
        if w is not None and not w.is_closing():
            w.write(data)

    def _barrier(self, epoch: int, puts: dict[str, str]) -> None:
        self.tasks.append(asyncio.ensure_future(self._exchange(epoch, puts)))

    async def _exchange(self, epoch: int, puts: dict[str, str]) -> None:
        try:
            kvs: Mapping[str, str] | None = await self.exchange(epoch, puts)
        except Exception:
            kvs = None
        self.server.release(epoch, kvs)

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rank: int | None = None
    ) -> None:
        """One rank's connection, until it closes."""
        conn = object()
        self.writers[conn] = writer
        self.server.attach(conn, rank)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.server.feed(conn, data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.writers.pop(conn, None)
            self.server.closed(conn)
            writer.close()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
