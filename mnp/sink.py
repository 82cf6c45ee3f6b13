"""Where ``mnp run`` writes its job's output, and what it does when the reader goes away.

Light on purpose (no asyncio, no controller): the CLI imports it to stream a job's
output from a running controller, and the in-process controller's printer writes
through it too, so both behave alike:

- ``mnp run ... | head -1``: once stdout's reader has gone, ``on_closed`` is called (the
  job is terminated with ``STDOUT_CLOSED``), the rest of the output is dropped, and
  ``mnp run`` exits ``EXIT_STDOUT_CLOSED`` (141, as a filter killed by SIGPIPE);
- a closed stderr only drops what goes to stderr.

An array or multi-node job run with stderr on a terminal also gets a one-line progress
display there (``Progress``, drawn by ``Sink.status``): cleared before each line of
output and drawn again after it, so output and progress never mix; nothing of it when
stderr is not a terminal.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from mnp.model import JobDefinition

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
        self.line = ""  # the progress line on stderr (a terminal), "" when none is drawn
        self.lock = threading.RLock()  # a progress thread draws too

    def write(self, fd: int, text: str) -> None:
        if not text or fd in self.closed:
            return
        with self.lock:
            line = self.line
            if line:
                self.status("")
            self._write(fd, text)
            if line:
                self.status(line)

    def _write(self, fd: int, text: str) -> None:
        out = self.streams.get(fd, self.streams[1])
        try:
            out.write(text)
            out.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.closed.add(fd)
            silence(out)
            if fd == 1 and self.on_closed is not None:
                self.on_closed()

    def status(self, line: str) -> None:
        """Draw ``line`` over the progress line on stderr ("": clear it)."""
        with self.lock:
            if line == self.line or 2 in self.closed:
                return
            self._write(2, "\r\x1b[K" + line)
            self.line = line


class Progress:
    """How far an array's children or a multi-node job's nodes are, from the job's
    state-change events: ``feed`` each, ``line`` to show."""

    def __init__(
        self, job_id: str, total: int, unit: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.job_id, self.total, self.unit, self.clock = job_id, total, unit, clock
        self.states: dict[str, str] = {}
        self.cut = 0  # children ended FAILED unreleased (one ``array-children-ended`` event)
        self.started = clock()

    @staticmethod
    def of(defn: JobDefinition) -> tuple[int, str] | None:
        """``(total, unit)`` for a job worth a progress line; None for a single job."""
        if defn.array is not None:
            return defn.array.size, "children"
        if defn.multinode is not None:
            return defn.multinode.num_nodes, "nodes"
        return None

    def feed(self, event: Mapping[str, Any]) -> None:
        subject, status = str(event.get("job_id") or ""), event.get("status")
        if event.get("type") == "array-children-ended" and subject == self.job_id:
            self.cut = int(event.get("count") or 0)
            return
        if event.get("type") != "job-state-change" or not isinstance(status, str):
            return
        if self.unit == "children" and subject.startswith(self.job_id + ":") and "#" not in subject:
            self.states[subject] = status
        elif self.unit == "nodes" and subject.startswith(self.job_id + "#"):
            self.states[subject] = status

    def line(self) -> str:
        counts = {"SUCCEEDED": 0, "FAILED": 0, "RUNNING": 0, "STARTING": 0}
        for s in self.states.values():
            if s in counts:
                counts[s] += 1
        return progress_line(
            self.job_id,
            self.total,
            self.unit,
            counts["SUCCEEDED"],
            counts["RUNNING"] + counts["STARTING"],
            counts["FAILED"] + self.cut,
            self.clock() - self.started,
        )


def progress_line(
    job_id: str, total: int, unit: str, done: int, running: int, failed: int, elapsed: float
) -> str:
    """``mnp: job 7: 40/100 children done, 8 running, 2 failed; 3.1/s, about 19s left``."""
    ended = done + failed
    text = f"mnp: job {job_id}: {done}/{total} {unit} done, {running} running, {failed} failed"
    if ended and elapsed > 0:
        rate = ended / elapsed
        text += f"; {rate:.3g}/s"
        if ended < total:
            text += f", about {_duration((total - ended) / rate)} left"
    return text


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def wants_progress(stream: TextIO | None = None) -> bool:
    """Whether stderr is a terminal (a progress line is drawn only there)."""
    try:
        return (stream or sys.stderr).isatty()
    except (AttributeError, ValueError):
        return False


class ProgressThread:
    """Draws a ``Progress`` on ``sink`` from ``poll()`` (new events) every ``every``
    seconds, until ``stop``: for ``mnp run`` through a controller's socket, whose run
    stream carries output only; the events come from the store."""

    def __init__(
        self,
        sink: Sink,
        progress: Progress,
        poll: Callable[[], list[dict[str, Any]]],
        every: float = 0.25,
    ) -> None:
        self.sink, self.progress, self.poll, self.every = sink, progress, poll, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mnp-progress", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                for ev in self.poll():
                    self.progress.feed(ev)
            except Exception:  # a progress line is never worth failing the run for
                pass
            self.sink.status(self.progress.line())
            self.stopped.wait(self.every)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)
        self.sink.status("")


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
        self.progress: Progress | None = None  # made once the job id is known
        self.progress_of: tuple[int, str] | None = None  # (total, unit): draw progress
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
            if self.progress_of is not None:
                self.progress = Progress(self.job_id, *self.progress_of)
            for w in msg.get("warnings", ()):
                if w:
                    self.sink.write(2, f"mnp: warning: {w}\n")

    def show_progress(self, event: Mapping[str, Any]) -> None:
        """Feed an event to the progress line (if any) and draw it."""
        if self.progress is not None:
            self.progress.feed(event)
            self.sink.status(self.progress.line())

    def finish(self, *, verbose: bool = False, interrupted: bool = False) -> int:
        """Write the unfinished last lines and what went wrong; the exit code."""
        self.sink.status("")
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
