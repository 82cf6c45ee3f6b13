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

import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

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


class RunStream:
    """What ``mnp run`` prints from the messages of a ``run`` request, as a controller
    sends them (``{"job_id"}``, then ``{"out", "fd", "tid", "label"}``..., then the end
    with ``state``, ``reason``, ``exit_code``), and the exit code it ends with. The same
    whether the controller is another process (the socket) or this one."""

    def __init__(self, on_stdout_closed: Callable[[], None] | None = None) -> None:
        from mnp.views import PrefixedLines

        self.sink = Sink(on_closed=on_stdout_closed)
        self.lines = PrefixedLines()
        self.prefixes: dict[tuple[str, int], str] = {}
        self.job_id: str | None = None
        self.outcome: dict[str, Any] = {}

    def feed(self, msg: Mapping[str, Any]) -> None:
        if "out" in msg:
            key = (msg["tid"], msg["fd"])
            label = msg.get("label")
            prefix = self.prefixes[key] = f"{label}: " if label is not None else ""
            self.sink.write(msg["fd"], self.lines.feed(key, msg["out"], prefix))
        elif msg.get("end"):
            self.outcome = dict(msg)
        elif "job_id" in msg:
            self.job_id = str(msg["job_id"])
            for w in msg.get("warnings", ()):
                if w:
                    self.sink.write(2, f"mnp: warning: {w}\n")

    def finish(self, *, verbose: bool = False, interrupted: bool = False) -> int:
        """Write the unfinished last lines and what went wrong; the exit code."""
        for key, prefix in self.prefixes.items():
            self.sink.write(key[1], self.lines.rest(key, prefix))
        outcome = self.outcome
        if verbose:
            for i, t in enumerate(outcome.get("timings", []), 1):
                self.sink.write(2, f"mnp: job {self.job_id} attempt {i}: {json.dumps(t)}\n")
        if 1 in self.sink.closed:
            return EXIT_STDOUT_CLOSED
        if outcome.get("state") == "FAILED" and outcome.get("reason"):
            self.sink.write(2, f"mnp: job {self.job_id} FAILED: {outcome['reason']}\n")
        return 130 if interrupted else int(outcome.get("exit_code", 1))
