"""The files the recording writes besides the store: one task's log file (``TaskLog``),
and what ``events.jsonl`` and ``logs/`` say about the numbering at start."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mnp.files import open_regular
from mnp.jobid import top_of
from mnp.jobs import Job

log = logging.getLogger("mnp")


class TaskLog:
    """One task's stdout or stderr file. Nothing here raises: a failure (the file cannot
    be made, the disk is full) drops the output from then on and is returned, once, as
    ``PATH: ERROR``; ``error`` keeps it."""

    def __init__(self, job: Job, path: Path) -> None:
        self.job = job
        self.path = path
        self.error: str | None = None
        self.file: IO[str] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # task output is exact: surrogate escapes are written as the bytes they stand for
            self.file = open(path, "a", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        except OSError as e:
            self.error = f"{e.filename or path}: {e.strerror or e}"

    def write(self, data: str) -> str | None:
        try:
            return self._do(lambda f: f.write(data))
        except UnicodeEncodeError:  # a surrogate that stands for no byte: not from an agent
            text = data.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            return self._do(lambda f: f.write(text))

    def flush(self) -> str | None:
        return self._do(lambda f: f.flush())

    def close(self) -> str | None:
        error = self._do(lambda f: f.close())
        self.file = None
        return error

    def _do(self, action: Callable[[IO[str]], object]) -> str | None:
        if self.file is None:
            return None
        try:
            action(self.file)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.file.close()  # the fd goes even when the flush in it fails again
            self.file = None
            self.error = f"{self.path}: {e.strerror or e}"
            return self.error
        return None


def highest_log_id(logs: Path) -> int:
    """The highest job id with a folder in ``logs/`` (0 if none)."""
    try:
        names = os.listdir(logs)
    except OSError:
        return 0
    return max((int(n) for n in names if n.isdigit()), default=0)


def events_tail(path: Path) -> tuple[int, int] | None:
    """The ``seq`` of the last whole line of ``events.jsonl`` and the highest top-level
    job id among its last lines ((0, 0) if none, None if it cannot be read); a torn last
    line (the controller died mid-write) is cut off."""
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = max(0, end - 65536)
            f.seek(start)
            tail = f.read()
    except FileNotFoundError:
        return 0, 0
    except OSError as e:
        log.error("events: cannot read %s: %s", path, e.strerror or e)
        return None
    cut = tail.rfind(b"\n") + 1
    if cut < len(tail) and (cut or start == 0):
        try:
            os.truncate(path, start + cut)
        except OSError as e:
            log.error("events: cannot cut the torn last line of %s: %s", path, e.strerror or e)
    last: int | None = None
    top = 0
    for line in reversed(tail[:cut].splitlines()):
        with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
            event = json.loads(line)
            if last is None:
                last = int(event["seq"])
            root = top_of(str(event["job_id"]))
            if root.isdigit():
                top = max(top, int(root))
    return last or 0, top
