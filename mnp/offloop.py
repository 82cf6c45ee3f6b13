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
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mnp.files import read_regular

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
    """The bytes of the regular file ``path`` (``~`` expanded), at most ``limit`` of them
    (``mnp.files.read_regular``: what is not a regular file is refused without being
    read). Anything refused or failing is a ``FileRefused`` saying why."""
    try:
        out = read_regular(os.path.expanduser(path), limit)
    except OSError as e:
        raise FileRefused(e.strerror or str(e)) from None
    if len(out) > limit:
        raise FileRefused(f"larger than {limit:,} bytes")
    return out
