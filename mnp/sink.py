"""Where ``mnp run`` writes its job's output, and what it does when the reader goes away.

Light on purpose (no asyncio, no controller): the CLI imports it to stream a job's
output from a running controller, and the in-process controller's printer writes
through it too, so both behave alike:

- ``mnp run ... | head -1``: once stdout's reader has gone, ``on_closed`` is called (the
  job is terminated with ``STDOUT_CLOSED``), the rest of the output is dropped, and
  ``mnp run`` exits ``EXIT_STDOUT_CLOSED`` (141, as a filter killed by SIGPIPE);
- a closed stderr only drops what goes to stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TextIO

INTERRUPTED = "Interrupted by the user (mnp run)"
STDOUT_CLOSED = "Standard output of mnp run closed"
EXIT_STDOUT_CLOSED = 128 + 13  # 141: what a shell reports for a process killed by SIGPIPE


class Sink:
    """stdout (fd 1) and stderr (fd 2) of ``mnp run``."""

    def __init__(
        self,
        on_closed: Callable[[], None] | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.streams = {1: stdout or sys.stdout, 2: stderr or sys.stderr}
        self.on_closed = on_closed  # called once, when stdout's reader has gone
        self.closed: set[int] = set()

    def write(self, fd: int, text: str) -> None:
        if not text or fd in self.closed:
            return
        out = self.streams.get(fd, self.streams[1])
        try:
            out.write(text)
            out.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.closed.add(fd)
            silence(out)
            if fd == 1 and self.on_closed is not None:
                self.on_closed()


def silence(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at /dev/null, so that what is still buffered in it
    (and the interpreter's last flush) goes nowhere instead of raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
