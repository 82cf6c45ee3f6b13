"""The control socket's client: blocking, standard library only (json, os, socket).

The CLI imports this module, and only this one of ``mnp.api``, on every command that
talks to the controller: it must never import asyncio, logging or asyncssh (a test
checks). The wire format it shares with the server (``encode``, ``MAX_LINE``, the
socket's path and address) lives here too; the protocol is in ``mnp.api``'s docstring.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from mnp.errors import InfraError, JobRefused, MnpError

if TYPE_CHECKING:
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


def encode(msg: Mapping[str, Any]) -> bytes:
    """One line of JSON. Text that is not valid Unicode (command-line arguments, paths
    and task output holding bytes that are not UTF-8, which Python keeps as surrogate
    escapes) travels as JSON escapes (``\\udce9``) and reads back exactly."""
    text = _dumps_utf8(msg)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return _dumps_ascii(msg).encode() + b"\n"


def unix_address(path: str) -> tuple[str, int | None]:
    """An address ``bind``/``connect`` accept for ``path``, and a dir fd to close after.

    A path longer than ``sun_path`` is reached through ``/proc/self/fd/N`` of
    its directory, so a deep ``--home`` still works.
    """
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path, None
    parent, name = os.path.split(path)
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{name}", fd


def connect_unix(sock: socket.socket, path: str) -> None:
    addr, fd = unix_address(path)
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
            connect_unix(sock, path)
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
        data = encode({**fields, "op": op, "id": rid})
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


__all__ = [
    "MAX_LINE",
    "SOCKET_NAME",
    "ApiClient",
    "connect_unix",
    "encode",
    "error_from_response",
    "socket_path",
    "unix_address",
]
