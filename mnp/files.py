"""Reading the files a user names (definitions, inventories, hostfiles, secrets).

Only regular files are read. A FIFO would block the reader until someone writes
to it (``mnp validate fifo.toml`` hung; a secret ``{ file = FIFO }`` would stall
the controller's loop), a device can be endless or have side effects on open, a
directory or socket cannot be read at all: each is refused by what it is,
without being opened (and a file swapped for one in between is caught by
``fstat`` on a non-blocking descriptor).
"""

from __future__ import annotations

import errno
import os
import stat

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotARegularFile(OSError):
    """``strerror`` says what the path is instead: ``is a FIFO (named pipe)``."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(0, f"is {kind}, not a regular file", path)
        self.kind = kind


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the regular file at ``path`` (the caller sees
    whether it is over ``limit``). Raises ``NotARegularFile`` for anything else, and
    ``OSError`` as ``open`` does (``FileNotFoundError``, ``PermissionError``, ...)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(os.fspath(path), kind_of(st.st_mode))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(os.fspath(path), kind_of(st.st_mode))
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            data = os.read(fd, min(left, 1 << 20))
            if not data:
                break
            chunks.append(data)
            left -= len(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never blocks on a FIFO and returns only a regular file's
    descriptor (in blocking mode); anything else raises ``NotARegularFile``."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO nobody reads, a socket
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise NotARegularFile(os.fspath(path), kind_of(st.st_mode)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(os.fspath(path), kind_of(st.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
