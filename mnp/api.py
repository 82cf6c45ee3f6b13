"""The control socket: JSON lines over ``$home/controller.sock`` (0600, peer uid checked).

Protocol: one JSON object per line, UTF-8, at most ``MAX_LINE`` bytes a line.

- A request is ``{"op": "NAME", "id": ANY, ...fields}``; ``id`` is optional but
  needed to tell responses apart when several requests share a connection.
- Each request gets one or more responses carrying its ``id``; the last one has
  ``"end": true``. Every response has ``"ok"``; an error is
  ``{"ok": false, "error": "...", "exit_code": N, "end": true}`` (``N`` as in
  ``mnp.errors``). An error without ``id`` concerns the whole connection (a
  malformed line, or a peer that is not the controller's owner).
- A client that closes (or half-closes) its end is gone: the server stops
  writing to it, and handlers see ``Responder.closed``.

Server (``ApiServer``, asyncio) and client (``ApiClient``, blocking, standard
library only: the CLI imports this module on every command, so asyncio and
logging are imported only inside the server's methods).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from mnp.errors import InfraError, JobRefused, MnpError

if TYPE_CHECKING:
    import asyncio
    from pathlib import Path
    from types import TracebackType

SOCKET_NAME = "controller.sock"
MAX_LINE = 64 * 1024 * 1024
"""Longest line either side accepts, in bytes, without its newline."""

# sun_path is 108 bytes on Linux, NUL included.
_SUN_PATH_MAX = 107


def socket_path(home: Path | str) -> str:
    return os.path.join(os.fspath(home), SOCKET_NAME)


_dumps_utf8 = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_dumps_ascii = json.JSONEncoder(separators=(",", ":")).encode


def _encode(msg: Mapping[str, Any]) -> bytes:
    """One line of JSON. Text that is not valid Unicode (command-line arguments, paths
    and task output holding bytes that are not UTF-8, which Python keeps as surrogate
    escapes) travels as JSON escapes (``\\udce9``) and reads back exactly."""
    text = _dumps_utf8(msg)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return _dumps_ascii(msg).encode() + b"\n"


def _unix_address(path: str) -> tuple[str, int | None]:
    """An address ``bind``/``connect`` accept for ``path``, and a dir fd to close after.

    A path longer than ``sun_path`` is reached through ``/proc/self/fd/N`` of
    its directory, so a deep ``--home`` still works.
    """
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path, None
    parent, name = os.path.split(path)
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{name}", fd


def _connect(sock: socket.socket, path: str) -> None:
    addr, fd = _unix_address(path)
    try:
        sock.connect(addr)
    finally:
        if fd is not None:
            os.close(fd)


def error_from_response(msg: Mapping[str, Any]) -> MnpError:
    """The ``MnpError`` an error response stands for (2 → JobRefused, 3 → InfraError)."""
    text = str(msg.get("error") or "the controller reported an error without a message")
    code = msg.get("exit_code", 1)
    if code == 2:
        return JobRefused(text)
    if code == 3:
        return InfraError(text)
    err = MnpError(text)
    if isinstance(code, int) and not isinstance(code, bool) and code != 1:
        err.exit_code = code
    return err


# --------------------------------------------------------------------------- client


class ApiClient:
    """A blocking connection to the controller. Not thread-safe; one per thread.

    ``timeout`` (seconds, ``None`` = wait forever, the default) bounds each wait
    for a response line; after a timeout the connection is unusable.
    """

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.path = path
        self.timeout: float | None = None
        self._sock = sock
        self._rfile = sock.makefile("rb")
        self._next_id = 0

    @classmethod
    def connect(cls, home: Path | str, timeout: float = 5.0) -> ApiClient | None:
        """Connect to the controller of ``home``; ``None`` when none runs there.

        "None runs" is: no socket file, or a stale one (ECONNREFUSED). Any
        other failure (another user's socket, a hung controller) is an
        ``InfraError``.
        """
        path = socket_path(home)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            _connect(sock, path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            return None
        except TimeoutError as e:
            sock.close()
            raise InfraError(
                f"the controller at {path} did not accept a connection within {timeout:g}s"
            ) from e
        except PermissionError as e:
            sock.close()
            raise InfraError(
                f"permission denied connecting to {path}: the controller belongs to another user"
            ) from e
        except OSError as e:
            sock.close()
            raise InfraError(f"cannot connect to the controller at {path}: {e.strerror}") from e
        sock.settimeout(None)
        return cls(sock, path)

    def send(self, op: str, /, **fields: Any) -> int:
        """Send one request without waiting; returns its ``id``. Low level: see ``stream``."""
        self._next_id += 1
        rid = self._next_id
        data = _encode({**fields, "op": op, "id": rid})
        if len(data) > MAX_LINE + 1:
            raise MnpError(f"request {op!r} is larger than {MAX_LINE // (1 << 20)} MiB")
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise InfraError("controller closed the connection") from e
        return rid

    def receive(self) -> dict[str, Any]:
        """The next message on the connection, whatever its ``id``; raises only if none comes."""
        try:
            self._sock.settimeout(self.timeout)
            line = self._rfile.readline(MAX_LINE + 1)
        except TimeoutError as e:
            raise InfraError(f"the controller did not answer within {self.timeout:g}s") from e
        except OSError as e:
            raise InfraError("controller closed the connection") from e
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE:
                raise InfraError(f"the controller sent a line longer than {MAX_LINE} bytes")
            raise InfraError("controller closed the connection")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise InfraError(f"malformed line from the controller: {line[:200]!r}") from e
        if not isinstance(msg, dict):
            raise InfraError(f"malformed line from the controller: {line[:200]!r}")
        return msg

    def _next_for(self, rid: int) -> dict[str, Any]:
        while True:
            msg = self.receive()
            mid = msg.get("id")
            if mid is None and msg.get("ok") is False:
                raise error_from_response(msg)
            if mid != rid:
                continue  # the rest of an earlier request's responses
            if msg.get("ok") is False:
                raise error_from_response(msg)
            return msg

    def request(self, op: str, /, **fields: Any) -> dict[str, Any]:
        """Send a request and return its first response (raising if it is an error).

        For ops that answer with several messages use ``stream``; the messages
        ``request`` leaves unread are skipped by the next call.
        """
        return self._next_for(self.send(op, **fields))

    def stream(self, op: str, /, **fields: Any) -> Iterator[dict[str, Any]]:
        """Send a request now; iterate over its responses, the ``end`` one included.

        An error response raises its ``MnpError``. To stop following an endless
        stream early, ``close()`` the client: the server sees the client gone.
        """
        rid = self.send(op, **fields)

        def messages() -> Iterator[dict[str, Any]]:
            while True:
                msg = self._next_for(rid)
                yield msg
                if msg.get("end"):
                    return

        return messages()

    def close(self) -> None:
        self._rfile.close()
        self._sock.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- server


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
        data = _encode(out)  # a value json can't encode raises here, in the handler
        if end:
            self.done = True
        if len(data) > self._max_line + 1:
            self.done = True
            data = _encode(
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
            addr, fd = _unix_address(self.path)
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
            _connect(probe, self.path)
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
                await conn.write(_encode(_error(error, 3)))
                return
            while True:
                line = await self._read_line(reader)
                if line is None or self._closing:
                    return
                if isinstance(line, _TooLong):
                    error = f"request line longer than {self._max_line} bytes"
                    await conn.write(_encode(_error(error, 2)))
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
        return _encode(_error(f"malformed request (not JSON): {e}", 2))
    if not isinstance(request, dict):
        return _encode(_error("malformed request: expected a JSON object", 2))
    op = request.get("op")
    if not isinstance(op, str) or not op:
        extra = {"id": request["id"]} if "id" in request else {}
        return _encode(_error('malformed request: "op" must be a non-empty string', 2, **extra))
    return request


__all__ = [
    "MAX_LINE",
    "SOCKET_NAME",
    "ApiClient",
    "ApiServer",
    "Handler",
    "Responder",
    "error_from_response",
    "socket_path",
]
