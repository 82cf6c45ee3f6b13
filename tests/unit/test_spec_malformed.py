"""Malformed definitions and inventories: each is one SpecError line naming file and field.

Also a property test: whatever nested data reaches the parsers, only SpecError
comes out (never KeyError, TypeError, ValueError or RecursionError).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnp.errors import SpecError
from mnp.spec import load_definition, load_inventory, parse_definition, parse_inventory
from tests.ledger import Ledger

pytestmark = pytest.mark.faults

CMD = 'command = ["true"]\n'
MN = 'type = "multinode"\n[multinode]\nnum_nodes = 4\n'


def groups(*ranges: str) -> str:
    return MN + "".join(
        f'[[multinode.groups]]\ntarget_nodes = "{r}"\ncommand = ["x"]\n' for r in ranges
    )


HOSTS = '[[hosts]]\nnames = "n[1-4]"\nlabels = ["cpu"]\n'

# (id, content, expected start of str(SpecError)); job.toml is a definition, inv.toml an inventory
DEFINITIONS: list[tuple[str, str | bytes, str]] = [
    ("bad-toml", "name = \n", "job.toml:1:8: invalid TOML"),
    ("bad-toml-eof", "command = [", "job.toml: invalid TOML"),
    ("deep-toml", "a = " + "[" * 5000, "job.toml: invalid TOML: nested too deeply"),
    ("non-utf8", b'command = ["\xff"]\n', "job.toml:1:13: not UTF-8"),
    (
        "unknown-top",
        CMD + "comand = 1\n",
        'job.toml:comand: unknown field (did you mean "command"?)',
    ),
    ("unknown-resources", CMD + "[resources]\ncpus = 2\n", "job.toml:resources.cpus: unknown"),
    ("unknown-group", groups(":") + "extra = 1\n", "job.toml:multinode.groups[0].extra: unknown"),
    (
        "unknown-rule",
        CMD + '[retry]\nevaluate_on_exit = [{action="EXIT", code="1"}]\n',
        "job.toml:retry.evaluate_on_exit[0].code: unknown",
    ),
    ("unknown-array", CMD + "[array]\nsize = 3\nwidth = 2\n", "job.toml:array.width: unknown"),
    ("missing-command", 'name = "x"\n', "job.toml:command: missing"),
    (
        "string-command",
        'command = "echo hi"\n',
        'job.toml:command: expected a list of strings, got a string; use a list: ["echo", "hi"]',
    ),
    ("empty-command", "command = []\n", "job.toml:command: empty"),
    (
        "int-in-command",
        'command = ["sleep", 10]\n',
        'job.toml:command[1]: expected a string, got an integer (10); quote it: "10"',
    ),
    ("bad-name", CMD + 'name = "no spaces"\n', 'job.toml:name: "no spaces" is not allowed'),
    ("long-name", CMD + f'name = "{"x" * 129}"\n', "job.toml:name: "),
    ("bad-type", CMD + 'type = "container"\n', 'job.toml:type: "container" is not allowed'),
    ("bad-queue-type", CMD + "queue = 3\n", "job.toml:queue: expected a string, got an integer"),
    ("vcpus-zero", CMD + "[resources]\nvcpus = 0\n", "job.toml:resources.vcpus: 0 is out of range"),
    (
        "vcpus-string",
        CMD + '[resources]\nvcpus = "2"\n',
        "job.toml:resources.vcpus: expected a number",
    ),
    ("bad-memory", CMD + '[resources]\nmemory = "2 bananas"\n', "job.toml:resources.memory: "),
    (
        "gpus-float",
        CMD + "[resources]\ngpus = 1.5\n",
        "job.toml:resources.gpus: expected an integer",
    ),
    (
        "attempts-11",
        CMD + "[retry]\nattempts = 11\n",
        "job.toml:retry.attempts: 11 is out of range; allowed 1..10",
    ),
    (
        "six-rules",
        CMD + "[retry]\nevaluate_on_exit = [" + '{action="EXIT"},' * 6 + "]\n",
        "job.toml:retry.evaluate_on_exit: 6 entries; allowed at most 5",
    ),
    (
        "bad-action",
        CMD + '[retry]\nevaluate_on_exit = [{action="AGAIN"}]\n',
        'job.toml:retry.evaluate_on_exit[0].action: "AGAIN" is not allowed; '
        'use one of "RETRY", "EXIT"',
    ),
    (
        "missing-action",
        CMD + '[retry]\nevaluate_on_exit = [{on_exit_code="1"}]\n',
        "job.toml:retry.evaluate_on_exit[0].action: missing",
    ),
    (
        "bad-exit-glob",
        CMD + '[retry]\nevaluate_on_exit = [{on_exit_code="1[3]", action="EXIT"}]\n',
        'job.toml:retry.evaluate_on_exit[0].on_exit_code: "1[3]" is not an exit-code pattern',
    ),
    (
        "bad-duration",
        CMD + '[timeout]\nattempt_duration = "forever"\n',
        'job.toml:timeout.attempt_duration: "forever" is not a duration',
    ),
    (
        "short-timeout",
        CMD + '[timeout]\nattempt_duration = "500ms"\n',
        "job.toml:timeout.attempt_duration: 0.5s is too short",
    ),
    (
        "negative-grace",
        CMD + '[timeout]\nkill_grace = "-1s"\n',
        "job.toml:timeout.kill_grace: negative",
    ),
    (
        "array-size-1",
        CMD + "[array]\nsize = 1\n",
        "job.toml:array.size: 1 is out of range; allowed 2..100000",
    ),
    (
        "array-size-huge",
        CMD + "[array]\nsize = 1000000000\n",
        "job.toml:array.size: 1000000000 is out",
    ),
    ("array-no-size", CMD + "[array]\nparallelism = 2\n", "job.toml:array.size: missing"),
    (
        "array-multinode",
        groups(":") + "[array]\nsize = 4\n",
        "job.toml:array: an array job cannot be",
    ),
    ("multinode-no-table", CMD + 'type = "multinode"\n', "job.toml:multinode: missing"),
    (
        "multinode-single",
        CMD + 'type = "single"\n[multinode]\nnum_nodes = 2\n',
        'job.toml:multinode: only allowed with type = "multinode"',
    ),
    ("num-nodes-0", CMD + "[multinode]\nnum_nodes = 0\n", "job.toml:multinode.num_nodes: 0 is out"),
    (
        "main-node-out",
        CMD + "[multinode]\nnum_nodes = 4\nmain_node = 4\n",
        "job.toml:multinode.main_node: 4 is out of range; allowed 0..3",
    ),
    (
        "bad-child-failure",
        CMD + '[multinode]\nnum_nodes = 2\non_child_failure = "explode"\n',
        "job.toml:multinode.on_child_failure: ",
    ),
    (
        "overlap",
        groups("0:2", "2:"),
        "job.toml:multinode.groups[1].target_nodes: node 2 also in "
        "multinode.groups[0]; each node must be in exactly one group",
    ),
    ("missing-nodes", groups("0", "2"), "job.toml:multinode.groups: nodes 1, 3 in no group"),
    ("range-out", groups("0", "1:4"), "job.toml:multinode.groups[1].target_nodes: node 4 is out"),
    (
        "bad-range",
        groups("zero"),
        'job.toml:multinode.groups[0].target_nodes: "zero" is not a node',
    ),
    (
        "six-groups",
        groups("0", "1", "2", "3", "3", "3"),
        "job.toml:multinode.groups: 6 groups; allowed 1..5",
    ),
    (
        "no-groups",
        MN + "multinode.groups = []\n".replace("multinode.", ""),
        "job.toml:multinode.groups: 0 groups; allowed 1..5",
    ),
    (
        "main-without-command",
        MN + '[[multinode.groups]]\ntarget_nodes = ":"\n',
        "job.toml:command: missing; the main node's group has no command",
    ),
    (
        "bad-gpu-bind",
        groups(":") + 'gpu_bind = "per-gpu"\n',
        "job.toml:multinode.groups[0].gpu_bind",
    ),
    (
        "tasks-zero",
        groups(":") + "tasks_per_node = 0\n",
        "job.toml:multinode.groups[0].tasks_per_node: 0 is out of range",
    ),
    (
        "groups-not-array",
        MN + '[multinode.groups]\ntarget_nodes = ":"\n',
        "job.toml:multinode.groups: expected an array of tables",
    ),
    (
        "21-deps",
        CMD + "depends_on = [" + ",".join(f'"{i}"' for i in range(21)) + "]\n",
        "job.toml:depends_on: 21 dependencies; allowed at most 20",
    ),
    ("deps-string", CMD + 'depends_on = "42"\n', "job.toml:depends_on: expected a list"),
    (
        "dep-sequential",
        CMD + 'depends_on = ["42:SEQUENTIAL"]\n',
        "job.toml:depends_on[0]: SEQUENTIAL is not a dependency type",
    ),
    (
        "dep-bad-type",
        CMD + 'depends_on = [{job_id = "1", type = "after"}]\n',
        'job.toml:depends_on[0].type: "after" is not a dependency type',
    ),
    (
        "dep-twice",
        CMD + 'depends_on = ["1", "1:afterany"]\n',
        "job.toml:depends_on[1]: job 1 is listed",
    ),
    (
        "dep-n-to-n-single",
        CMD + 'depends_on = ["1:N_TO_N"]\n',
        "job.toml:depends_on[0]: N_TO_N needs",
    ),
    ("dep-bad-id", CMD + 'depends_on = ["a b"]\n', 'job.toml:depends_on[0]: "a b" is not a job id'),
    (
        "ref-unknown",
        'command = ["echo", "Ref::size"]\n[parameters]\nother = "1"\n',
        "job.toml:command[1]: Ref::size names no parameter; declared parameters: other",
    ),
    (
        "ref-in-group",
        groups("0", "1:").replace('["x"]', '["Ref::n"]', 1),
        "job.toml:multinode.groups[0].command[0]: Ref::n names no parameter; "
        "declared parameters: none",
    ),
    (
        "reserved-env",
        CMD + '[environment]\nMNP_JOB_ID = "1"\n',
        "job.toml:environment.MNP_JOB_ID: names starting with MNP_ or AWS_BATCH_ are reserved",
    ),
    (
        "reserved-aws-env",
        CMD + '[environment]\nAWS_BATCH_JOB_ID = "1"\n',
        "job.toml:environment.AWS_BATCH_JOB_ID: names starting",
    ),
    ("bad-env-name", CMD + '[environment]\n"1X" = "1"\n', "job.toml:environment.1X: not a valid"),
    (
        "env-table-value",
        CMD + "[environment]\nA = { b = 1 }\n",
        "job.toml:environment.A: expected a string, got a table",
    ),
    (
        "param-list",
        CMD + "[parameters]\nsize = [1]\n",
        "job.toml:parameters.size: expected a string",
    ),
    (
        "secret-both",
        CMD + '[secrets]\nT = { file = "f", env = "E" }\n',
        "job.toml:secrets.T: give exactly one of file",
    ),
    ("secret-string", CMD + '[secrets]\nT = "abc"\n', "job.toml:secrets.T: expected a table"),
    (
        "secret-env-clash",
        CMD + '[environment]\nT = "1"\n[secrets]\nT = { env = "T" }\n',
        "job.toml:environment.T: also set in [secrets]",
    ),
    ("tasks-single", CMD + "tasks_per_node = 2\n", "job.toml:tasks_per_node: 2 is not allowed"),
    ("aws-env-string", CMD + 'aws_batch_env = "yes"\n', "job.toml:aws_batch_env: expected true or"),
    ("newline-key", CMD + '[environment]\n"A\\nB" = "1"\n', 'job.toml:environment."A\\nB": not a'),
    # issue 14: containers
    (
        "container-no-image",
        CMD + '[container]\nruntime = "podman"\n',
        "job.toml:container.image: missing",
    ),
    (
        "container-bad-runtime",
        CMD + '[container]\nimage = "x"\nruntime = "lxc"\n',
        'job.toml:container.runtime: "lxc" is not allowed; use one of "auto", "podman", "docker"',
    ),
    (
        "container-relative-mount",
        CMD + '[container]\nimage = "x"\nmounts = ["data:/data"]\n',
        'job.toml:container.mounts[0]: "data:/data": the host path "data" is not absolute',
    ),
    (
        "container-malformed-mount",
        CMD + '[container]\nimage = "x"\nmounts = ["/data"]\n',
        'job.toml:container.mounts[0]: "/data" is not a mount; use "HOST:CONTAINER"',
    ),
    (
        "container-mount-mode",
        CMD + '[container]\nimage = "x"\nmounts = ["/a:/b:rx"]\n',
        'job.toml:container.mounts[0]: "/a:/b:rx" is not a mount',
    ),
    (
        "container-image-option",
        CMD + '[container]\nimage = "--privileged"\n',
        'job.toml:container.image: "--privileged" is not an image reference',
    ),
    ("container-not-table", CMD + 'container = "x"\n', "job.toml:container: expected a table"),
    (
        "container-unknown",
        CMD + '[container]\nimage = "x"\nvolumes = []\n',
        "job.toml:container.volumes: unknown field",
    ),
    (
        "container-options-string",
        CMD + '[container]\nimage = "x"\noptions = "--init"\n',
        "job.toml:container.options: expected an array of strings",
    ),
    (
        "group-container-no-image",
        groups(":") + 'container = { runtime = "docker" }\n',
        "job.toml:multinode.groups[0].container.image: missing",
    ),
]

INVENTORIES: list[tuple[str, str | bytes, str]] = [
    ("no-hosts", "[ssh]\nport = 22\n", "inv.toml:hosts: missing"),
    ("empty-hosts", "hosts = []\n", "inv.toml:hosts: empty"),
    ("hosts-table", '[hosts]\nnames = "a"\n', "inv.toml:hosts: expected an array of tables"),
    ("bad-nodeset", '[[hosts]]\nnames = "node[01-"\n', "inv.toml:hosts[0].names: '[' is never"),
    ("huge-nodeset", '[[hosts]]\nnames = "n[0-99999999]"\n', "inv.toml:hosts[0].names: expands to"),
    (
        "dash-host",
        '[[hosts]]\nnames = "-oProxyCommand"\n',
        'inv.toml:hosts[0].names: "-oProxyCommand"',
    ),
    (
        "duplicate-hosts",
        HOSTS + '[[hosts]]\nnames = "n4"\n',
        'inv.toml:hosts[1].names: host "n4" is also in hosts[0]; host names must be unique',
    ),
    (
        "duplicate-in-entry",
        '[[hosts]]\nnames = "n[1,1]"\n',
        'inv.toml:hosts[0].names: host "n1" is',
    ),
    ("unknown-host-field", HOSTS + "cores = 4\n", "inv.toml:hosts[0].cores: unknown field"),
    (
        "bad-vcpus",
        HOSTS + 'vcpus = "lots"\n',
        'inv.toml:hosts[0].vcpus: "lots" is not allowed; use "auto"',
    ),
    ("bad-host-memory", HOSTS + 'memory = "big"\n', "inv.toml:hosts[0].memory: "),
    ("bad-transport", HOSTS + 'transport = "rsh"\n', 'inv.toml:hosts[0].transport: "rsh" is not'),
    (
        "bad-address-escape",
        HOSTS + 'address = "10.0.0.%x"\n',
        "inv.toml:hosts[0].address: unknown %",
    ),
    ("bad-ssh-port", "[ssh]\nport = 70000\n" + HOSTS, "inv.toml:ssh.port: 70000 is out of range"),
    ("bad-ssh-field", '[ssh]\npassword = "x"\n' + HOSTS, "inv.toml:ssh.password: unknown field"),
    (
        "bad-ssh-transport",
        '[ssh]\ntransport = "paramiko"\n' + HOSTS,
        'inv.toml:ssh.transport: "paramiko" is not allowed; use one of',
    ),
    (
        "empty-agent-cache",
        '[ssh]\nagent_cache = " "\n' + HOSTS,
        'inv.toml:ssh.agent_cache: give a folder on the hosts (e.g. "~/.cache/mnp"), or "none"',
    ),
    (
        "bad-host-ssh-transport",
        HOSTS + "ssh = { transport = 1 }\n",
        "inv.toml:hosts[0].ssh.transport: expected one of",
    ),
    (
        "bad-host-ssh",
        HOSTS + 'ssh = { connect_timeout = "never" }\n',
        'inv.toml:hosts[0].ssh.connect_timeout: "never" is not a duration',
    ),
    (
        "unknown-ce-host",
        HOSTS + '[compute_environments.cpu]\nhosts = "n[4-6]"\n',
        "inv.toml:compute_environments.cpu.hosts: n[5-6] not in [[hosts]]",
    ),
    (
        "unknown-label",
        HOSTS + '[compute_environments.gpu]\nlabels = ["gpu"]\n',
        'inv.toml:compute_environments.gpu.labels[0]: no host has label "gpu"; labels in use: cpu',
    ),
    (
        "ce-empty",
        HOSTS + '[compute_environments.cpu]\nstate = "ENABLED"\n',
        "inv.toml:compute_environments.cpu: give hosts",
    ),
    (
        "ce-bad-state",
        HOSTS + '[compute_environments.cpu]\nhosts = "n1"\nstate = "ON"\n',
        'inv.toml:compute_environments.cpu.state: "ON" is not allowed; '
        'use one of "ENABLED", "DISABLED"',
    ),
    (
        "queue-unknown-ce",
        HOSTS + '[queues.q]\ncompute_environments = ["gpu"]\n',
        'inv.toml:queues.q.compute_environments[0]: "gpu" is not a compute environment; defined: '
        "default",
    ),
    (
        "queue-priority",
        HOSTS + "[queues.q]\npriority = -1\n",
        "inv.toml:queues.q.priority: -1 is out",
    ),
    (
        "queue-bad-name",
        HOSTS + '[queues."a b"]\npriority = 1\n',
        'inv.toml:queues."a b": not a valid',
    ),
    (
        "queue-ce-twice",
        HOSTS + '[queues.q]\ncompute_environments = ["default", "default"]\n',
        'inv.toml:queues.q.compute_environments[1]: "default" is listed twice',
    ),
    ("inv-unknown-top", HOSTS + "[scheduler]\nx = 1\n", "inv.toml:scheduler: unknown field"),
    ("inv-bad-toml", "[[hosts]\n", "inv.toml:1:8: invalid TOML"),
    ("inv-non-utf8", b'[[hosts]]\nnames = "\xc3\x28"\n', "inv.toml:2:10: not UTF-8"),
]


def _check(err: SpecError, expected: str) -> None:
    text = str(err)
    assert text.startswith(expected), text
    assert "\n" not in text and "\r" not in text
    assert "Traceback" not in text


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in DEFINITIONS],
                         ids=[c[0] for c in DEFINITIONS])  # fmt: skip
def test_malformed_definition(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str | bytes,
    expected: str,
    ledger: Ledger,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("job.toml").write_bytes(content if isinstance(content, bytes) else content.encode())
    with ledger.tried("definition file"), pytest.raises(SpecError) as e:
        load_definition("job.toml")
    _check(e.value, expected)


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in INVENTORIES],
                         ids=[c[0] for c in INVENTORIES])  # fmt: skip
def test_malformed_inventory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str | bytes,
    expected: str,
    ledger: Ledger,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("inv.toml").write_bytes(content if isinstance(content, bytes) else content.encode())
    with ledger.tried("inventory file"), pytest.raises(SpecError) as e:
        load_inventory("inv.toml")
    _check(e.value, expected)


def test_table_is_big_enough() -> None:
    assert len(DEFINITIONS) + len(INVENTORIES) >= 45


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        load_definition(tmp_path / "nope.toml")
    assert str(e.value) == f"{tmp_path / 'nope.toml'}: no such file"
    with pytest.raises(SpecError) as e:
        load_inventory(tmp_path)
    assert str(e.value) == f"{tmp_path}: is a directory; expected a TOML file"


def test_not_a_table() -> None:
    with pytest.raises(SpecError, match="^x: expected a table of job definition fields, got an"):
        parse_definition([1, 2], "x")  # type: ignore[arg-type]


# --- property: arbitrary data never escapes as anything but SpecError ----------

_KEYS = st.sampled_from(
    ["name", "command", "type", "multinode", "groups", "num_nodes", "target_nodes", "array",
     "size", "resources", "vcpus", "memory", "retry", "evaluate_on_exit", "action", "depends_on",
     "job_id", "environment", "secrets", "file", "parameters", "timeout", "attempt_duration",
     "hosts", "names", "ssh", "port", "compute_environments", "queues", "labels", "address",
     "main_node", "tasks_per_node", "on_exit_code", "state", "priority"]
) | st.text(max_size=8)  # fmt: skip
_LEAVES = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from([":", "0", "1:", "n[1-3]", "2h", "1GiB", "multinode", "RETRY", "auto"])
)  # fmt: skip
_DATA = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _DATA, max_size=8))
def test_parse_definition_raises_only_spec_error(ledger: Ledger, data: dict[str, object]) -> None:
    with ledger.tried("definition (hypothesis)"):
        try:
            parse_definition(data, "fuzz.toml")
        except SpecError as e:
            assert "\n" not in str(e) and str(e).startswith("fuzz.toml")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _DATA, max_size=8))
def test_parse_inventory_raises_only_spec_error(ledger: Ledger, data: dict[str, object]) -> None:
    with ledger.tried("inventory (hypothesis)"):
        try:
            parse_inventory(data, "fuzz.toml")
        except SpecError as e:
            assert "\n" not in str(e) and str(e).startswith("fuzz.toml")


_NODESET_TEXT = st.text(alphabet="ab01-9[],-_.", max_size=24) | st.text(max_size=16)


@settings(max_examples=300, deadline=None)
@given(_NODESET_TEXT)
def test_nodesets_in_an_inventory_raise_only_spec_error(ledger: Ledger, text: str) -> None:
    with ledger.tried("nodeset in an inventory (hypothesis)"):
        try:
            inv = parse_inventory({"hosts": [{"names": text}]}, "fuzz.toml")
        except SpecError as e:
            assert "\n" not in str(e) and str(e).startswith("fuzz.toml:hosts[0].names")
        else:
            assert inv.hosts and all(h.name for h in inv.hosts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="0123456789:-, x", max_size=8), min_size=1, max_size=6))
def test_node_ranges_in_a_definition_raise_only_spec_error(
    ledger: Ledger, ranges: list[str]
) -> None:
    data = {
        "command": ["true"],
        "type": "multinode",
        "multinode": {"num_nodes": 8, "groups": [{"target_nodes": r} for r in ranges]},
    }
    with ledger.tried("node ranges in a definition (hypothesis)"):
        try:
            d = parse_definition(data, "fuzz.toml")
        except SpecError as e:
            assert "\n" not in str(e) and str(e).startswith("fuzz.toml:multinode")
        else:
            assert d.multinode is not None
