"""Runnable requests per queue, kept in submission (``seq``) order without re-sorting
on every scheduling pass: a queue is re-sorted only after an out-of-order insert
(a retried job goes back to its place, not to the tail)."""

from __future__ import annotations

from collections.abc import Iterator

from mnp.model import Request


class RunQueue:
    def __init__(self) -> None:
        self._queues: dict[str, dict[str, Request]] = {}
        self._last_seq: dict[str, int] = {}
        self._unsorted: set[str] = set()

    def add(self, req: Request) -> None:
        q = self._queues.setdefault(req.queue, {})
        q[req.key] = req
        if req.seq < self._last_seq.get(req.queue, -1):
            self._unsorted.add(req.queue)
        else:
            self._last_seq[req.queue] = req.seq

    def discard(self, req: Request) -> None:
        q = self._queues.get(req.queue)
        if q is not None:
            q.pop(req.key, None)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return any(self._queues.values())

    def by_queue(self) -> dict[str, Iterator[Request]]:
        """Each queue's requests in seq order (iterators: a pass reads only what it needs)."""
        for name in self._unsorted:
            q = self._queues[name]
            self._queues[name] = dict(sorted(q.items(), key=lambda kv: kv[1].seq))
        self._unsorted.clear()
        # no copy: decide() only reads them, and the controller dequeues what it placed
        # after decide() has returned (a dict must not change while it is iterated)
        return {name: iter(q.values()) for name, q in self._queues.items() if q}
