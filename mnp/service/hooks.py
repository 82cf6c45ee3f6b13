"""Event hooks: the inventory's ``[[notifications]]``, run for every matching event.

Each hook has one worker (an asyncio task) and a queue of the events it matches,
fed by ``Hooks.committed`` once the store has committed them (so a hook sees
exactly what ``mnp events`` shows). A worker delivers its events one after
another, in ``seq`` order, never in the controller's way:

- ``command``: run as a detached process (its own session; stdin the event's
  JSON line, from a temporary file, so nothing ever blocks on a pipe), polled
  until it exits or ``RUN_TIMEOUT`` passes (then killed); exit 0 is delivered.
- ``url``: the JSON POSTed with ``urllib`` (standard library, in a thread); a 2xx
  answer is delivered. No HTTP dependency is needed for that, so the webhook
  form is offered.

A failure is logged and tried again after 1, 2, 4, 8 and 16 s (``BACKOFF``); after
the last try the event is given up on (logged as an error) and the worker goes on.

At least once across restarts: after each event is done with (delivered or given
up on), its ``seq`` is written to ``$MNP_HOME/hooks/KEY.seq`` (``KEY`` a digest of
the hook's table), and a controller starting again re-queues, from the store, the
events after it. Events delivered when the controller stopped are delivered again
then; a new hook starts from the events after it was added, not from history.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnp.model import Notification

if TYPE_CHECKING:
    from mnp.store import Store

log = logging.getLogger("mnp")

BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds before each try again; len+1 tries in all
RUN_TIMEOUT = 60.0  # seconds a hook command or request may take
BACKLOG_MAX = 100_000  # events re-queued at start, at most, per hook
HOOKS_DIR = "hooks"


def hook_key(n: Notification) -> str:
    """A stable name for a hook: a digest of its table (a changed hook is a new one)."""
    doc = json.dumps(
        [n.command, n.url, n.states, n.queues, n.job_name], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def matches(n: Notification, event: dict[str, Any]) -> bool:
    """Whether ``event`` passes ``n``'s ``states``, ``queues`` and ``job_name`` filters."""
    if n.states is not None and event.get("status") not in n.states:
        return False
    if n.queues is not None and event.get("queue") not in n.queues:
        return False
    return n.job_name is None or fnmatch.fnmatchcase(str(event.get("name") or ""), n.job_name)


def _label(n: Notification) -> str:
    return n.url if n.url is not None else " ".join(n.command or ())


class _Hook:
    def __init__(self, n: Notification, folder: Path) -> None:
        self.n = n
        self.label = _label(n)
        self.seq_path = folder / f"{hook_key(n)}.seq"
        self.queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.done = 0  # the seq of the last event done with
        self.task: asyncio.Task[None] | None = None

    def read_done(self) -> int | None:
        try:
            return int(self.seq_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def write_done(self, seq: int) -> None:
        self.done = seq
        tmp = self.seq_path.with_suffix(".tmp")
        try:
            tmp.write_text(f"{seq}\n")
            os.replace(tmp, self.seq_path)
        except OSError as e:
            log.warning("hook %s: cannot remember event %d: %s", self.label, seq, e)

    async def work(self) -> None:
        while True:
            seq, line = await self.queue.get()
            if seq <= self.done:
                continue
            for tries, delay in enumerate((*BACKOFF, None), start=1):
                error = await self.deliver(line)
                if error is None:
                    break
                if delay is None:
                    log.error(
                        "hook %s: event %d given up after %d tries: %s",
                        self.label,
                        seq,
                        tries,
                        error,
                    )
                    break
                log.warning(
                    "hook %s: event %d: %s (trying again in %gs)", self.label, seq, error, delay
                )
                await asyncio.sleep(delay)
            self.write_done(seq)

    async def deliver(self, line: str) -> str | None:
        """None once delivered, else what went wrong."""
        if self.n.url is not None:
            return await asyncio.to_thread(_post, self.n.url, line.encode())
        return await _run(self.n.command or (), line.encode())


async def _run(command: Sequence[str], data: bytes) -> str | None:
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stderr:
        stdin.write(data)
        stdin.seek(0)
        try:
            # Popen only forks and execs (no wait); the exit is polled below, and a
            # Popen (not asyncio's transport) leaves it running if the controller stops
            proc = subprocess.Popen(  # noqa: ASYNC220
                list(command),
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # outlives a controller that stops meanwhile
            )
        except OSError as e:
            return f"cannot run {command[0]}: {e.strerror or e}"
        deadline = time.monotonic() + RUN_TIMEOUT
        pause = 0.01
        while (code := proc.poll()) is None:
            if time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, 9)
                await asyncio.to_thread(proc.wait)
                return f"still running after {RUN_TIMEOUT:g}s; killed"
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)
        if code == 0:
            return None
        stderr.seek(0)
        said = stderr.read()[-500:].decode(errors="replace").strip()
        how = f"exit code {code}" if code > 0 else f"signal {-code}"
        return f"{how}" + (f": {said}" if said else "")


def _post(url: str, data: bytes) -> str | None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=RUN_TIMEOUT) as resp:
            status = int(resp.status)
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", None) or e)
    return None if 200 <= status < 300 else f"HTTP {status}"


class Hooks:
    """The hooks of an inventory, for one controller: ``start`` (re-queue what an
    earlier controller left undelivered), ``committed`` (the events a flush wrote),
    ``close``."""

    def __init__(self, home: Path, notifications: Sequence[Notification], store: Store) -> None:
        self.folder = home / HOOKS_DIR
        self.store = store
        self.hooks = [_Hook(n, self.folder) for n in notifications]

    def start(self) -> None:
        """Before anything new is committed: each hook's backlog, then its worker."""
        if not self.hooks:
            return
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            log.error("hooks: cannot create %s: %s", self.folder, e)
        top = self.store.max_event_seq()
        for hook in self.hooks:
            done = hook.read_done()
            if done is None:  # a new hook: the events from now on
                hook.write_done(top)
            else:
                hook.done = done
                rows = self.store.events_since(done, limit=BACKLOG_MAX)
                self._queue(hook, [(int(r["seq"]), r) for r in rows])
                if rows:
                    log.info("hook %s: %d event(s) to deliver again", hook.label, len(rows))
            hook.task = asyncio.ensure_future(hook.work())

    def _queue(self, hook: _Hook, events: list[tuple[int, dict[str, Any]]]) -> None:
        for seq, ev in events:
            if matches(hook.n, ev):
                hook.queue.put_nowait((seq, json.dumps(ev) + "\n"))

    def committed(self, lines: Sequence[str]) -> None:
        """Queue the events of ``lines`` (committed JSON lines) for the hooks they match."""
        if not self.hooks:
            return
        events = []
        for line in lines:
            try:
                ev = json.loads(line)
                events.append((int(ev["seq"]), ev))
            except (ValueError, KeyError, TypeError):
                continue
        for hook in self.hooks:
            self._queue(hook, events)

    async def close(self) -> None:
        """Stop the workers; what they had not done is delivered by the next controller
        (a command that is running goes on running)."""
        for hook in self.hooks:
            if hook.task is not None:
                hook.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await hook.task
                hook.task = None
