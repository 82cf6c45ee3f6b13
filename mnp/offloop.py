"""Work that may block, done off the controller's event loop, with a time bound.

The controller is one asyncio loop: a file read that blocks (a FIFO with no
writer, a hung NFS mount) or a slow lookup there would freeze every job. What
may block runs on a few daemon threads of its own instead, and the loop waits
for it at most ``within`` seconds: past that the caller gets ``TimeoutError``
and goes on (the thread, stuck in the kernel, is abandoned; being a daemon it
never holds the process up at exit). asyncio's default executor is not used:
stuck threads there would starve ``getaddrinfo`` and asyncssh, which run in it.

``read_regular_file`` is the bounded read: a regular file only (a FIFO, device,
socket or directory is refused without being read, so it cannot block), at most
``limit`` bytes.
"""

from __future__ import annotations

import asyncio
import os
import queue
import stat
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class OffLoop:
    """A few daemon threads that run blocking calls for one event loop."""

    def __init__(self, workers: int = 4, name: str = "mnp-offloop") -> None:
        self.workers = workers
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Callable[..., None]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    async def run(self, fn: Callable[[], T], within: float) -> T:
        """``fn()`` on a worker thread; its result, its exception, or TimeoutError."""
        if self._closed:
            raise RuntimeError("OffLoop is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        def report(ok: bool, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(settle, ok, value)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        self._start_worker()
        self._queue.put((fn, report))
        return await asyncio.wait_for(fut, within)

    def _start_worker(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._threads = [
                threading.Thread(target=self._work, name=self.name, daemon=True)
                for _ in range(self.workers)
            ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, report = item
            del item
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
                report(False, e)
            else:
                report(True, result)
            del fn, report

    def close(self) -> None:
        """Let the threads end once what they run is done (stuck ones are abandoned)."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)


class FileRefused(Exception):
    """A file that ``read_regular_file`` would not read, and why (never its content)."""


def read_regular_file(path: str, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (``~`` expanded), at most ``limit`` of them.

    Refused (``FileRefused``) without reading: what is not a regular file (FIFO,
    device, socket, directory: a read of those can block or never end) and what
    is larger than ``limit``. The file is opened non-blocking, then checked again
    (it may have been replaced in between)."""
    full = os.path.expanduser(path)
    try:
        st = os.stat(full)
        _check(st, limit)
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise FileRefused(e.strerror or str(e)) from None
    try:
        _check(os.fstat(fd), limit)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            data = os.read(fd, min(left, 1 << 16))
            if not data:
                break
            chunks.append(data)
            left -= len(data)
    except OSError as e:
        raise FileRefused(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    out = b"".join(chunks)
    if len(out) > limit:
        raise FileRefused(f"larger than {limit:,} bytes")
    return out


def _check(st: os.stat_result, limit: int) -> None:
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a directory"
            if stat.S_ISDIR(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise FileRefused(f"{kind}, not a regular file")
    if st.st_size > limit:
        raise FileRefused(f"{st.st_size:,} bytes, larger than {limit:,}")
