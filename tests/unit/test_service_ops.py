"""The control socket's op table: every documented op has a handler, and no handler
answers an op the documentation does not name; ``dispatch`` is how requests reach them."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest

import mnp.service
from mnp.api import Responder
from mnp.daemon import Daemon, dispatch
from mnp.errors import UsageError
from mnp.service import Service
from mnp.spec import local_inventory


def documented_ops() -> list[str]:
    """The ops listed under "The control socket's ops" in ``mnp.service``'s docstring."""
    doc = mnp.service.__doc__ or ""
    section = doc[doc.index("The control socket's ops") :]
    return re.findall(r"^- ``([a-z_]+)``", section, re.MULTILINE)


class Answers:
    """A ``Responder`` that keeps what it is told."""

    def __init__(self) -> None:
        self.sent: list[Mapping[str, Any]] = []
        self.ended: Mapping[str, Any] | None = None

    async def send(self, msg: Mapping[str, Any]) -> None:
        self.sent.append(msg)

    async def end(self, msg: Mapping[str, Any] | None = None) -> None:
        self.ended = msg or {}


async def table(home: Path) -> tuple[Service, Daemon, dict[str, Any]]:
    service = Service(home, local_inventory(1), "local:1")
    daemon = Daemon(home, asyncio.get_running_loop())
    return service, daemon, service.ops(daemon)


def test_the_op_table_names_exactly_the_documented_ops(tmp_path: Path) -> None:
    docs = documented_ops()
    assert len(docs) == len(set(docs)) >= 11, docs
    service, daemon, ops = asyncio.run(table(tmp_path))
    try:
        assert sorted(ops) == sorted(docs)
        assert all(inspect.iscoroutinefunction(fn) for fn in ops.values())
        # the daemon's own ops are answered by the daemon, the others by the service
        assert ops["ping"] == daemon.ping and ops["shutdown"] == daemon.shutdown
        assert ops["submit"] == service.handlers.submit
    finally:
        service.store.close()


def test_dispatch_answers_through_the_table_and_refuses_an_unknown_op(tmp_path: Path) -> None:
    async def go() -> tuple[Answers, Answers, str]:
        service, _, ops = await table(tmp_path)
        try:
            handle = dispatch(ops)
            ping, info = Answers(), Answers()
            await handle({"op": "ping"}, cast(Responder, ping))
            await handle({"op": "info"}, cast(Responder, info))
            with pytest.raises(UsageError) as refused:
                await handle({"op": "op_info"}, cast(Responder, Answers()))
            return ping, info, str(refused.value)
        finally:
            service.store.close()

    ping, info, refused = asyncio.run(go())
    assert ping.ended is not None and ping.ended["home"] == str(tmp_path)
    assert info.ended == {"ok": True, "inventory": "local:1", "hosts": 1, "warnings": []}
    assert refused == "unknown request 'op_info'"
