"""``[compute_environments.NAME] type = "MANAGED"`` (issue 15): parsed into a ManagedSpec;
every malformed field is one SpecError line naming it (and exit 2 from the CLI)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mnp.errors import SpecError
from mnp.model import ManagedSpec
from mnp.spec import parse_inventory
from tests.helpers import mnp

HOSTS = '[[hosts]]\nnames = "n[1-2]"\n'
BURST = """
[compute_environments.local]
hosts = "n[1-2]"
[compute_environments.burst]
type = "MANAGED"
provider = "slurm"
min_vcpus = 0
max_vcpus = 64
desired_vcpus = 0
idle_timeout = "5m"
[compute_environments.burst.allocation]
nodes = 2
time_limit = "1h"
vcpus_per_node = 16
options = ["--partition=debug"]
"""


def parse(text: str) -> object:
    return parse_inventory(tomllib.loads(HOSTS + text), "inv.toml")


def test_managed_environment_as_in_the_issue() -> None:
    inv = parse(BURST)
    assert inv.compute_environments["local"].managed is None  # type: ignore[attr-defined]
    burst = inv.compute_environments["burst"]  # type: ignore[attr-defined]
    assert burst.hosts == () and burst.state == "ENABLED"
    assert burst.managed == ManagedSpec(
        provider="slurm", max_vcpus=64, min_vcpus=0, desired_vcpus=0, idle_timeout=300.0,
        nodes=2, time_limit=3600.0, vcpus_per_node=16, options=("--partition=debug",),
    )  # fmt: skip


def test_defaults_and_command_provider() -> None:
    inv = parse(
        '[compute_environments.cloud]\ntype = "managed"\nprovider = "command"\nmax_vcpus = 8\n'
        'min_vcpus = 2\nstart = ["/bin/up", "--n"]\nstop = ["/bin/down"]\n'
    )
    m = inv.compute_environments["cloud"].managed  # type: ignore[attr-defined]
    assert (m.min_vcpus, m.desired_vcpus, m.nodes, m.time_limit, m.vcpus_per_node) == (
        2, 2, 1, None, None,
    )  # fmt: skip
    assert (m.start, m.stop, m.idle_timeout) == (("/bin/up", "--n"), ("/bin/down",), 300.0)


CE = '[compute_environments.b]\ntype = "MANAGED"\n'
SL = CE + 'provider = "slurm"\n'
CM = CE + 'provider = "command"\nmax_vcpus = 4\n'
BAD = [
    ("bad-type", '[compute_environments.b]\ntype = "AUTO"\nhosts = "n1"\n',
     'inv.toml:compute_environments.b.type: "AUTO" is not allowed'),
    ("no-provider", CE + "max_vcpus = 4\n",
     'inv.toml:compute_environments.b.provider: missing; a MANAGED compute environment needs'),
    ("bad-provider", CE + 'provider = "aws"\nmax_vcpus = 4\n',
     'inv.toml:compute_environments.b.provider: "aws" is not allowed'),
    ("no-max", SL, "inv.toml:compute_environments.b.max_vcpus: missing"),
    ("zero-max", SL + "max_vcpus = 0\n",
     "inv.toml:compute_environments.b.max_vcpus: 0 is out of range"),
    ("min-above-max", SL + "max_vcpus = 4\nmin_vcpus = 8\n",
     "inv.toml:compute_environments.b.min_vcpus: 8 is more than max_vcpus (4)"),
    ("desired-below-min", SL + "max_vcpus = 8\nmin_vcpus = 4\ndesired_vcpus = 2\n",
     "inv.toml:compute_environments.b.desired_vcpus: 2 is out of range; allowed 4..8"),
    ("string-vcpus", SL + 'max_vcpus = "64"\n',
     "inv.toml:compute_environments.b.max_vcpus: expected"),
    ("bad-idle", SL + 'max_vcpus = 4\nidle_timeout = "soon"\n',
     "inv.toml:compute_environments.b.idle_timeout:"),
    ("hosts-on-managed", SL + 'max_vcpus = 4\nhosts = "n1"\n',
     "inv.toml:compute_environments.b.hosts: a MANAGED compute environment gets its hosts"),
    ("managed-field-on-unmanaged", '[compute_environments.b]\nhosts = "n1"\nmax_vcpus = 4\n',
     'inv.toml:compute_environments.b.max_vcpus: only for type = "MANAGED"'),
    ("unknown-alloc", SL + "max_vcpus = 4\n[compute_environments.b.allocation]\nnode = 2\n",
     'inv.toml:compute_environments.b.allocation.node: unknown field (did you mean "nodes"?)'),
    ("zero-nodes", SL + "max_vcpus = 4\n[compute_environments.b.allocation]\nnodes = 0\n",
     "inv.toml:compute_environments.b.allocation.nodes: 0 is out of range"),
    ("short-limit", SL + 'max_vcpus = 4\n[compute_environments.b.allocation]\ntime_limit = "30s"\n',
     "inv.toml:compute_environments.b.allocation.time_limit: less than 1m"),
    ("too-big-alloc",
     SL + "max_vcpus = 8\n[compute_environments.b.allocation]\nnodes = 2\nvcpus_per_node = 8\n",
     "inv.toml:compute_environments.b.allocation.nodes: 2 nodes of 8 vCPUs is more than"),
    ("bad-option", SL + 'max_vcpus = 4\n[compute_environments.b.allocation]\noptions = [""]\n',
     "inv.toml:compute_environments.b.allocation.options[0]: empty"),
    ("option-not-list",
     SL + 'max_vcpus = 4\n[compute_environments.b.allocation]\noptions = "--x"\n',
     "inv.toml:compute_environments.b.allocation.options: expected an array of strings"),
    ("start-on-slurm", SL + 'max_vcpus = 4\nstart = ["/bin/up"]\n',
     'inv.toml:compute_environments.b.start: only for provider = "command"'),
    ("command-without-stop", CE + 'provider = "command"\nmax_vcpus = 4\nstart = ["/bin/up"]\n',
     "inv.toml:compute_environments.b.stop: missing or empty"),
    ("command-empty-start", CM + 'start = []\nstop = ["/bin/down"]\n',
     "inv.toml:compute_environments.b.start: missing or empty"),
    ("command-blank-program", CM + 'start = [" "]\nstop = ["/bin/down"]\n',
     "inv.toml:compute_environments.b.start: missing or empty"),
    ("command-start-string", CM + 'start = "/bin/up 2"\nstop = ["/bin/down"]\n',
     "inv.toml:compute_environments.b.start: expected an array of strings"),
    ("command-stop-numbers", CM + 'start = ["/bin/up"]\nstop = [1]\n',
     "inv.toml:compute_environments.b.stop"),
    ("command-options",
     CM + 'start = ["/bin/up"]\nstop = ["/bin/down"]\n[compute_environments.b.allocation]\n'
     'options = ["--x"]\n',
     'inv.toml:compute_environments.b.allocation.options: only for "slurm" and "pbs"'),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_managed_environment(text: str, expected: str) -> None:
    with pytest.raises(SpecError) as e:
        parse(text)
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_cli_command_provider_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(HOSTS + CM + 'start = ["/bin/up"]\n')
    r = mnp("hosts", "--inventory", str(path), "--json", timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f'mnp: {path}:compute_environments.b.stop: missing or empty; provider = "command" '
        'needs the stop program as an array, e.g. ["/usr/local/bin/nodes-down"]'
    ]


def test_cli_says_one_line_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(HOSTS + SL + "max_vcpus = 4\nmin_vcpus = 8\n")
    r = mnp("hosts", "--inventory", str(path), "--json", timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mnp: {path}:compute_environments.b.min_vcpus: 8 is more than max_vcpus (4); allowed 0..4"
    ]
