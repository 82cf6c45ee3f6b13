"""Bad command lines: one line on stderr (``mnp: ...``), exit 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import mnp

CASES = [
    (["run"], "give either a definition file"),
    (["run", "--"], "nothing after '--'"),
    (["run", "a.toml", "--", "true"], "not both"),
    (["run", "--attempts", "11", "--", "true"], "--attempts"),
    (["run", "--attempts", "x", "--", "true"], "--attempts"),
    (["run", "--array-size", "1", "--", "true"], "--array-size"),
    (["run", "--array-size", "1000000000", "--", "true"], "--array-size"),
    (["run", "--timeout", "soon", "--", "true"], "--timeout"),
    (["run", "--memory", "lots", "--", "true"], "--memory"),
    (["run", "--param", "novalue", "--", "true"], "--param"),
    (["run", "--env", "=x", "--", "true"], "--env"),
    (["run", "--env", "MNP_JOB_ID=1", "--", "true"], "reserved"),
    (["run", "--depends-on", "1:SOMETIMES", "--", "true"], "--depends-on"),
    (["run", "--nodes", "0", "--", "true"], "--nodes"),
    (["run", "--queue", "nope", "--", "true"], "queue"),
    (["run", "--inventory", "slrum", "--", "true"], "slrum"),
    (["run", "--local-nodes", "0", "--", "true"], "--local-nodes"),
    (["run", "/nonexistent/job.toml"], "/nonexistent/job.toml"),
    (["validate", "/nonexistent.toml"], "/nonexistent.toml"),
    (["list", "--state", "DANCING"], "--state"),
    (["describe", "424242"], "424242"),
    (["logs", "424242"], "424242"),
    (["cancel", "1"], "--reason"),
    (["nosuchcommand"], "nosuchcommand"),
    (["hosts", "--inventory", "hostfile:/nonexistent"], "/nonexistent"),
]


@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_invocation_is_one_line_and_exit_2(
    argv: list[str], needle: str, tmp_path: Path
) -> None:
    r = mnp(*argv, env={"MNP_HOME": str(tmp_path / "home")}, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("mnp: "), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert needle in r.stderr, r.stderr


def test_binary_garbage_definition(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'name = "\xff\xfe"\n\x00\x01')
    r = mnp("validate", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(bad) in r.stderr
