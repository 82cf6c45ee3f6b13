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
    (["describe", "nosuchname"], "job nosuchname does not exist"),
    (["logs", "nosuchname:3"], "job nosuchname does not exist"),
    (["run", "--depends-on", "nosuchname", "--", "true"], "job nosuchname does not exist"),
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
    (["run", "--param", "x=1", "--", "true"], "--param: x: no Ref::x in the job's commands"),
    (["run", "--", ""], "empty program name"),
    (["run", "--inventory", "/etc/passwd", "--", "true"], "invalid TOML"),
    (["validate", "/etc"], "is a directory"),
    (["validate", "/dev/null"], "is a character device"),
    (["describe", "'; DROP TABLE jobs; --"], "does not exist"),
    (["logs", "../../etc/passwd"], "does not exist"),
    (["events", "--since", "abc"], "--since"),
    (["terminate", "1"], "--reason"),
    (["controller", "start", "--local-nodes", "100000"], "--local-nodes"),
    (["run", "--mount", "/a:/b", "--", "true"], "--mount: needs a container"),
    (["run", "--image", "x", "--mount", "a:/b", "--", "true"], "--mount"),
    (["run", "--image", "x", "--mount", "/a", "--", "true"], "not a mount"),
    (["run", "--image", "", "--", "true"], "--image"),
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


def test_validate_json_lists_every_file(tmp_path: Path) -> None:
    import json

    good = tmp_path / "good.toml"
    good.write_text('command = ["true"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('command = "true"\n')
    r = mnp("validate", "--json", str(good))
    assert (r.returncode, r.stderr) == (0, "")
    assert json.loads(r.stdout) == [
        {"file": str(good), "kind": "definition", "ok": True,
         "summary": 'single job "good"', "needs_params": []},
    ]  # fmt: skip
    r = mnp("validate", "--json", str(bad), str(good))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"mnp: {bad}:command: expected a list of strings"), r.stderr
    reports = json.loads(r.stdout)
    assert [(x["file"], x["ok"]) for x in reports] == [(str(bad), False), (str(good), True)]
    assert reports[0]["error"] == r.stderr[len("mnp: ") : -1]


# --- issue 12: every number a command line takes is bounded --------------------------


def _number_options() -> list[tuple[list[str], str, list[str], str]]:
    """(command path, number option, what the command needs besides, "int" or "float")
    for every number option of every command, found by walking the click tree: an
    option added later is covered without being listed here."""
    import click

    from mnp.cli import cli

    found: list[tuple[list[str], str, list[str], str]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, [*path, name])
            return
        needed: list[str] = []
        for p in cmd.params:
            if isinstance(p, click.Argument) and p.required:
                needed.append("1")
            elif isinstance(p, click.Option) and p.required:
                needed += [p.opts[-1], "x"]
        if path[-1] in ("run", "submit"):
            needed += ["--", "true"]
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.is_flag:
                continue
            if isinstance(p.type, click.types.IntParamType):
                found.append((path, max(p.opts, key=len), needed, "int"))
            elif isinstance(p.type, click.types.FloatParamType):
                found.append((path, max(p.opts, key=len), needed, "float"))

    walk(cli, [])
    return found


NUMBER_OPTIONS = _number_options()
HUGE = {"int": ["1" + "0" * 22, "-1" + "0" * 22], "float": ["1e999", "-1e999", "nan"]}
NUMBER_CASES = [(p, o, n, v) for p, o, n, k in NUMBER_OPTIONS for v in HUGE[k]]


def test_every_number_option_is_found() -> None:
    names = {(" ".join(p), o) for p, o, _, _ in NUMBER_OPTIONS}
    assert {("events", "--since"), ("list", "--limit"), ("run", "--array-size")} <= names
    assert ("submit", "--vcpus") in names and ("controller start", "--local-nodes") in names


@pytest.mark.parametrize(
    ("path", "option", "needed", "value"),
    NUMBER_CASES,
    ids=[f"{' '.join(p)} {o} {v[:6]}" for p, o, _, v in NUMBER_CASES],
)
def test_out_of_range_numbers_are_one_line_and_exit_2(
    path: list[str], option: str, needed: list[str], value: str, tmp_path: Path, ledger: Ledger
) -> None:
    """Huge and non-finite numbers never reach SQLite or Python arithmetic (OverflowError)."""
    with ledger.tried("number out of range"):
        r = mnp(*path, option, value, *needed, env={"MNP_HOME": str(tmp_path / "h")}, timeout=30)
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.startswith("mnp: ") and r.stderr.count("\n") == 1, r.stderr
        assert option in r.stderr and "Traceback" not in r.stderr, r.stderr


# --- issue 14: a node, child or task that does not exist is named as such -------------


@pytest.fixture(scope="module")
def jobs_home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A store with 1 (single), 2 (an array of 3) and 3 (2 nodes, 2 tasks on node 1)."""
    from mnp.store import Store

    home = tmp_path_factory.mktemp("targets")
    defn = {"name": "x", "command": ["true"]}
    mn = {
        "name": "m",
        "command": ["true"],
        "multinode": {
            "num_nodes": 2,
            "groups": [
                {"target_nodes": "0:0", "tasks_per_node": 1},
                {"target_nodes": "1:1", "tasks_per_node": 2},
            ],
        },
    }
    with Store(home / "mnp.db") as s:
        s.add_job({"id": "1", "seq": 1, "state": "SUCCEEDED", "definition": defn})
        s.add_job({"id": "2", "seq": 2, "state": "SUCCEEDED", "array_size": 3, "definition": defn})
        s.add_jobs(
            {"id": f"2:{i}", "seq": 3 + i, "parent": "2", "array_index": i, "state": "SUCCEEDED"}
            for i in range(3)
        )
        s.add_job({"id": "3", "seq": 6, "state": "SUCCEEDED", "num_nodes": 2, "definition": mn})
    for tid in ("1", "2:0", "2:1", "2:2", "3#0", "3#1.0", "3#1.1"):
        folder = home / "logs" / tid.split(":")[0].split("#")[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{tid}.out").write_text(f"from {tid}\n")
    return {"MNP_HOME": str(home)}


MISSING_TARGETS = [
    ("1:0", "1 is not an array"),
    ("1#0", "1 is not a multi-node job"),
    ("2:3", "children are 2:0..2:2"),
    ("2:99999", "children are 2:0..2:2"),
    ("2#0", "2 is not a multi-node job"),
    ("2:1#0", "2:1 is not a multi-node job"),
    ("3:0", "3 is not an array"),
    ("3#2", "nodes are 3#0..3#1"),
    ("3#99", "nodes are 3#0..3#1"),
    ("3#1.2", "tasks are 3#1.0..3#1.1"),
    ("3#0.1", "tasks are 3#0.0..3#0.0"),
    ("4", "job 4 does not exist"),
    ("4:0", "job 4 does not exist"),
    ("4#0", "job 4 does not exist"),
    ("3#", "does not exist"),
    ("3#-1", "does not exist"),
    ("2:-1", "does not exist"),
    ("2:x", "does not exist"),
    ("3#1.1.1", "does not exist"),
    ("1" * 30, "does not exist"),
]


@pytest.mark.parametrize("command", ["logs", "events --job"])
@pytest.mark.parametrize(("target", "needle"), MISSING_TARGETS)
def test_a_missing_node_child_or_task_is_one_line_and_exit_2(
    command: str, target: str, needle: str, jobs_home: dict[str, str], ledger: Ledger
) -> None:
    with ledger.tried("job reference"):
        r = mnp(*command.split(), target, env=jobs_home, timeout=30)
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert r.stdout == "" and r.stderr.startswith("mnp: ") and r.stderr.count("\n") == 1
        assert needle in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("target", "out"),
    [
        ("1", "from 1\n"),
        ("2:1", "from 2:1\n"),
        ("2:01", "from 2:1\n"),
        ("3#1", "1.0: from 3#1.0\n1.1: from 3#1.1\n"),
        ("3#1.1", "from 3#1.1\n"),
    ],
)
def test_existing_targets_still_print_their_logs(
    target: str, out: str, jobs_home: dict[str, str]
) -> None:
    r = mnp("logs", target, env=jobs_home)
    assert (r.returncode, r.stdout, r.stderr) == (0, out, "")
