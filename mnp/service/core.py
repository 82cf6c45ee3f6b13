"""``Service``: the controller, its recording, its housekeeping and its op handlers,
put together for ``mnp controller start`` (``make_handler_factory``) and for ``mnp run``
hosting its own controller (``mnp.hosted``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnp.api import Handler
from mnp.controller import Controller, Restored
from mnp.errors import MnpError
from mnp.model import Inventory, JobState
from mnp.purge import EVENTS_NAME, retention_every
from mnp.service.feeds import Feeds
from mnp.service.hooks import Hooks
from mnp.service.ops import Handlers, socket_ops
from mnp.service.purging import Housekeeping
from mnp.service.recording import Recording
from mnp.spec import parse_definition, unverified_warning
from mnp.spec.units import format_duration
from mnp.state import open_store
from mnp.transport import transports_for

if TYPE_CHECKING:
    from mnp.daemon import Daemon, ShutdownFn

log = logging.getLogger("mnp")


class Service:
    def __init__(
        self,
        home: Path,
        inventory: Inventory,
        inventory_key: str = "",
        *,
        retention: float | None = None,
    ) -> None:
        self.home = home
        self.inventory = inventory
        self.inventory_key = inventory_key
        self.retention = retention
        self.store, self._restorable, corrupt = open_store(home, EVENTS_NAME)
        self.feeds = Feeds()
        self.recording = Recording(home, self.store, self.feeds)
        self.hooks = Hooks(home, inventory.notifications, self.store)
        self.recording.on_committed = self.hooks.committed
        token = self.store.get_meta("controller_token")
        if token is None:
            token = secrets.token_hex(8)
            self.store.set_meta("controller_token", token)
            self.store.flush()
        self.controller = Controller(
            inventory,
            transports_for(inventory),
            token=token,
            on_output=self.recording.output,
            on_task_start=self.recording.task_start,
            on_task_end=self.recording.task_end,
            recorder=self.recording,
        )
        self.recording.bind(self.controller)
        self.housekeeping = Housekeeping(self.recording, self.controller, retention)
        self.handlers = Handlers(self)
        self._housekeeping: asyncio.Task[None] | None = None
        self.started = time.time()
        warning = unverified_warning(inventory)
        # told to every client that uses this controller
        self.warnings = [w for w in (corrupt, warning) if w]

    def ops(self, daemon: Daemon) -> dict[str, Handler]:
        """The control socket's op table (``mnp.service.ops.socket_ops``)."""
        return socket_ops(self.handlers, daemon)

    def flush(self) -> str | None:
        """Write what the recording holds now (see ``Recording.flush``)."""
        return self.recording.flush()

    async def start(self, *, restore: bool = True) -> None:
        """Connect to the hosts and take back the unfinished jobs of an earlier controller
        (``restore``; ``mnp run`` hosting its own controller leaves them to the next
        daemon)."""
        for w in self.warnings:
            log.warning("%s", w)
        self.recording.catch_up_events()  # before anything new is committed
        self.hooks.start()  # re-queues what an earlier controller left undelivered
        self.controller.continue_numbering(self.store.max_job_seq())
        rows, self._restorable = (self._restorable if restore else []), []
        items = []
        for row in rows:
            definition = row.get("definition")
            if definition is None:
                continue
            try:
                defn = parse_definition(definition, f"<job {row['id']}>")
            except MnpError as e:
                log.error("job %s cannot be restored: %s", row["id"], e)
                continue
            items.append(
                Restored(
                    id=row["id"],
                    defn=defn,
                    seq=row["seq"],
                    state=JobState(row["state"]),
                    created=row["created"] or time.time(),
                    parent=row.get("parent"),
                    array_index=row.get("array_index"),
                    attempts=row.get("attempt_count") or 0,
                    reason=row.get("reason"),
                    released=row.get("released"),
                    ended=row.get("ended"),
                    cut=row.get("cut"),
                    cut_reason=row.get("cut_reason"),
                )
            )
        if items:
            log.info("restoring %d unfinished job(s)", len(items))
        # restored once the hosts are connected, before their agents' stale sweeps
        await self.controller.start(restored=items)
        self.recording.flush()
        self.recording.check_db_every()
        if self.retention is not None:
            log.info(
                "retention: finished jobs are purged %s after they end (checked every %s)",
                format_duration(self.retention),
                format_duration(retention_every(self.retention)),
            )
        self._housekeeping = asyncio.ensure_future(self.housekeeping.keep_house())

    async def shutdown(self) -> None:
        self.recording.stop_checking_db()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._housekeeping
            self._housekeeping = None
        await self.controller.close()
        # `run` clients learn that their job was stopped, not failed, and goes on later
        self.feeds.to_all({"stopping": True})
        for _ in range(200):  # up to 2 s for their handlers to answer
            if not self.feeds:
                break
            await asyncio.sleep(0.01)
        self.recording.close()
        await self.hooks.close()  # last: they had the shutdown's time to start on the last events


def make_handler_factory(
    home: Path, inventory: Inventory, inventory_key: str = "", retention: float | None = None
) -> Callable[[Daemon], Any]:
    """What ``daemon.serve_forever`` runs: build the service, then hand back its op table."""

    async def make_handler(daemon: Daemon) -> tuple[dict[str, Handler], ShutdownFn]:
        service = Service(home, inventory, inventory_key, retention=retention)
        try:
            await service.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await service.shutdown()
            raise
        return service.ops(daemon), service.shutdown

    return make_handler
