"""Purges over the socket and the retention setting, in bounded steps that let the
controller's loop run between them (see ``mnp.purge`` for what a purge removes)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from mnp.errors import InfraError, MnpError
from mnp.purge import remove_logs, retention_every
from mnp.service.recording import Recording
from mnp.store.db import PURGE_CHUNK, SWEEP_BUDGET

if TYPE_CHECKING:
    from mnp.controller import Controller

log = logging.getLogger("mnp")


class Housekeeping:
    """Purges (one at a time) and the retention loop of one controller's home."""

    def __init__(
        self, recording: Recording, controller: Controller, retention: float | None
    ) -> None:
        self.recording = recording
        self.store = recording.store
        self.controller = controller
        self.retention = retention
        self._purging = asyncio.Lock()

    async def keep_house(self) -> None:
        """Finish a purge a previous controller left half done, then apply the retention
        setting at start and every ``retention_every`` seconds."""
        try:
            if self.store.purge_pending() or self.store.events_file_stale():
                await self.purge(None, None, select=False)
        except MnpError as e:
            log.error("purge: finishing an earlier purge: %s (tried again at the next)", e)
        while self.retention is not None:
            try:
                ids, _ = await self.purge(time.time() - self.retention, None)
            except MnpError as e:
                log.error("retention: %s (tried again later)", e)
            except Exception:  # a bug: said, and the controller goes on
                log.exception("retention: purging finished jobs failed")
            else:
                if ids:
                    log.info("retention: purged %d finished job(s)", len(ids))
            await asyncio.sleep(retention_every(self.retention))

    async def purge(
        self, before: float | None, state: str | None, *, select: bool = True
    ) -> tuple[list[str], list[str]]:
        """Purge finished jobs (see ``mnp.purge``) in bounded steps, letting the loop run
        between them: one transaction of at most ``PURGE_CHUNK`` jobs or about
        ``SWEEP_BUDGET`` rows at a time, logs removed and ``events.jsonl`` written anew
        in a thread. ``select=False``: only finish what earlier purges left."""
        async with self._purging:
            ids: list[str] = []
            errors = await self._sweep()
            while select:
                failed = self.recording.flush()
                if failed is not None:
                    raise InfraError(f"purge: {failed}")
                chunk = self.store.purge(before, state=state, limit=PURGE_CHUNK)
                self.controller.forget(chunk)
                ids += chunk
                errors += await self._sweep()
                if len(chunk) < PURGE_CHUNK:
                    break
            for e in errors:
                log.warning("purge: cannot remove %s", e)
            if self.store.events_file_stale():
                await self.recording.rewrite_events()
            return ids, errors

    async def _sweep(self) -> list[str]:
        """What purged jobs left, a bounded transaction at a time; their logs in a thread."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        while True:
            await asyncio.sleep(0)  # the loop runs between steps
            done, more = self.store.sweep_purged(SWEEP_BUDGET)
            if done:
                errors += await loop.run_in_executor(None, remove_logs, self.recording.logs, done)
                self.store.purge_done(done)
            if not more:
                return errors
