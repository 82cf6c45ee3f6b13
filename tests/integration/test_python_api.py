"""``mnp.Client`` against a real controller in a temporary home (issue 17)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mnp
from mnp.errors import InfraError, SpecError, UsageError
from tests.helpers import ROOT
from tests.helpers import mnp as mnp_cli


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "home"
    yield path
    mnp_cli("controller", "stop", env={"MNP_HOME": str(path)})


@pytest.fixture
def client(home: Path) -> mnp.Client:
    return mnp.Client(home=home)


def test_submit_a_dict_and_a_file_then_wait_and_describe(
    client: mnp.Client, tmp_path: Path
) -> None:
    job = client.submit(
        {"name": "from-dict", "command": ["sh", "-c", "echo $GREETING; echo oops >&2"]},
        env={"GREETING": "hi"},
    )
    defn = tmp_path / "job.toml"
    defn.write_text('name = "from-file"\ncommand = ["sh", "-c", "exit Ref::code"]\n')
    other = client.submit(defn, attempts=2, params={"code": "4"})
    done = client.wait(job, timeout=60)
    assert done["job_id"] == job and done["state"] == "SUCCEEDED" and done["exit_code"] == 0
    assert client.wait(other, timeout=60)["state"] == "FAILED"
    d = client.describe(job)
    assert (d["id"], d["name"], d["state"], d["queue"]) == (
        job,
        "from-dict",
        "SUCCEEDED",
        "default",
    )
    assert d["definition"]["environment"] == {"GREETING": "hi"}
    o = client.describe("from-file")  # a name: the newest job of that name
    assert o["id"] == other and o["exit_code"] == 4 and len(o["attempts"]) == 2
    assert o["root_cause"]
    # the same document as the CLI's
    cli = json.loads(mnp_cli("describe", job, "--json", env={"MNP_HOME": str(client.home)}).stdout)
    assert cli == d
    assert client.logs(job) == "hi\n" and client.logs(job, "stderr") == "oops\n"


def test_list_filters_and_command_overrides(client: mnp.Client) -> None:
    a = client.submit(command=["true"], name="a", tags={"team": "x", "run": "1"})
    b = client.submit({"name": "b", "command": ["sh", "-c", "exit 1"], "tags": {"team": "y"}})
    c = client.submit(
        command=["sh", "-c", "echo $MNP_ARRAY_INDEX"], name="c", array_size=3, tags={"team": "x"}
    )
    for j in (a, b, c):
        client.wait(j, timeout=60)
    assert [r["id"] for r in client.list()] == [a, b, c]
    assert [r["id"] for r in client.list(state="failed")] == [b]
    assert [r["id"] for r in client.list(state="SUCCEEDED")] == [a, c]
    assert client.list(queue="nope") == []
    assert [r["id"] for r in client.list(queue="default")] == [a, b, c]
    assert len(client.list(children=True)) == 6
    assert [r["id"] for r in client.list(tag="team=x")] == [a, c]
    assert [r["id"] for r in client.list(tag="team=y")] == [b]
    assert [r["id"] for r in client.list(tag="team=x", children=True)] == [a, c, *[
        f"{c}:{i}" for i in range(3)]]  # fmt: skip
    assert client.list(tag="team=z") == [] and client.list(tag="run=2") == []
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        client.list(tag="team")
    assert client.describe(a)["tags"] == {"team": "x", "run": "1"}
    assert client.describe(f"{c}:1")["tags"] == {"team": "x"}
    env = {"MNP_HOME": str(client.home)}
    assert "tags:        run=1, team=x" in mnp_cli("describe", a, env=env).stdout
    table = mnp_cli("list", "--tag", "team=y", env=env).stdout.splitlines()
    assert [line.split()[0] for line in table[1:]] == [b]
    listed = json.loads(mnp_cli("list", "--tag", "team=x", "--json", env=env).stdout)
    assert [r["id"] for r in listed] == [a, c]
    # every event of a tagged job carries its tags; an untagged job's none
    evs = list(client.events())
    of_a = [e for e in evs if e["job_id"] == a]
    assert of_a and all(e["tags"] == {"team": "x", "run": "1"} for e in of_a)
    of_c = [e for e in evs if e["job_id"] == c or e["job_id"].startswith(c + ":")]
    assert len(of_c) > 3 and all(e["tags"] == {"team": "x"} for e in of_c)
    assert client.logs(c) == "0: 0\n1: 1\n2: 2\n"
    assert client.logs(f"{c}:1") == "1\n"


def test_cancel_and_terminate(client: mnp.Client) -> None:
    running = client.submit(command=["sleep", "60"], name="long")
    waiting = client.submit(command=["true"], depends_on=[running])
    ended = client.cancel(waiting, "not needed")
    assert ended == {"job_id": waiting, "name": "true", "state": "FAILED"}
    deadline = time.monotonic() + 30
    while client.describe(running)["state"] != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(TimeoutError, match=f"job {running} did not end within 0.3s"):
        client.wait(running, timeout=0.3)
    client.terminate("long", "taking too long")
    out = client.wait(running, timeout=30)
    assert out["state"] == "FAILED" and "taking too long" in out["reason"]
    assert "not needed" in client.describe(waiting)["reason"]


def test_events_follow_with_a_timeout(client: mnp.Client) -> None:
    before = max((e["seq"] for e in client.events()), default=0)
    job = client.submit(command=["sh", "-c", "sleep 0.5"])
    seen = []
    t0 = time.monotonic()
    for ev in client.events(since=before, follow=True, timeout=30):
        seen.append(ev)
        if ev["job_id"] == job and ev["status"] == "SUCCEEDED":
            break
    assert time.monotonic() - t0 < 30
    assert [e["status"] for e in seen if e["job_id"] == job][-1] == "SUCCEEDED"
    assert all(e["seq"] > before for e in seen)
    # the whole stream, as `mnp events` prints it
    printed = mnp_cli("events", env={"MNP_HOME": str(client.home)}).stdout.splitlines()
    assert [json.loads(line) for line in printed] == list(client.events())
    # follow ends after its timeout when nothing comes
    t0 = time.monotonic()
    assert list(client.events(since=10**6, follow=True, timeout=0.5)) == []
    assert 0.4 < time.monotonic() - t0 < 5


def test_errors_are_the_clis(client: mnp.Client, tmp_path: Path) -> None:
    env = {"MNP_HOME": str(client.home)}
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ncommand = ["true"]\nretry = { attempts = 11 }\n')
    with pytest.raises(SpecError) as e:
        client.submit(bad)
    r = mnp_cli("submit", str(bad), env=env)
    assert r.returncode == e.value.exit_code == 2
    assert r.stderr == f"mnp: {e.value}\n"
    with pytest.raises(UsageError) as u:
        client.describe("999")
    r = mnp_cli("describe", "999", env=env)
    assert r.stderr == f"mnp: {u.value}\n" and r.returncode == u.value.exit_code
    with pytest.raises(SpecError, match=r"^<definition>:command: missing"):
        client.submit({"name": "no-command"})
    with pytest.raises(UsageError, match="unknown override bogus; valid: name, queue"):
        client.submit(command=["true"], bogus=1)
    with pytest.raises(UsageError, match="does not exist"):
        client.logs("nope")


def test_no_controller_for_cancel_is_infra_error(tmp_path: Path) -> None:
    c = mnp.Client(home=tmp_path / "h")
    mnp_cli("controller", "stop", env={"MNP_HOME": str(c.home)})
    with pytest.raises(InfraError, match="no controller runs"):
        c.cancel("1", "x")


CHEAP = """
import sys
import mnp
heavy = ("asyncio", "asyncssh", "click", "mnp.spec", "mnp.store")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in heavy))
c = mnp.Client(home=sys.argv[1])
print(sorted(m for m in sys.modules if m in ("asyncio", "asyncssh", "click")))
"""


def test_import_mnp_and_a_client_stay_cheap(home: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", CHEAP, str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", "[]"]


def test_the_readme_example_runs_verbatim(home: Path, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    r = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "MNP_HOME": str(home)},
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["SUCCEEDED", "hello from 1", "['SUCCEEDED', 'SUCCEEDED']", "['2']"]
    assert lines[-1].endswith(" 2 SUCCEEDED")
