"""The CLI of changes while the controller runs, through the daemon's socket: drain,
resume, queues update, ce, ce update, controller reload; jobs running meanwhile end
as they would have."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import describe, mnp, submit, wait_until

INVENTORY = """
[[hosts]]
names = "{names}"
transport = "local"
vcpus = 2

[compute_environments.main]
hosts = "{names}"

[queues.default]
compute_environments = ["main"]
priority = {priority}
"""


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    inv = tmp_path / "inv.toml"
    inv.write_text(INVENTORY.format(names="h[1-3]", priority=1))
    env = {"MNP_HOME": str(tmp_path / "home"), "MNP_INVENTORY": str(inv), "INV": str(inv)}
    r = mnp("controller", "start", env=env)
    assert r.returncode == 0, r.stderr
    yield env
    mnp("controller", "stop", env=env)


def ok(env: dict[str, str], *args: str) -> str:
    r = mnp(*args, env=env)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def test_changes_through_the_cli_while_jobs_run(home: dict[str, str]) -> None:
    long = [submit(home, "--", "sleep", "2") for _ in range(3)]
    wait_until("running", lambda: all(describe(home, j)["state"] == "RUNNING" for j in long), 30)
    assert "drained h1" in ok(home, "hosts", "drain", "h1", "--reason", "disk check")
    hosts = json.loads(ok(home, "hosts", "--json"))
    assert {h["name"]: h["drained"] for h in hosts}["h1"] == "disk check"
    assert "priority 7" in ok(home, "queues", "update", "default", "--priority", "7")
    assert "state=DISABLED" in ok(home, "ce", "update", "main", "--state", "DISABLED")
    assert "state=ENABLED" in ok(home, "ce", "update", "main", "--state", "enabled")
    bad = mnp("ce", "update", "main", "--min-vcpus", "2", env=home)
    assert bad.returncode == 2 and "UNMANAGED" in bad.stderr, bad.stderr
    bad = mnp("hosts", "drain", "nosuch", env=home)
    assert bad.returncode == 2 and "no such host: nosuch" in bad.stderr, bad.stderr
    Path(home["INV"]).write_text(INVENTORY.format(names="h[1-2]", priority=3))
    out = ok(home, "controller", "reload")
    assert "hosts removed: h3" in out and "queues: default" in out, out
    short = [submit(home, "--", "true") for _ in range(4)]
    for j in long + short:
        d = wait_until(
            "ended",
            lambda j=j: describe(home, j)["state"] in ("SUCCEEDED", "FAILED") and describe(home, j),
            30,
        )  # noqa: E501
        assert d["state"] == "SUCCEEDED" and len(d["attempts"]) == 1, d
    assert "resumed h1" in ok(home, "hosts", "resume", "h1")
    ce = json.loads(ok(home, "ce", "--json"))
    assert ce["compute_environments"][0]["hosts"] == ["h1", "h2"]
    kinds = [(c["kind"], c.get("state")) for c in ce["changes"]]
    for want in [("host", "DRAINED"), ("queue", "ENABLED"), ("ce", "DISABLED"), ("reload", None),
                 ("host", "REMOVED"), ("host", "RESUMED")]:  # fmt: skip
        assert want in kinds, kinds
    queues = ok(home, "queues", "--json")
    assert json.loads(queues)[0]["priority"] == 3  # the file's, read again
