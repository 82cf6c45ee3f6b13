"""``check_hosts`` (``mnp hosts --check``) against real OpenSSH servers and the local transport."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from mnp.hostcheck import HostReport, check_hosts, format_table, to_json
from mnp.model import HostSpec, Inventory
from mnp.transport import transports_for
from mnp.transport.base import Transport
from mnp.transport.local import LocalTransport
from tests.helpers import procs_with_env
from tests.integration.conftest import SSH_TRANSPORTS, SshdFactory
from tests.integration.sshd import SshdCluster


def _with(inv: Inventory, extra: list[HostSpec]) -> Inventory:
    return Inventory(inv.source, inv.hosts + tuple(extra), {}, {}, inv.ssh)


async def _check(inv: Inventory, python: str) -> tuple[list[HostReport], float, str]:
    token = f"hc-{uuid.uuid4().hex[:12]}"
    transports: dict[str, Transport] = {
        "ssh": transports_for(inv)["ssh"],
        "local": LocalTransport(python),
    }
    t0 = time.monotonic()
    try:
        reports = await check_hosts(inv, transports, token)
    finally:
        for t in transports.values():
            await t.close()
    return reports, time.monotonic() - t0, token


@pytest.mark.ssh
async def test_check_hosts_reports_each_host(sshd_hosts: SshdCluster) -> None:
    inv = sshd_hosts.inventory()
    opts = sshd_hosts.ssh_options()
    inv = _with(
        inv,
        [
            HostSpec("127.0.0.99", "127.0.0.99", ssh=opts),  # nothing listens there
            HostSpec("no-such-host.invalid", "no-such-host.invalid", ssh=opts),
            HostSpec("local-0", "localhost", transport="local"),
        ],
    )
    reports, elapsed, token = await _check(inv, str(sshd_hosts.python_mnp))
    by_name = {r.name: r for r in reports}
    assert [r.name for r in reports] == [h.name for h in inv.hosts]
    for name in [*sshd_hosts.names, "local-0"]:
        r = by_name[name]
        assert r.ok, r
        assert r.category is None and r.error is None
        assert r.cores is not None and r.cores >= 1
        assert r.memory is not None and r.memory > 0
        assert r.python and r.hostname and r.gpus == []
        assert r.connect_s is not None and r.agent_s is not None
    assert by_name["sshd-1"].address == "127.0.0.2"
    refused, dns = by_name["127.0.0.99"], by_name["no-such-host.invalid"]
    assert (refused.ok, refused.category) == (False, "refused")
    assert (dns.ok, dns.category) == (False, "dns")
    assert refused.error and "127.0.0.99" in refused.error
    assert procs_with_env("MNP_CONTROLLER_ID", token) == []

    table = format_table(reports, width=120)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["HOST", "ADDRESS", "STATUS"]
    assert len(lines) == len(reports) + 2 and lines[-1] == "5 of 7 hosts usable"
    assert all(len(line) <= 120 for line in lines)
    assert any(line.startswith("127.0.0.99") and " refused " in line for line in lines)
    rows = json.loads(json.dumps(to_json(reports)))
    assert rows[0]["name"] == "sshd-1" and rows[0]["ok"] is True
    assert {"connect_s", "agent_s", "python", "cores", "memory", "gpus", "category"} <= set(rows[0])
    assert elapsed < 15


@pytest.mark.ssh
@pytest.mark.parametrize("ssh_transport", SSH_TRANSPORTS)
async def test_check_sixteen_hosts(sshd_factory: SshdFactory, ssh_transport: str) -> None:
    cluster = sshd_factory(16).with_transport(ssh_transport)
    reports, elapsed, _ = await _check(cluster.inventory(), str(cluster.python_mnp))
    assert [r.ok for r in reports] == [True] * 16, format_table(reports)
    assert elapsed < 30, elapsed


def test_format_table_cuts_long_errors() -> None:  # pure: runs without sshd too
    reports = [
        HostReport(
            "a",
            "10.0.0.1",
            "ssh",
            ok=True,
            connect_s=0.05,
            agent_s=1.5,
            python="3.11.2",
            cores=64,
            memory=512 << 30,
            gpus=[{"name": "H100"}] * 8,
        ),
        HostReport("b", "10.0.0.2", "ssh", category="host-key", error="x" * 500),
    ]
    lines = format_table(reports, width=100).splitlines()
    assert "50ms" in lines[1] and "1.5s" in lines[1] and "512.0GiB" in lines[1]
    assert "8x H100" in lines[1]
    assert lines[2].endswith("...") and len(lines[2]) <= 100
    assert lines[-1] == "1 of 2 hosts usable"
