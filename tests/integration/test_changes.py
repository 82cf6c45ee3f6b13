"""Changes while the controller runs (drain, resume, ce/queue update, reload) on local
agents, with jobs running: nothing fails, nothing is lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mnp.controller import Controller
from mnp.errors import UsageError
from mnp.model import JobState
from mnp.spec import definition_from_command, parse_inventory
from mnp.transport.local import LocalTransport


def inventory(names: str) -> Any:
    return parse_inventory(
        {
            "hosts": [{"names": names, "transport": "local", "vcpus": 2}],
            "compute_environments": {"main": {"hosts": names}},
            "queues": {"default": {"compute_environments": ["main"]}},
        },
        "<test>",
    )


async def test_drain_resume_update_reload_while_jobs_run() -> None:
    c = Controller(inventory("h[1-3]"), {"local": LocalTransport()})
    await c.start()
    try:
        long = [c.submit(definition_from_command(["sleep", "1.5"])) for _ in range(3)]
        await asyncio.sleep(0.5)
        running_on = {j.attempt.grants[0].host for j in long if j.attempt is not None}
        assert running_on == {"h1", "h2", "h3"} or len(running_on) >= 2
        c.drain(["h1"], "maintenance")
        c.update_ce("main", state="ENABLED")
        with pytest.raises(UsageError):
            c.update_ce("main", min_vcpus=1)  # UNMANAGED: sizes do not apply
        summary = c.reload(inventory("h[1-2]"))  # h3 removed: drained, leaves once idle
        assert summary["hosts_removed"] == ["h3"]
        c.update_queue("default", priority=5)  # after the reload, which read priority 1
        short = [c.submit(definition_from_command(["true"])) for _ in range(6)]
        for j in long + short:
            await asyncio.wait_for(c.wait(j), 30)
        assert all(j.state is JobState.SUCCEEDED for j in long + short)
        assert all(len(j.attempts) == 1 for j in long + short)  # nothing lost or retried
        assert {j.attempt.grants[0].host for j in short if j.attempt} == {"h2"}
        assert "h3" not in {h.name for h in c.inventory.hosts}
        c.resume(["h1"])
        again = c.submit(definition_from_command(["true"], vcpus=2))
        again2 = c.submit(definition_from_command(["true"], vcpus=2))
        for j in (again, again2):
            await asyncio.wait_for(c.wait(j), 30)
        assert {j.attempt.grants[0].host for j in (again, again2) if j.attempt} <= {"h1", "h2"}
        assert c.inventory.queues["default"].priority == 5
        kinds = [(ch["kind"], ch.get("state")) for ch in c.changes]
        assert ("host", "DRAINED") in kinds and ("host", "RESUMED") in kinds
        assert ("host", "REMOVED") in kinds and ("reload", None) in kinds
        assert ("queue", "ENABLED") in kinds and ("ce", "ENABLED") in kinds
    finally:
        await c.close()
