"""``mnp definitions`` and ``mnp submit --definition`` against a real controller:
revisions, overrides, deregistering, and surviving a controller restart (issue 17)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import mnp
from tests.helpers import mnp as mnp_cli


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    e = {"MNP_HOME": str(tmp_path / "home")}
    yield e
    mnp_cli("controller", "stop", env=e)


def test_register_submit_deregister_and_restart(env: dict[str, str], tmp_path: Path) -> None:
    defn = tmp_path / "greet.toml"
    defn.write_text(
        'name = "greet"\ncommand = ["sh", "-c", "echo Ref::word $WHO"]\ntags = { team = "x" }\n'
    )
    assert mnp_cli("definitions", "register", str(defn), env=env).stdout == "greet:1\n"
    defn.write_text('name = "greet"\ncommand = ["sh", "-c", "echo two Ref::word"]\n')
    r = mnp_cli("definitions", "register", str(defn), "--json", env=env)
    assert json.loads(r.stdout) == {"name": "greet", "revision": 2}
    # the newest active revision, with the usual overrides
    r = mnp_cli(
        "submit", "--definition", "greet", "--param", "word=hi", "--wait", "--json", env=env
    )
    latest = json.loads(r.stdout)
    assert latest["state"] == "SUCCEEDED", r.stderr
    assert mnp_cli("logs", latest["job_id"], env=env).stdout == "two hi\n"
    r = mnp_cli(
        "submit", "--definition", "greet:1", "--param", "word=yo", "--env", "WHO=me",
        "--tag", "run=7", "--name", "first", "--wait", "--json", env=env,
    )  # fmt: skip
    first = json.loads(r.stdout)["job_id"]
    assert mnp_cli("logs", first, env=env).stdout == "yo me\n"
    d = json.loads(mnp_cli("describe", first, "--json", env=env).stdout)
    assert d["name"] == "first" and d["tags"] == {"team": "x", "run": "7"}
    # describe and list
    one = json.loads(mnp_cli("definitions", "describe", "greet:1", env=env).stdout)
    assert one["revision"] == 1 and one["status"] == "ACTIVE"
    assert one["definition"]["command"] == ["sh", "-c", "echo Ref::word $WHO"]
    assert one["source"] == str(defn)
    assert json.loads(mnp_cli("definitions", "describe", "greet", env=env).stdout)["revision"] == 2
    # deregister the newest: NAME alone is revision 1 again; 2 cannot be submitted
    r = mnp_cli("definitions", "deregister", "greet:2", env=env)
    assert r.stdout == "greet:2 INACTIVE\n"
    r = mnp_cli("submit", "--definition", "greet:2", "--param", "word=x", env=env)
    assert (r.returncode, r.stderr) == (2, "mnp: definition greet:2 is deregistered (INACTIVE)\n")
    # a restarted controller has them all
    mnp_cli("controller", "stop", env=env)
    listed = json.loads(mnp_cli("definitions", "list", "--json", env=env).stdout)
    assert [(d["name"], d["revision"], d["status"]) for d in listed] == [
        ("greet", 1, "ACTIVE"),
        ("greet", 2, "INACTIVE"),
    ]
    table = mnp_cli("definitions", "list", "--name", "greet", env=env).stdout.splitlines()
    assert table[0].split() == ["NAME", "REVISION", "STATUS", "AGE", "SOURCE"] and len(table) == 3
    r = mnp_cli(
        "submit", "--definition", "greet", "--param", "word=again", "--wait", "--json", env=env
    )
    again = json.loads(r.stdout)["job_id"]
    assert mnp_cli("logs", again, env=env).stdout == "again\n"
    # the Python API: submit by NAME:REV, register a file
    client = mnp.Client(home=env["MNP_HOME"])
    job = client.submit(definition="greet:1", params={"word": "py"}, env={"WHO": "api"})
    assert client.wait(job, timeout=60)["state"] == "SUCCEEDED"
    assert client.logs(job) == "py api\n"
    assert client.register(defn) == "greet:3"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "--definition", "nope"], "definition nope is not registered"),
        (["submit", "--definition", "a b"], "definition 'a b': expected NAME or NAME:REV"),
        (["submit", "--definition", "x", "--", "true"], "give --definition NAME[:REV], a def"),
        (["definitions", "describe", "nope:1"], "definition nope:1 is not registered"),
        (["definitions", "deregister", "greet"], "definition 'greet': expected NAME:REV"),
    ],
)
def test_bad_references_are_one_line_and_exit_2(
    env: dict[str, str], args: list[str], message: str
) -> None:
    r = mnp_cli(*args, env=env)
    assert r.returncode == 2 and r.stderr.startswith(f"mnp: {message}"), r.stderr
    assert r.stderr.count("\n") == 1


def test_registering_a_bad_file_is_the_validators_line(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\ncommand = "true"\n')
    r = mnp_cli("definitions", "register", str(bad), env=env)
    assert r.returncode == 2 and r.stderr.startswith(f"mnp: {bad}:command: expected a list")
