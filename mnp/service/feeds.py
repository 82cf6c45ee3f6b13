"""What ``mnp run`` clients are sent while their jobs run: one ``Feed`` a client, kept
in ``Feeds`` by the job's top-level id (the recording publishes to them, the ``run``
op reads them)."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from mnp.jobid import top_of
from mnp.jobs import Job


class Feed:
    """What one ``mnp run`` client has yet to be sent: messages in order, of which the
    output (``"out"``) ones hold at most ``limit`` characters. Output that does not fit
    is dropped -- and what follows, until the client has taken everything kept -- then
    a note on stderr says how much the client missed. Other messages (the job's end)
    are never dropped."""

    def __init__(self, limit: int, job_id: str) -> None:
        self.limit = limit
        self.job_id = job_id
        self.items: collections.deque[dict[str, Any] | None] = collections.deque()
        self.size = 0  # characters of output in items
        self.dropped = 0  # characters dropped since the last note
        self._ready = asyncio.Event()

    def put(self, msg: dict[str, Any] | None) -> None:
        if msg is not None and "out" in msg:
            n = len(msg["out"])
            if self.dropped or self.size + n > self.limit:
                self.dropped += n
                return
            self.size += n
        self.items.append(msg)
        self._ready.set()

    async def get(self) -> dict[str, Any] | None:
        while not self.items or (self.items[0] is None and self.dropped):
            if self.dropped:  # said before the end, and before more output
                text = (
                    f"mnp: {self.dropped:,} characters of output not shown here: this client "
                    f"read more slowly than the job wrote; mnp logs {self.job_id} has it all\n"
                )
                self.dropped = 0
                return {"out": text, "fd": 2, "tid": "mnp", "label": None}
            self._ready.clear()
            await self._ready.wait()
        msg = self.items.popleft()
        if msg is not None and "out" in msg:
            self.size -= len(msg["out"])
        return msg


class Feeds:
    """The feeds of the ``mnp run`` clients now streaming, by top-level job id."""

    def __init__(self) -> None:
        self._by_job: dict[str, set[Feed]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_job)

    def watched(self, job: Job) -> bool:
        return top_of(job.id) in self._by_job

    def add(self, feed: Feed) -> None:
        self._by_job.setdefault(feed.job_id, set()).add(feed)

    def remove(self, feed: Feed) -> None:
        feeds = self._by_job.get(feed.job_id)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._by_job[feed.job_id]

    def publish(self, job: Job, msg: dict[str, Any]) -> None:
        for feed in self._by_job.get(top_of(job.id), ()):
            feed.put(msg)

    def to_all(self, msg: dict[str, Any]) -> None:
        for feeds in self._by_job.values():
            for feed in feeds:
                feed.put(msg)
