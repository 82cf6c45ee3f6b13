"""The control socket's server: asyncio, serving ``$home/controller.sock`` (0600, peer
uid checked) to the controller's owner. The protocol is in ``mnp.api``'s docstring.

asyncio and logging are imported inside the methods, not at the top, as before the
split: ``mnp.daemon`` imports this module on the path of ``mnp submit`` and
``mnp controller stop``, which start no event loop and should not pay for one.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from mnp.api.client import MAX_LINE, connect_unix, encode, socket_path, unix_address
from mnp.errors import InfraError, MnpError

if TYPE_CHECKING:
    import asyncio
    from pathlib import Path

MAX_IN_FLIGHT = 64
"""Requests of one connection answered at once; the next one is read when one ends."""


class _Connection:
    """One accepted client: its writer, and whether it is gone.

    What is buffered for a client that does not read stays bounded: one line is written
    at a time (the others wait their turn), and only while the buffer is below its
    high-water mark; a handler that writes to a slow reader waits (back-pressure)."""

    def __init__(self, writer: asyncio.StreamWriter, gone: asyncio.Event) -> None:
        import asyncio

        self.writer = writer
        self.gone = gone
        self._turn = asyncio.Lock()
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    @property
    def closed(self) -> bool:
        return self.gone.is_set() or self.writer.is_closing()

    async def write(self, data: bytes) -> None:
        if self.closed:
            return
        async with self._turn:
            if self.closed:
                return
            try:
                # one write() per line: lines of concurrent requests never interleave
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                self.mark_closed()

    def mark_closed(self) -> None:
        self.gone.set()
        self.writer.close()  # flushes what is already buffered, then closes


class Responder:
    """Answers one request. Handlers ``await`` its methods (they wait for the client
    to read when its buffer is full, which is the backpressure of long streams).

    Writing to a client that is gone does nothing; ``closed`` and ``wait_closed``
    tell an endless stream (follow logs/events) when to stop. After ``end`` or
    ``fail`` the request is answered and further writes raise ``RuntimeError``.
    A handler that returns without ``end``/``fail`` is ended with
    ``{"ok": true, "end": true}``.
    """

    def __init__(
        self, conn: _Connection, request: Mapping[str, Any], max_line: int = MAX_LINE
    ) -> None:
        self._conn = conn
        self._has_id = "id" in request
        self.id: Any = request.get("id")
        self.op = str(request.get("op"))
        self._max_line = max_line
        self.done = False

    @property
    def closed(self) -> bool:
        return self._conn.closed

    async def wait_closed(self) -> None:
        await self._conn.gone.wait()

    async def send(self, msg: Mapping[str, Any]) -> None:
        """One more response line (``"ok": true`` unless ``msg`` says otherwise)."""
        await self._write(msg, end=False)

    async def end(self, msg: Mapping[str, Any] | None = None) -> None:
        """The last response line: ``msg`` with ``"end": true``."""
        await self._write(msg or {}, end=True)

    async def fail(self, exc: MnpError) -> None:
        """End with ``exc`` as an error response (its message and ``exit_code``)."""
        await self._write({"ok": False, "error": str(exc), "exit_code": exc.exit_code}, end=True)

    async def _write(self, msg: Mapping[str, Any], end: bool) -> None:
        if self.done:
            raise RuntimeError(f"the response to {self.op!r} has already ended")
        out: dict[str, Any] = {"ok": True, **msg}
        out.pop("end", None)
        if self._has_id:
            out["id"] = self.id
        if end:
            out["end"] = True
        data = encode(out)  # a value json can't encode raises here, in the handler
        if end:
            self.done = True
        if len(data) > self._max_line + 1:
            self.done = True
            data = encode(
                {
                    "ok": False,
                    "error": f"the response to {self.op!r} is longer than {self._max_line} bytes",
                    "exit_code": 1,
                    **({"id": self.id} if self._has_id else {}),
                    "end": True,
                }
            )
        await self._conn.write(data)


Handler = Callable[[dict[str, Any], Responder], Awaitable[None]]
"""``await handler(request, responder)``: answer one request (its own task)."""


class _TooLong:
    pass


_TOO_LONG = _TooLong()


def _peer_uid(sock: socket.socket) -> int:
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ApiServer:
    """Serves ``handler`` on ``$home/controller.sock`` to the user that owns this process.

    ``start()`` binds (replacing a stale socket file, refusing a live one);
    ``stop_accepting()`` closes the listening socket and removes its file, so
    clients see no controller while this one finishes; ``close()`` also
    cancels the handlers still running and closes every connection (what
    they had written is flushed first, for up to a second).
    """

    def __init__(self, home: Path, handler: Handler, *, max_line: int = MAX_LINE) -> None:
        self.path = socket_path(home)
        self._handler = handler
        self._max_line = max_line
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._conns: set[_Connection] = set()
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._unstarted: dict[asyncio.Task[None], socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def connections(self) -> int:
        """Connections open now (refused peers included until they are closed)."""
        return len(self._conn_tasks)

    async def start(self) -> None:
        import asyncio
        import logging

        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            addr, fd = unix_address(self.path)
            # umask, not chmod alone: the file is created 0600, with no window where it is wider
            old = os.umask(0o177)
            try:
                sock.bind(addr)
            finally:
                os.umask(old)
                if fd is not None:
                    os.close(fd)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            os.chmod(self.path, 0o600)
            sock.listen(128)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            self._unlink()
            raise InfraError(f"cannot listen on {self.path}: {e.strerror or e}") from e
        self._listener = sock
        asyncio.get_running_loop().add_reader(sock, self._accept)
        logging.getLogger("mnp").info("listening on %s", self.path)

    def _remove_stale(self) -> None:
        import logging
        import stat

        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise InfraError(f"{self.path} exists and is not a socket: remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            connect_unix(probe, self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)
            logging.getLogger("mnp").info("removed the stale socket %s", self.path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            raise InfraError(f"cannot check the socket {self.path}: {e}") from e
        finally:
            probe.close()
        raise InfraError(f"another controller answers on {self.path}")

    def _unlink(self) -> None:
        """Remove the socket file, if it is still the one this server bound."""
        if self._inode is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._inode = None

    async def stop_accepting(self) -> None:
        import asyncio

        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener)
            self._listener.close()
            self._listener = None
        self._unlink()

    async def close(self) -> None:
        import asyncio

        self._closing = True
        await self.stop_accepting()
        writers = [c.writer for c in self._conns]
        for conn in list(self._conns):
            conn.mark_closed()  # flushes what is buffered; the EOF that follows ends its task
        if self._conn_tasks:  # they end without reading another request (self._closing)
            _, late = await asyncio.wait(list(self._conn_tasks), timeout=1.0)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        handlers = list(self._tasks)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=1.0)
        writers += [c.writer for c in self._conns if c.writer not in writers]
        if writers:
            closed = [asyncio.ensure_future(w.wait_closed()) for w in writers]
            await asyncio.wait(closed, timeout=1.0)
            for w, fut in zip(writers, closed, strict=True):
                if not fut.done():
                    w.transport.abort()  # a client that does not read what is left
            await asyncio.wait(closed, timeout=1.0)
            for fut in closed:
                if fut.done():
                    fut.exception()  # retrieved: a reset connection is no news here
                else:
                    fut.cancel()

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _accept(self) -> None:
        """Accept what is waiting (a reader callback: no accepted socket is ever in flight)."""
        import asyncio
        import logging

        listener = self._listener
        if listener is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: pause instead of spinning
                logging.getLogger("mnp").error("accepting a connection failed: %s", e)
                loop.remove_reader(listener)
                loop.call_later(0.1, self._resume_accepting, listener)
                return
            task = loop.create_task(self._serve(sock))
            self._conn_tasks.add(task)
            self._unstarted[task] = sock
            task.add_done_callback(self._conn_done)

    def _resume_accepting(self, listener: socket.socket) -> None:
        import asyncio

        if self._listener is listener:
            asyncio.get_running_loop().add_reader(listener, self._accept)

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        self._conn_tasks.discard(task)
        sock = self._unstarted.pop(task, None)
        if sock is not None:
            sock.close()  # cancelled before it ran: nobody else will close it

    async def _serve(self, sock: socket.socket) -> None:
        import asyncio
        import logging

        log = logging.getLogger("mnp")
        task = asyncio.current_task()
        if task is not None:
            self._unstarted.pop(task, None)
        if self._closing:
            sock.close()
            return
        try:
            uid = _peer_uid(sock)
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=self._max_line)
        except BaseException:
            sock.close()
            raise
        conn = _Connection(writer, asyncio.Event())
        self._conns.add(conn)
        try:
            if self._closing:
                return
            if uid != os.geteuid():
                log.warning("refused a connection from uid %d", uid)
                error = f"permission denied: uid {uid} is not the controller's owner"
                await conn.write(encode(_error(error, 3)))
                return
            while True:
                line = await self._read_line(reader)
                if line is None or self._closing:
                    return
                if isinstance(line, _TooLong):
                    error = f"request line longer than {self._max_line} bytes"
                    await conn.write(encode(_error(error, 2)))
                    continue
                if not line.strip():
                    continue
                request = _parse(line)
                if isinstance(request, bytes):
                    await conn.write(request)
                    continue
                await conn.slots.acquire()  # a client that does not read its answers waits
                task = asyncio.create_task(self._answer(conn, request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(lambda _t: conn.slots.release())
        except ConnectionError:
            pass
        except Exception:
            log.exception("control connection failed")
        finally:
            conn.mark_closed()
            self._conns.discard(conn)

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | _TooLong | None:
        """The next line; ``None`` at EOF; ``_TOO_LONG`` (line discarded) past the limit."""
        import asyncio

        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None  # a line cut by EOF: the client is gone, nobody to answer
        except asyncio.LimitOverrunError as e:
            consumed = e.consumed
        while True:  # skip the rest of the long line, keeping what follows it
            try:
                await reader.readexactly(consumed)
                await reader.readuntil(b"\n")
                return _TOO_LONG
            except asyncio.IncompleteReadError:
                return None
            except asyncio.LimitOverrunError as e:
                consumed = e.consumed

    async def _answer(self, conn: _Connection, request: dict[str, Any]) -> None:
        import asyncio
        import logging

        r = Responder(conn, request, self._max_line)
        try:
            await self._handler(request, r)
        except asyncio.CancelledError:
            raise
        except MnpError as e:
            if r.done:
                logging.getLogger("mnp").warning("op %r failed after it ended: %s", r.op, e)
            else:
                await r.fail(e)
        except Exception as e:
            logging.getLogger("mnp").exception("op %r failed", r.op)
            if not r.done:
                await r._write(
                    _error(f"internal error in {r.op!r}: {type(e).__name__}: {e}", 1), end=True
                )
        else:
            if not r.done:
                await r.end()


def _error(message: str, exit_code: int, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": message, "exit_code": exit_code, **extra, "end": True}


def _parse(line: bytes) -> dict[str, Any] | bytes:
    """The request on ``line``, or the encoded error response that refuses it."""
    try:
        request = json.loads(line)
    except ValueError as e:
        return encode(_error(f"malformed request (not JSON): {e}", 2))
    if not isinstance(request, dict):
        return encode(_error("malformed request: expected a JSON object", 2))
    op = request.get("op")
    if not isinstance(op, str) or not op:
        extra = {"id": request["id"]} if "id" in request else {}
        return encode(_error('malformed request: "op" must be a non-empty string', 2, **extra))
    return request
