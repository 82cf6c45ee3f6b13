"""Bad command lines: one line on stderr (``mnp: ...``), exit 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import mnp
from tests.ledger import Ledger

pytestmark = pytest.mark.faults

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
    (["list", "--limit", "0"], "--limit"),
    (["describe", "424242"], "424242"),
    (["logs", "424242"], "424242"),
    (["cancel", "1"], "--reason"),
    (["nosuchcommand"], "nosuchcommand"),
    (["hosts", "--inventory", "hostfile:/nonexistent"], "/nonexistent"),
    (["run", "--name", "x\udcff", "--", "true"], "--name"),  # not UTF-8
    (["run", "--name", "$(reboot)", "--", "true"], "--name"),
    (["run", "--bogus", "--", "true"], "--bogus"),
    (["run", "--nodes", "1000000", "--", "true"], "--nodes"),
    (["run", "--timeout", "-5s", "--", "true"], "--timeout"),
    (["run", "--timeout", "0", "--", "true"], "--timeout"),
    (["run", "--attempts", "0", "--", "true"], "--attempts"),
    (["run", "--array-size", "4", "--array-parallelism", "0", "--", "true"], "parallelism"),
    (["run", "--vcpus", "-1", "--", "true"], "--vcpus"),
    (["run", "--gpus", "99999", "--", "true"], "--gpus"),
    (["run", "--memory", "1ZiB", "--", "true"], "--memory"),
    (["run", "--tasks-per-node", "0", "--", "true"], "--tasks-per-node"),
    (["run", "--depends-on", "1", "--depends-on", "1", "--", "true"], "twice"),
    (["run", "--depends-on", "1", "--", "true"], "does not exist"),  # its own future id
    (["run", "--queue", "", "--", "true"], "--queue"),
    (["run", "--param", "bad name=1", "--", "true"], "--param"),
    (["run", "--", ""], "empty program name"),
    (["run", "--inventory", "/etc/passwd", "--", "true"], "invalid TOML"),
    (["validate", "/etc"], "is a directory"),
    (["validate", "/dev/null"], "is a character device"),
    (["describe", "'; DROP TABLE jobs; --"], "does not exist"),
    (["logs", "../../etc/passwd"], "does not exist"),
    (["events", "--since", "abc"], "--since"),
    (["terminate", "1"], "--reason"),
    (["controller", "start", "--local-nodes", "100000"], "--local-nodes"),
]


@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_invocation_is_one_line_and_exit_2(
    argv: list[str], needle: str, tmp_path: Path, ledger: Ledger
) -> None:
    r = mnp(*argv, env={"MNP_HOME": str(tmp_path / "home")}, timeout=30)
    ledger.input("command line", escaped="Traceback" in r.stderr or r.returncode == 1)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("mnp: "), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert needle in r.stderr, r.stderr


def test_binary_garbage_definition(tmp_path: Path, ledger: Ledger) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'name = "\xff\xfe"\n\x00\x01')
    r = mnp("validate", str(bad))
    ledger.input("command line", escaped="Traceback" in r.stderr or r.returncode == 1)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(bad) in r.stderr


# Definition files a command line names: (file content, the error's needle).
BIG = "x" * 10_000_000
FILES = [
    ("10 MB argument", f'command = ["echo", "{BIG}"]\n', "command[1]: 10,000,000 bytes"),
    ("10 MB environment", f'command = ["true"]\n[environment]\nX = "{BIG}"\n', "environment.X"),
    ("array size 1", 'command = ["true"]\n[array]\nsize = 1\n', "array.size: 1 is out of range"),
    ("array size 10^9", 'command = ["true"]\n[array]\nsize = 1000000000\n', "array.size"),
    ("depends on itself", 'command = ["true"]\ndepends_on = ["1"]\n', "job 1 does not exist"),
    ("unknown field", 'command = ["true"]\ncomand = ["true"]\n', "comand: unknown field"),
    ("not UTF-8", b'command = ["true"]\nname = "\xff\xfe"\n', "UTF-8"),
]


# validate checks a file alone: job ids exist only in a controller
FILE_CASES = [
    pytest.param(command, content, needle, id=f"{command} {name}")
    for name, content, needle in FILES
    for command in ("validate", "run", "submit")
    if not (command == "validate" and "does not exist" in needle)
]


@pytest.mark.parametrize(("command", "content", "needle"), FILE_CASES)
def test_bad_definition_file_is_one_line_and_exit_2(
    command: str, content: str | bytes, needle: str, tmp_path: Path, ledger: Ledger
) -> None:
    job = tmp_path / "job.toml"
    job.write_bytes(content if isinstance(content, bytes) else content.encode())
    env = {"MNP_HOME": str(tmp_path / "home")}
    try:
        r = mnp(command, str(job), env=env, timeout=60)
    finally:
        mnp("controller", "stop", env=env)
    ledger.input("definition via the CLI", escaped="Traceback" in r.stderr or r.returncode == 1)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[:300])
    assert r.stderr.startswith("mnp: ") and r.stderr.count("\n") == 1, r.stderr[:300]
    assert needle in r.stderr, r.stderr[:300]
    assert len(r.stderr) < 1000  # the 10 MB is not echoed back
