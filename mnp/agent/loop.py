"""The agent's plumbing: an epoll loop with timers, the event writer, and the
buffering of a task's output into whole-line `out` events."""

from __future__ import annotations

import codecs
import heapq
import os
import select
import time

from .jsonline import dumps

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Callable, Dict, List, Optional

    Timer = List[Any]  # [when, seq, callback or None when cancelled]


CHUNK = 65536  # largest `data` of one `out` event, in bytes of task output
FLUSH_DELAY = 0.025  # a partial line waits this long for its newline


_encode = dumps


class Loop:
    """epoll plus a heap of timers; callbacks run one at a time, in this thread."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.handlers: Dict[int, Callable[[], Any]] = {}
        self.timers: List[Timer] = []
        self._seq = 0

    def add_reader(self, fd: int, fn: Callable[[], Any]) -> None:
        """Call fn when fd is readable (or closed); OSError (EPERM) for regular files."""
        self.ep.register(fd, select.EPOLLIN)
        self.handlers[fd] = fn

    def add_writer(self, fd: int, fn: Callable[[], Any]) -> None:
        self.ep.register(fd, select.EPOLLOUT)
        self.handlers[fd] = fn

    def remove(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self.ep.close()

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        self._seq += 1
        entry: Timer = [when, self._seq, fn]
        heapq.heappush(self.timers, entry)
        return entry

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(time.monotonic() + delay, fn)

    @staticmethod
    def cancel(entry: Optional[Timer]) -> None:
        if entry is not None:
            entry[2] = None

    def run_once(self) -> None:
        timeout: Optional[float] = None
        while self.timers and self.timers[0][2] is None:
            heapq.heappop(self.timers)
        if self.timers:
            timeout = max(0.0, self.timers[0][0] - time.monotonic())
        for fd, _events in self.ep.poll(-1.0 if timeout is None else timeout):
            fn = self.handlers.get(fd)
            if fn is not None:  # an earlier handler may have removed it
                fn()
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            fn = heapq.heappop(self.timers)[2]
            if fn is not None:
                fn()


class Output:
    """Events to the controller, one JSON object a line on fd 1, written whole.

    Writes block: the controller is expected to read. Once `detached` (the controller
    is gone: stdin closed or a signal), writes become best effort and never block, so
    a dead channel cannot stop the teardown.
    """

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self.lines: List[str] = []
        self.size = 0
        self.dead = False
        self.detached = False

    def emit(self, event: Dict[str, Any]) -> None:
        if self.dead:
            return
        line = _encode(event)
        self.lines.append(line)
        self.size += len(line)
        if self.size >= 1 << 20:
            self.flush()

    def detach(self) -> None:
        self.detached = True
        try:
            os.set_blocking(self.fd, False)
        except OSError:
            self.dead = True

    def close(self) -> None:
        """Write what is left; leave the descriptor blocking again (it may be a terminal)."""
        self.flush()
        if self.detached:
            try:
                os.set_blocking(self.fd, True)
            except OSError:
                pass

    def flush(self) -> None:
        if not self.lines:
            return
        data = ("\n".join(self.lines) + "\n").encode("ascii")
        self.lines = []
        self.size = 0
        view = memoryview(data)
        while view and not self.dead:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                if self.detached:
                    return  # nobody is reading: drop what does not fit
            except OSError:
                self.dead = True


class Stream:
    """One output pipe (stdout or stderr) of a task."""

    __slots__ = ("loop", "out", "tid", "fd", "num", "buf", "decoder", "timer")

    def __init__(self, loop: Loop, out: Output, tid: str, fd: int, num: int) -> None:
        self.loop = loop
        self.out = out
        self.tid = tid
        self.fd = fd
        self.num = num
        self.buf = b""
        self.decoder: Optional[codecs.IncrementalDecoder] = None
        self.timer: Optional[Timer] = None
        loop.add_reader(fd, self.read)

    def read(self) -> bool:
        """Read once; True when data came (False: nothing there now, or closed)."""
        if self.fd < 0:
            return False
        try:
            # self.buf (a partial line) is shorter than CHUNK, and so is what we emit
            data = os.read(self.fd, CHUNK - len(self.buf))
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.close()
            return False
        buf = self.buf + data if self.buf else data
        if len(buf) >= CHUNK:
            self.buf = b""
            self._emit(buf)
            return True
        end = buf.rfind(b"\n") + 1
        if end:
            self._emit(buf[:end])
        self.buf = buf[end:]
        if self.buf and self.timer is None:
            self.timer = self.loop.call_later(FLUSH_DELAY, self.flush)
        return True

    def drain(self) -> None:
        """Read until the pipe is empty, then emit any partial line."""
        while self.read():
            pass
        self.flush()

    def flush(self) -> None:
        self.loop.cancel(self.timer)
        self.timer = None
        if self.buf:
            buf, self.buf = self.buf, b""
            self._emit(buf)

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove(self.fd)
            os.close(self.fd)
            self.fd = -1
        self.flush()
        if self.decoder is not None:
            self._text(self.decoder.decode(b"", True))
            self.decoder = None

    def _emit(self, data: bytes) -> None:
        # bytes that are not UTF-8 become surrogate escapes (U+DC80..U+DCFF, `\udcNN` in
        # the JSON line): the controller gets the exact bytes back; UTF-8 costs nothing more
        if self.decoder is None and data.endswith(b"\n"):
            text = data.decode("utf-8", "surrogateescape")
        else:
            # a partial line may end inside a UTF-8 sequence: keep its head for the next chunk
            if self.decoder is None:
                self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
            text = self.decoder.decode(data)
        self._text(text)

    def _text(self, text: str) -> None:
        if text:
            self.out.emit({"ev": "out", "tid": self.tid, "fd": self.num, "data": text})


class Feeder:
    """Writes a task's `stdin` text into its pipe without blocking, then closes it."""

    __slots__ = ("loop", "fd", "data")

    def __init__(self, loop: Loop, fd: int, data: bytes) -> None:
        self.loop = loop
        self.fd = fd
        self.data = memoryview(data)
        os.set_blocking(fd, False)
        if self.write():
            loop.add_writer(fd, self.write)

    def write(self) -> bool:
        """Write what fits; False once done (or the reader is gone) and closed."""
        try:
            while self.data:
                self.data = self.data[os.write(self.fd, self.data[:CHUNK]) :]
        except BlockingIOError:
            return True
        except OSError:
            pass
        self.close()
        return False

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove(self.fd)
            os.close(self.fd)
            self.fd = -1


class LineReader:
    """The lines of a descriptor (the agent's stdin), handed to `handle` one by one.

    At most `per_turn` lines are handled per loop turn, and reading pauses while
    some wait, so a burst of spawns lets exits and output through between its
    parts (and the agent's descriptor table, which every spawn copies, stays
    small). A line over `max_line` bytes is refused through `error` and skipped. At
    end of input `on_eof` runs once every complete line was handled; an unfinished
    last line is refused, never handled.
    """

    def __init__(
        self,
        loop: Loop,
        fd: int,
        handle: Callable[[bytes], None],
        error: Callable[[str], None],
        on_eof: Callable[[], None],
        max_line: int,
        per_turn: int = 64,
    ) -> None:
        self.loop = loop
        self.fd = fd
        self.handle = handle
        self.error = error
        self.on_eof = on_eof
        self.max_line = max_line
        self.per_turn = per_turn
        self.buf = bytearray()
        self.scanned = 0  # no newline in buf[:scanned]
        self.skipping = False  # inside a refused line, until its newline
        self.eof = False
        self.stopped = False
        self.listening = False
        self.polled = False  # a regular file: epoll refuses it, but it never blocks
        self.timer: Optional[Timer] = None
        self._listen(True)

    def stop(self) -> None:
        """Handle no more lines; stop reading."""
        self.stopped = True
        self._listen(False)
        self.loop.cancel(self.timer)
        self.timer = None

    def _listen(self, on: bool) -> None:
        if on == self.listening or (on and (self.eof or self.stopped)):
            return
        self.listening = on
        if self.polled:
            if on:
                self.loop.call_later(0.0, self._poll)
            return
        if not on:
            self.loop.remove(self.fd)
            return
        try:
            self.loop.add_reader(self.fd, self._on_readable)
        except PermissionError:
            self.polled = True
            self.loop.call_later(0.0, self._poll)

    def _poll(self) -> None:
        if self.listening:
            self._on_readable()
            if self.listening:
                self.loop.call_later(0.0, self._poll)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.eof = True
            self._listen(False)
        elif self.skipping:
            i = data.find(b"\n")
            if i >= 0:
                self.skipping = False
                self.buf += data[i + 1 :]
        else:
            self.buf += data
        self._take()

    def _take(self) -> None:
        self.timer = None
        buf = self.buf
        start = 0
        taken = 0
        more = False
        while not self.stopped:
            end = buf.find(b"\n", max(start, self.scanned))
            if end < 0:
                break
            if taken == self.per_turn:
                more = True
                break
            taken += 1
            if end - start > self.max_line:
                self.error("line longer than %d bytes refused" % self.max_line)
            else:
                self.handle(bytes(buf[start:end]))
            start = end + 1
        del buf[:start]
        if self.stopped:
            return
        if more:
            self.scanned = 0
            self.timer = self.loop.call_later(0.0, self._take)
            self._listen(False)
            return
        self.scanned = len(buf)
        if len(buf) > self.max_line:
            self.error("line longer than %d bytes refused" % self.max_line)
            del buf[:]
            self.scanned = 0
            self.skipping = True
        if self.eof:
            if buf.strip() and not self.skipping:
                self.error("incomplete last line ignored: %.80r" % (bytes(buf),))
            del buf[:]
            self.stopped = True
            self.on_eof()
        else:
            self._listen(True)
