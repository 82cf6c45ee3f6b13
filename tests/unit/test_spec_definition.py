"""Job definitions: parsing, defaults, overrides, ``mnp run -- CMD`` and validate_file."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest

from mnp.errors import SpecError
from mnp.model import Dependency, JobDefinition, JobType, Resources, RetryRule, SecretRef
from mnp.spec import (
    apply_overrides,
    definition_from_command,
    definition_to_dict,
    load_definition,
    parse_definition,
    submitter_python_env,
    validate_file,
)

ROOT = Path(__file__).resolve().parents[2]
NODEGROUPS = sorted((ROOT / "nodegroups").glob("*.toml"))
MiB = 1 << 20

FULL = """
name = "train"
command = ["python", "train.py", "--size", "Ref::size"]
queue = "gpu"
aws_batch_env = true
cwd = "/tmp"
depends_on = ["41", "40:afterany", "39:N_TO_N", { job_id = 38, type = "afterok" }, "37:7"]
[parameters]
size = 1000
fast = true
[environment]
OMP_NUM_THREADS = "1"
[secrets]
API_TOKEN = { file = "~/.config/token" }
OTHER = { env = "OTHER" }
[resources]
vcpus = 1.5
memory = "512MiB"
gpus = 1
[retry]
attempts = 3
evaluate_on_exit = [
  { on_exit_code = "137", action = "retry" },
  { on_exit_code = 1, action = "RETRY" },
  { on_reason = "Host lost*", action = "Exit" },
  { on_status_reason = "Memory*", action = "EXIT" },
]
[timeout]
attempt_duration = "2h"
kill_grace = "10s"
[array]
size = 100
parallelism = 10
[tags]
team = "vision"
"cost/center" = "42"
"""


def test_full_single_array_definition() -> None:
    d = parse_definition(tomllib.loads(FULL), "job.toml")
    assert d.name == "train" and d.type is JobType.SINGLE and d.queue == "gpu"
    assert d.command == ("python", "train.py", "--size", "Ref::size")
    assert d.parameters == {"size": "1000", "fast": "true"}
    assert d.environment == {"OMP_NUM_THREADS": "1"}
    assert d.secrets == {
        "API_TOKEN": SecretRef(file="~/.config/token"),
        "OTHER": SecretRef(env="OTHER"),
    }
    assert d.resources == Resources(vcpus=1.5, memory=512 * MiB, gpus=1)
    assert d.retry.attempts == 3
    assert d.retry.evaluate_on_exit == (
        RetryRule(action="RETRY", on_exit_code="137"),
        RetryRule(action="RETRY", on_exit_code="1"),
        RetryRule(action="EXIT", on_reason="Host lost*"),
        RetryRule(action="EXIT", on_status_reason="Memory*"),
    )
    assert d.tags == {"team": "vision", "cost/center": "42"}
    assert (d.timeout.attempt_duration, d.timeout.kill_grace) == (7200.0, 10.0)
    assert d.array is not None and (d.array.size, d.array.parallelism) == (100, 10)
    assert d.depends_on == (
        Dependency("41"),
        Dependency("40", "afterany"),
        Dependency("39", "N_TO_N"),
        Dependency("38"),
        Dependency("37:7"),
    )
    assert d.aws_batch_env and d.cwd == "/tmp" and d.source == "job.toml"


def test_defaults_and_name_from_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "my job.v2.toml"
    path.write_text('command = ["hostname"]\n')
    d = load_definition(path)
    assert d.name == "my-job-v2"
    assert d.type is JobType.SINGLE and d.queue == "default" and d.array is None
    assert d.retry.attempts == 1 and d.timeout.attempt_duration is None
    assert d.resources == Resources()


def test_multinode_without_groups_runs_the_command_everywhere() -> None:
    d = parse_definition({"command": ["hostname"], "multinode": {"num_nodes": 3}}, "x.toml")
    assert d.type is JobType.MULTINODE and d.multinode is not None
    (g,) = d.multinode.groups
    assert (g.start, g.end, g.command) == (0, 2, ("hostname",))


def test_group_resources_start_from_the_job_resources() -> None:
    d = load_definition(ROOT / "nodegroups" / "hetero.toml")
    assert d.multinode is not None
    coord, workers, evaluator = d.multinode.groups
    assert coord.resources == Resources(vcpus=1, memory=256 * MiB)
    assert workers.resources == Resources(vcpus=2, memory=256 * MiB)
    assert (workers.start, workers.end, workers.tasks_per_node) == (1, 2, 2)
    assert evaluator.resources.memory == 1024 * MiB
    assert d.multinode.on_child_failure == "terminate"


def test_mpi_hello_holds_the_other_nodes() -> None:
    d = load_definition(ROOT / "nodegroups" / "mpi-hello.toml")
    assert d.multinode is not None and d.multinode.num_nodes == 4
    main, held = d.multinode.groups
    assert main.command is not None and main.command[:3] == ("mpiexec", "-f", "$MNP_HOSTFILE")
    assert (held.start, held.end, held.command) == (1, 3, None)


@pytest.mark.parametrize("path", NODEGROUPS, ids=lambda p: p.name)
def test_nodegroups_validate(path: Path) -> None:
    assert ": ok (" in validate_file(path)


def test_validate_file_summaries(tmp_path: Path) -> None:
    assert validate_file(ROOT / "nodegroups" / "mpi-hello.toml").endswith(
        'mpi-hello.toml: ok (multinode job "mpi-hello", 4 nodes, 2 groups)'
    )
    single = tmp_path / "one.toml"
    single.write_text('command = ["true"]\n')
    assert validate_file(single) == f'{single}: ok (single job "one")'
    array = tmp_path / "arr.toml"
    array.write_text('command = ["true"]\n[array]\nsize = 5\n')
    assert validate_file(array) == f'{array}: ok (array job "arr", 5 children)'
    inv = tmp_path / "inv.toml"
    inv.write_text('[[hosts]]\nnames = "n[1-3]"\n')
    assert validate_file(inv) == f"{inv}: ok (inventory, 3 hosts, 1 compute environment, 1 queue)"


@pytest.mark.parametrize("path", [*NODEGROUPS, "FULL"], ids=str)
def test_to_dict_round_trips(path: Path | str) -> None:
    d = parse_definition(tomllib.loads(FULL), "j.toml") if path == "FULL" else load_definition(path)
    assert parse_definition(definition_to_dict(d), d.source) == d


def test_python_env_is_an_absolute_prefix_or_none_and_round_trips() -> None:
    for value in ("/home/a/venv", "none"):
        d = parse_definition({"name": "p", "command": ["x"], "python_env": value}, "p.toml")
        assert d.python_env == value
        assert parse_definition(definition_to_dict(d), d.source) == d
    with pytest.raises(SpecError, match=r"p.toml:python_env: 'venv' is not an absolute path"):
        parse_definition({"name": "p", "command": ["x"], "python_env": "venv"}, "p.toml")
    with pytest.raises(SpecError, match=r"<command line>:--python-env: 'rel' is not"):
        definition_from_command(["x"], python_env="rel")


@pytest.mark.parametrize(
    ("environ", "prefix", "base", "want"),
    [
        ({"VIRTUAL_ENV": "/w/v/"}, "/usr", "/usr", "/w/v"),  # activated venv (also uv)
        ({"CONDA_PREFIX": "/c/envs/x"}, "/usr", "/usr", "/c/envs/x"),  # activated conda env
        ({"VIRTUAL_ENV": "/w/v", "CONDA_PREFIX": "/c"}, "/usr", "/usr", "/w/v"),
        ({}, "/w/v", "/usr", "/w/v"),  # v/bin/mnp, not activated
        ({}, "/usr", "/usr", None),  # a system-wide Python: nothing to forward
        ({"VIRTUAL_ENV": "relative"}, "/usr", "/usr", None),
    ],
)
def test_submitter_python_env(
    environ: dict[str, str], prefix: str, base: str, want: str | None
) -> None:
    assert submitter_python_env(environ, prefix, base) == want


# --- overrides -------------------------------------------------------------


def single() -> JobDefinition:
    return parse_definition({"name": "s", "command": ["echo", "hi"]}, "s.toml")


def test_overrides_change_fields_and_keep_the_source() -> None:
    d = parse_definition({"name": "s", "command": ["echo", "Ref::x"], "parameters": {"x": "1"}},
                         "s.toml")  # fmt: skip
    o = apply_overrides(
        d, name="renamed", queue="q2", params={"x": "2"}, env={"A": "b"}, array_size="4",
        array_parallelism=2, sequential=True, depends_on=["7", "8:N_TO_N"], vcpus="2",
        memory="1GiB", gpus=1, attempts="3", timeout="1h", cwd="/w", export_env=True,
    )  # fmt: skip
    assert o.name == "renamed" and o.queue == "q2" and o.parameters == {"x": "2"}
    assert o.environment["A"] == "b"  # with export_env, the rest is this shell's
    assert {k: o.environment[k] for k in ("HOME", "PATH")} == {
        k: os.environ[k] for k in ("HOME", "PATH")
    }
    assert o.array is not None and (o.array.size, o.array.parallelism, o.array.sequential) == (
        4, 2, True,
    )  # fmt: skip
    assert o.depends_on == (Dependency("7"), Dependency("8", "N_TO_N"))
    assert o.resources == Resources(vcpus=2, memory=1 << 30, gpus=1)
    assert o.retry.attempts == 3 and o.timeout.attempt_duration == 3600
    assert o.cwd == "/w" and o.export_env and o.source == "s.toml"
    assert apply_overrides(d) == d


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"attempts": 11}, "<command line>:--attempts: 11 is out of range; allowed 1..10"),
        ({"attempts": "x"}, "<command line>:--attempts: expected a whole number"),
        ({"array_size": 1}, "<command line>:--array-size: 1 is out of range; allowed 2..100000"),
        ({"array_parallelism": 2}, "<command line>:--array-parallelism: needs an array job"),
        ({"sequential": True}, "<command line>:--sequential: needs an array job"),
        ({"vcpus": 0}, "<command line>:--vcpus: 0 is out of range"),
        ({"memory": "lots"}, '<command line>:--memory: "lots" is not a memory size'),
        ({"gpus": -1}, "<command line>:--gpus: -1 is out of range"),
        ({"timeout": "0s"}, "<command line>:--timeout: 0s is too short"),
        ({"timeout": "soon"}, "<command line>:--timeout: "),
        ({"name": "a b"}, "<command line>:--name: "),
        ({"queue": ""}, "<command line>:--queue: "),
        ({"env": {"MNP_X": "1"}}, "<command line>:--env: names starting with MNP_"),
        ({"params": {"bad-name": "1"}}, "<command line>:--param: not a valid parameter name"),
        ({"depends_on": ["1:SEQUENTIAL"]}, "<command line>:--depends-on: SEQUENTIAL is not"),
        ({"depends_on": ["1:N_TO_N"]}, "<command line>:--depends-on: N_TO_N needs an array"),
        ({"depends_on": [str(i) for i in range(21)]}, "<command line>:--depends-on: 21 dep"),
        ({"tasks_per_node": 2}, "<command line>:--tasks-per-node: 2 is not allowed"),
        ({"nodes": 0}, "<command line>:--nodes: 0 is out of range; allowed 1..1000"),
        ({"nodes": 1001}, "<command line>:--nodes: 1001 is out of range"),
        ({"cwd": ""}, "<command line>:--cwd: empty"),
        ({"tags": {"a b": "1"}}, "<command line>:--tag: not a valid tag key; use 1 to 128"),
        ({"tags": {"k": "x" * 257}}, "<command line>:--tag: use a value of at most 256"),
        ({"tags": {f"k{i}": "v" for i in range(51)}}, "<command line>:--tag: 51 tags; allowed"),
    ],
)
def test_override_errors_name_the_option(overrides: dict[str, object], expected: str) -> None:
    with pytest.raises(SpecError) as e:
        apply_overrides(single(), **overrides)  # type: ignore[arg-type]
    assert str(e.value).startswith(expected)
    assert "\n" not in str(e.value)


def test_tag_overrides_merge_into_the_definitions_tags() -> None:
    d = parse_definition(tomllib.loads(FULL), "job.toml")
    o = apply_overrides(d, tags={"team": "nlp", "run": "7"})
    assert o.tags == {"team": "nlp", "cost/center": "42", "run": "7"}
    assert definition_from_command(["true"], tags={"k": ""}).tags == {"k": ""}
    with pytest.raises(SpecError, match=r"j.toml:tags.x: use a value of at most 256"):
        parse_definition({"name": "j", "command": ["true"], "tags": {"x": "a\nb"}}, "j.toml")
    with pytest.raises(
        SpecError, match=r"j.toml:retry.evaluate_on_exit\[0\].on_status_reason: use"
    ):
        parse_definition(
            {"name": "j", "command": ["true"],
             "retry": {"evaluate_on_exit": [{"on_status_reason": "", "action": "EXIT"}]}},
            "j.toml",
        )  # fmt: skip


def test_nodes_turns_a_single_job_into_a_multinode_job() -> None:
    o = apply_overrides(single(), nodes=3, tasks_per_node=2, vcpus=2)
    assert o.type is JobType.MULTINODE and o.multinode is not None
    (g,) = o.multinode.groups
    assert (g.start, g.end, g.command, g.tasks_per_node) == (0, 2, ("echo", "hi"), 2)
    assert g.resources.vcpus == 2 and o.multinode.main_node == 0


def test_nodes_stretches_the_last_group() -> None:
    d = load_definition(ROOT / "nodegroups" / "hetero.toml")
    o = apply_overrides(d, nodes=6)
    assert o.multinode is not None
    assert [(g.start, g.end) for g in o.multinode.groups] == [(0, 0), (1, 2), (3, 5)]
    m = apply_overrides(load_definition(ROOT / "nodegroups" / "mpi-hello.toml"), nodes="2")
    assert m.multinode is not None and m.multinode.groups[1].end == 1


def test_nodes_too_few_for_the_groups() -> None:
    d = load_definition(ROOT / "nodegroups" / "hetero.toml")
    with pytest.raises(
        SpecError, match=r"^<command line>:--nodes: 3 is too few .* allowed 4\.\.1000"
    ):
        apply_overrides(d, nodes=3)


def test_array_size_on_a_multinode_job_is_refused() -> None:
    d = load_definition(ROOT / "nodegroups" / "hetero.toml")
    with pytest.raises(SpecError, match=r"^<command line>:--array-size: an array job cannot be"):
        apply_overrides(d, array_size=4)
    arr = apply_overrides(single(), array_size=4)
    with pytest.raises(SpecError, match=r"^<command line>:--nodes: an array job cannot be"):
        apply_overrides(arr, nodes=2)


def test_overrides_reach_every_group() -> None:
    d = load_definition(ROOT / "nodegroups" / "hetero.toml")
    o = apply_overrides(d, tasks_per_node=4, vcpus=8, memory=2048, env={"ROLE": "x", "B": "c"})
    assert o.multinode is not None
    assert {g.tasks_per_node for g in o.multinode.groups} == {4}
    assert {g.resources.vcpus for g in o.multinode.groups} == {8}
    assert {g.resources.memory for g in o.multinode.groups} == {2048 * MiB}
    assert {g.environment["ROLE"] for g in o.multinode.groups} == {"x"}
    assert o.environment["B"] == "c" and "B" not in o.multinode.groups[0].environment


def test_definition_from_command() -> None:
    d = definition_from_command(["./my script.sh", "a", "Ref::p"], params={"p": "1"}, attempts=2)
    assert d.name == "my-script-sh" and d.command == ("./my script.sh", "a", "Ref::p")
    assert d.source == "<command line>" and d.retry.attempts == 2
    assert definition_from_command(["/usr/bin/"]).name == "bin"
    m = definition_from_command(["hostname"], nodes=2, export_env=True)
    assert m.type is JobType.MULTINODE and m.export_env


def test_export_puts_the_shell_environment_under_the_definitions() -> None:
    from mnp.spec.overrides import exported

    d = parse_definition(
        {
            "name": "x",
            "command": ["true"],
            "environment": {"A": "definition"},
            "secrets": {"TOKEN": {"env": "T"}},
        },
        "x.toml",
    )
    shell = {
        "A": "shell",
        "B": "shell",
        "TOKEN": "leak",  # the job takes it from [secrets]
        "MNP_JOB_ID": "7",  # mnp sets it
        "AWS_BATCH_JOB_ID": "7",
        "BASH_FUNC_f%%": "() { :; }",  # an exported shell function: not a variable name
        "HUGE": "x" * 200_000,  # more than a task's environment entry can hold
    }
    assert exported(d, shell) == {"A": "definition", "B": "shell"}


@pytest.mark.parametrize(
    ("argv", "overrides", "expected"),
    [
        ([], {}, "<command line>:command: no command given"),
        (["echo", "Ref::x"], {}, "<command line>:command[1]: Ref::x names no parameter"),
        ([""], {}, "<command line>:command[0]: empty program name"),
        (["echo"], {"attempts": 0}, "<command line>:--attempts: 0 is out of range"),
    ],
)
def test_definition_from_command_errors(
    argv: list[str], overrides: dict[str, object], expected: str
) -> None:
    with pytest.raises(SpecError) as e:
        definition_from_command(argv, **overrides)
    assert str(e.value).startswith(expected)


def test_override_result_is_a_new_frozen_definition() -> None:
    d = single()
    o = apply_overrides(d, attempts=2)
    assert o is not d
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.name = "x"  # type: ignore[misc]


# --- --param and Ref::K (issue 11: AWS Batch SubmitJob parameters) ----------

UNDECLARED = 'command = ["Ref::python", "-c", "print(1)", "Ref::size"]\n[parameters]\nsize = "3"\n'


def test_param_gives_a_value_to_an_undeclared_ref(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(UNDECLARED)
    with pytest.raises(SpecError, match=r"command\[0\]: Ref::python names no parameter"):
        load_definition(path)  # alone, the file is incomplete
    d = apply_overrides(load_definition(path, open_refs=True), params={"python": "/bin/py"})
    assert d.parameters == {"size": "3", "python": "/bin/py"}
    assert d.source == str(path)
    # what the controller parses again is complete on its own
    assert parse_definition(definition_to_dict(d), d.source) == d


def test_a_ref_without_any_value_stays_an_error(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(UNDECLARED)
    loose = load_definition(path, open_refs=True)
    with pytest.raises(SpecError) as e:
        apply_overrides(loose, attempts=2)
    assert str(e.value).startswith(
        f"{path}:command[0]: Ref::python names no parameter; declared parameters: size; "
        "declare it in [parameters] or give --param python=VALUE"
    )
    with pytest.raises(SpecError, match=r"^\S+:command\[0\]: Ref::python names no parameter"):
        apply_overrides(loose, params={"size": "4"})  # a value for another one is not enough


@pytest.mark.parametrize(
    ("argv", "params", "expected"),
    [
        (
            ["echo", "hi"],
            {"x": "1"},
            "x: no Ref::x in the job's commands uses it; parameters the commands use: none",
        ),
        (
            ["echo", "Ref::size"],
            {"size": "1", "sise": "2"},
            "sise: no Ref::sise in the job's commands uses it; parameters the commands use: size",
        ),
    ],
)
def test_a_param_nothing_uses_is_an_error(
    argv: list[str], params: dict[str, str], expected: str
) -> None:
    with pytest.raises(SpecError) as e:
        definition_from_command(argv, params=params)
    assert str(e.value) == f"<command line>:--param: {expected}"
    d = parse_definition({"name": "s", "command": argv, "parameters": {"size": "0"}}, "s.toml")
    with pytest.raises(SpecError) as e:
        apply_overrides(d, params=params)
    assert str(e.value) == f"<command line>:--param: {expected}"


def test_a_param_used_only_by_a_group_command_counts() -> None:
    d = parse_definition(
        {
            "name": "m",
            "type": "multinode",
            "multinode": {
                "num_nodes": 2,
                "groups": [
                    {"target_nodes": "0", "command": ["echo", "main"]},
                    {"target_nodes": "1", "command": ["echo", "Ref::who"]},
                ],
            },
        },
        "m.toml",
        open_refs=True,
    )
    o = apply_overrides(d, params={"who": "child"})
    assert o.parameters == {"who": "child"}


def test_validate_accepts_an_undeclared_ref_and_says_what_it_needs(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(UNDECLARED)
    assert validate_file(path) == f'{path}: ok (single job "job"; needs --param python=VALUE)'


def test_validation_report_entries(tmp_path: Path) -> None:
    from mnp.spec import validation_report

    job = tmp_path / "job.toml"
    job.write_text(UNDECLARED)
    assert validation_report(job) == {
        "file": str(job),
        "kind": "definition",
        "ok": True,
        "summary": 'single job "job"; needs --param python=VALUE',
        "needs_params": ["python"],
    }
    inv = tmp_path / "inv.toml"
    inv.write_text('[[hosts]]\nnames = "n[1-3]"\n')
    assert validation_report(inv) == {
        "file": str(inv),
        "kind": "inventory",
        "ok": True,
        "summary": "inventory, 3 hosts, 1 compute environment, 1 queue",
    }
    bad = tmp_path / "bad.toml"
    bad.write_text('command = ["true"]\ncomand = 1\n')
    report = validation_report(bad)
    assert (report["kind"], report["ok"]) == ("definition", False)
    assert report["error"].startswith(f"{bad}:comand: unknown field")
    missing = validation_report(tmp_path / "none.toml")
    assert (missing["kind"], missing["ok"]) == (None, False)
    assert missing["error"] == f"{tmp_path / 'none.toml'}: no such file"
