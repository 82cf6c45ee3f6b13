"""Inventory ``[[notifications]]`` hooks against a real controller (issue 17)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import mnp, submit, wait_until

HOSTS = """\
[[hosts]]
names = "n[1-2]"
transport = "local"
vcpus = 4
"""


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"MNP_HOME": str(tmp_path / "home")}
    yield env
    mnp("controller", "stop", env=env)


def _inventory(tmp_path: Path, hooks: str) -> str:
    inv = tmp_path / "inv.toml"
    inv.write_text(HOSTS + hooks)
    return str(inv)


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_hook_sees_matching_events_as_mnp_events_shows_them(
    tmp_path: Path, home: dict[str, str]
) -> None:
    out = tmp_path / "seen.jsonl"
    inv = _inventory(
        tmp_path,
        f"""
[[notifications]]
command = ["sh", "-c", "cat >> {out}"]
states = ["SUCCEEDED", "failed"]
job_name = "keep-*"
""",
    )
    env = {**home, "MNP_INVENTORY": inv}
    ok = submit(env, "--name", "keep-ok", "--", "true")
    bad = submit(env, "--name", "keep-bad", "--", "sh", "-c", "exit 3")
    other = submit(env, "--name", "other", "--", "true")
    assert mnp("submit", "--wait", "--name", "last", "--", "true", env=env).returncode == 0
    seen = wait_until("both hook deliveries", lambda: len(_lines(out)) >= 2 and _lines(out), 30)
    time.sleep(0.5)  # nothing else should come
    seen = _lines(out)
    assert sorted((e["job_id"], e["status"]) for e in seen) == [(ok, "SUCCEEDED"), (bad, "FAILED")]
    shown = [
        json.loads(line)
        for line in mnp("events", env=env).stdout.splitlines()
        if json.loads(line)["seq"] in {e["seq"] for e in seen}
    ]
    assert sorted(shown, key=lambda e: e["seq"]) == sorted(seen, key=lambda e: e["seq"])
    assert other not in {e["job_id"] for e in seen}


def test_failing_hook_is_retried_and_never_delays_the_job(
    tmp_path: Path, home: dict[str, str]
) -> None:
    tries = tmp_path / "tries"
    inv = _inventory(
        tmp_path,
        f"""
[[notifications]]
command = ["sh", "-c", "echo x >> {tries}; exit 1"]
states = ["SUCCEEDED"]
""",
    )
    env = {**home, "MNP_INVENTORY": inv}
    t0 = time.monotonic()
    r = mnp("submit", "--wait", "--", "true", env=env)
    assert r.returncode == 0, r.stderr
    took = time.monotonic() - t0
    assert took < 15, took  # the job's end did not wait for the hook's tries
    wait_until("a second try", lambda: tries.exists() and len(tries.read_text().split()) >= 2, 10)
    log = (Path(home["MNP_HOME"]) / "controller.log").read_text()
    assert "exit code 1" in log and "trying again in 1s" in log


def test_slow_hook_does_not_delay_mnp_run(tmp_path: Path, home: dict[str, str]) -> None:
    out = tmp_path / "slow"
    inv = _inventory(
        tmp_path,
        f"""
[[notifications]]
command = ["sh", "-c", "sleep 5; cat >> {out}"]
""",
    )
    t0 = time.monotonic()
    r = mnp("run", "--inventory", inv, "--", "true", env=home)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took < 4.5, took


def test_undelivered_events_are_delivered_after_a_restart(
    tmp_path: Path, home: dict[str, str]
) -> None:
    out = tmp_path / "seen.jsonl"
    gate = tmp_path / "gate"
    inv = _inventory(
        tmp_path,
        f"""
[[notifications]]
command = ["sh", "-c", "test -e {gate} && cat >> {out}"]
states = ["SUCCEEDED"]
""",
    )
    env = {**home, "MNP_INVENTORY": inv}
    r = mnp("submit", "--wait", "--", "true", env=env)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    assert mnp("controller", "stop", env=env).returncode == 0
    gate.touch()
    assert not out.exists()
    assert mnp("controller", "start", "--inventory", inv, env=env).returncode == 0
    seen = wait_until("the redelivery", lambda: _lines(out), 15)
    assert [(e["job_id"], e["status"]) for e in seen] == [(job, "SUCCEEDED")]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('url = "ftp://x"', 'notifications[0].url: "ftp://x" is not allowed'),
        ('command = ["true"]\nurl = "http://x"', "notifications[0].command: give either"),
        ("command = []", "notifications[0].command: empty"),
        ('command = ["true"]\nstates = ["DONE"]', 'notifications[0].states[0]: "DONE" is not'),
        ('command = ["true"]\nwhen = 1', "notifications[0].when: unknown field"),
    ],
)
def test_malformed_notifications_are_one_line_exit_2(
    tmp_path: Path, table: str, message: str
) -> None:
    inv = _inventory(tmp_path, "\n[[notifications]]\n" + table + "\n")
    r = mnp("hosts", "--inventory", inv)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"mnp: {inv}:"), r.stderr
    assert message in r.stderr, r.stderr


def test_webhook_gets_the_event_posted(tmp_path: Path, home: dict[str, str]) -> None:
    got: list[dict[str, object]] = []
    fails = [1]  # the first POST is answered 500: tried again

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if fails:
                fails.pop()
                self.send_response(500)
            else:
                got.append(json.loads(body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        inv = _inventory(
            tmp_path,
            f"""
[[notifications]]
url = "http://127.0.0.1:{server.server_port}/mnp"
states = ["SUCCEEDED"]
queues = ["default"]
""",
        )
        env = {**home, "MNP_INVENTORY": inv}
        r = mnp("submit", "--wait", "--", "true", env=env)
        assert r.returncode == 0, r.stderr
        wait_until("the POST", lambda: got, 15)
        assert [(e["job_id"], e["status"]) for e in got] == [(r.stdout.strip(), "SUCCEEDED")]
        assert "HTTP 500" in (Path(home["MNP_HOME"]) / "controller.log").read_text()
    finally:
        server.shutdown()
        server.server_close()
