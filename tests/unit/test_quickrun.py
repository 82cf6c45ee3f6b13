"""``mnp run``'s quick client: the controller builds from its command line and its
process's state exactly the definition the full command builds in that process, and
leaves to the full command every command line it is not sure of."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from mnp.cli.jobs import build_definition, definition_from_argv, run
from mnp.client import Submitter
from mnp.errors import MnpError
from mnp.quickrun import quick_run
from mnp.spec import definition_to_dict

QUICK = [
    ["--", "true"],
    ["--export", "--", "sh", "-c", "echo $FOO"],
    ["--cwd", "sub", "--array-size", "3", "--", "x", "y z"],
    ["--nodes", "2", "--env", "A=1", "--env", "B=2", "--", "hostname"],
    ["--name", "n1", "--timeout", "5s", "--attempts", "2", "--", "sleep", "1"],
    ["--python-env", "none", "--vcpus", "2", "--memory", "1G", "--", "python3", "-V"],
]


def full_command(argv: list[str]) -> dict[str, Any]:
    """What ``mnp run ARGV`` builds in this process (``run``'s own parse and build)."""
    ctx = run.make_context("run", list(argv))
    o = dict(ctx.params)
    definition = o.pop("definition")
    for key in ("verbose", "home", "inventory", "local_nodes", "debug"):
        o.pop(key)
    return definition_to_dict(build_definition(ctx, definition, o))


@pytest.fixture
def them(tmp_path: Path) -> Submitter:
    """Another process: its own directory, environment and Python (not a venv's)."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    environ = {"PATH": "/usr/bin:/bin", "FOO": "bar"}
    return Submitter(str(work), environ, "/opt/python", "/opt/python")


def test_the_controller_builds_what_the_full_command_builds_in_the_clients_process(
    them: Submitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    built_for_them = [definition_to_dict(definition_from_argv(a, them)) for a in QUICK]
    assert built_for_them[1]["environment"]["FOO"] == "bar"  # --export: theirs
    assert built_for_them[2]["cwd"] == os.path.join(str(them.cwd), "sub")
    assert built_for_them[0]["python_env"] == "none"  # their Python is no venv; ours is
    assert definition_to_dict(definition_from_argv(QUICK[0], Submitter.here())) != built_for_them[0]
    # now this process is theirs: what the full command builds here is the same
    monkeypatch.chdir(str(them.cwd))
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in them.environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "prefix", them.prefix)
    monkeypatch.setattr(sys, "base_prefix", them.base_prefix)
    assert [full_command(a) for a in QUICK] == built_for_them


@pytest.mark.parametrize(
    "argv",
    [
        ["--verbose", "--", "true"],
        ["--home", "/tmp/x", "--", "true"],
        ["--local-nodes", "2", "--", "true"],
        ["--nodes", "x", "--", "true"],  # the full command says what is wrong
        ["--", ""],
        ["def.toml"],
    ],
)
def test_a_command_line_the_full_command_must_see_is_refused(
    argv: list[str], them: Submitter
) -> None:
    with pytest.raises(MnpError):  # a UsageError or SpecError: the client falls back
        definition_from_argv(argv, them)


@pytest.mark.parametrize(
    "argv",
    [
        ["--", "true"],  # no controller runs for this home
        ["-v", "--", "true"],
        ["--name", "-v", "--", "true"],  # -v: the name, as click reads it
        ["-h"],
        ["--help", "--", "true"],
        ["--debug", "--", "true"],
        ["--inventory=local", "--", "true"],
        ["def.toml"],
        ["--"],
    ],
)
def test_the_quick_client_leaves_to_the_full_command(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNP_HOME", str(tmp_path / "home"))
    assert quick_run(argv) is None
