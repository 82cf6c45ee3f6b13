"""Inventories: TOML files, the embedded local default, Slurm, PBS, hostfiles, auto."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mnp.errors import SpecError
from mnp.model import SshOptions
from mnp.spec import (
    load_inventory,
    local_inventory,
    parse_inventory,
    resolve_inventory,
)

SPEC_EXAMPLE = """
[ssh]
user = "alice"
port = 22
known_hosts = "~/.ssh/known_hosts"
identity = "~/.ssh/id_ed25519"
connect_timeout = "10s"
python = "python3"

[[hosts]]
names = "node[01-16]"
vcpus = "auto"
memory = "auto"
gpus = "auto"
labels = ["cpu"]

[compute_environments.cpu]
hosts = "node[01-16]"
state = "ENABLED"

[queues.default]
priority = 10
compute_environments = ["cpu"]
state = "ENABLED"
"""


def test_spec_example() -> None:
    i = parse_inventory(tomllib.loads(SPEC_EXAMPLE), "inv.toml")
    assert len(i.hosts) == 16 and i.hosts[0].name == "node01" and i.hosts[-1].name == "node16"
    h = i.hosts[0]
    assert (h.vcpus, h.memory, h.gpus, h.labels, h.transport) == (None, None, None, ("cpu",), "ssh")
    assert h.address == "node01"
    assert h.ssh == SshOptions(user="alice", port=22, identity=("~/.ssh/id_ed25519",))
    assert i.ssh == h.ssh
    assert i.compute_environments["cpu"].hosts == tuple(x.name for x in i.hosts)
    q = i.queues["default"]
    assert (q.priority, q.compute_environments, q.state) == (10, ("cpu",), "ENABLED")


def test_defaults_one_ce_and_one_queue() -> None:
    i = parse_inventory({"hosts": [{"names": "a,b"}, {"names": "c", "vcpus": 8}]}, "x")
    assert list(i.compute_environments) == ["default"]
    assert i.compute_environments["default"].hosts == ("a", "b", "c")
    assert i.queues["default"].compute_environments == ("default",)
    assert i.queues["default"].priority == 1
    assert i.host("c").vcpus == 8


def test_hosts_details() -> None:
    i = parse_inventory(
        tomllib.loads("""
[ssh]
user = "bob"
known_hosts = "NONE"
identity = ["~/.ssh/a", "~/.ssh/b"]
[[hosts]]
names = "gpu-[1-2]-[0-1]"
address = "10.0.%i.%n%%"
memory = "192GiB"
gpus = 8
vcpus = 64
labels = ["gpu", "big"]
ssh = { port = 2222, python = "/opt/py/bin/python3" }
[[hosts]]
names = "me"
transport = "local"
[compute_environments.gpu]
labels = ["gpu"]
state = "disabled"
[compute_environments.mixed]
hosts = "me"
labels = ["big"]
[queues.high]
priority = 100
compute_environments = ["gpu", "mixed"]
[queues.low]
priority = 0
"""),
        "inv.toml",
    )
    g = i.hosts[1]
    assert g.name == "gpu-1-1" and g.address == "10.0.1.gpu-1-1%"
    assert (g.memory, g.gpus, g.vcpus) == (192 << 30, 8, 64)
    assert g.ssh.port == 2222 and g.ssh.python == "/opt/py/bin/python3" and g.ssh.user == "bob"
    assert g.ssh.known_hosts == "none" and g.ssh.identity == ("~/.ssh/a", "~/.ssh/b")
    assert i.ssh.port is None
    me = i.host("me")
    assert me.transport == "local" and me.address == "localhost"
    assert i.compute_environments["gpu"].state == "DISABLED"
    assert i.compute_environments["gpu"].hosts == tuple(
        f"gpu-{a}-{b}" for a in (1, 2) for b in (0, 1)
    )
    assert i.compute_environments["mixed"].hosts[-1] == "me"
    assert len(i.compute_environments["mixed"].hosts) == 5
    assert i.queues["low"].compute_environments == ("gpu", "mixed")


def test_local_inventory() -> None:
    i = local_inventory(3)
    assert [h.name for h in i.hosts] == ["local-0", "local-1", "local-2"]
    assert {(h.transport, h.address, h.vcpus, h.memory, h.gpus) for h in i.hosts} == {
        ("local", "localhost", None, None, None)
    }
    assert list(i.compute_environments) == ["local"] and list(i.queues) == ["default"]
    assert i.queues["default"].compute_environments == ("local",) and i.source == "local"
    assert len(local_inventory().hosts) == 4
    with pytest.raises(SpecError, match=r"^<command line>:--local-nodes: 0 is out of range"):
        local_inventory(0)


def test_resolve_local_and_file(tmp_path: Path) -> None:
    assert resolve_inventory(None, 2, environ={}).source == "local"
    assert len(resolve_inventory("local", 5, environ={}).hosts) == 5
    path = tmp_path / "inv.toml"
    path.write_text('[[hosts]]\nnames = "n[1-2]"\n')
    assert [h.name for h in resolve_inventory(str(path), 4, environ={}).hosts] == ["n1", "n2"]
    assert load_inventory(path).source == str(path)


def test_slurm() -> None:
    env = {
        "SLURM_JOB_NODELIST": "gpu-a[01-03],gpu-b07",
        "SLURM_JOB_CPUS_PER_NODE": "36(x2),72,8",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_MEM_PER_NODE": "1024",
    }
    i = resolve_inventory("slurm", 4, environ=env)
    assert [(h.name, h.vcpus, h.gpus) for h in i.hosts] == [
        ("gpu-a01", 36, 4), ("gpu-a02", 36, 4), ("gpu-a03", 72, 4), ("gpu-b07", 8, 4),
    ]  # fmt: skip
    assert all(h.transport == "ssh" and h.ssh == SshOptions() for h in i.hosts)
    assert i.hosts[0].memory == 1 << 30 and i.source == "slurm"
    assert list(i.queues) == ["default"] and list(i.compute_environments) == ["default"]
    bare = resolve_inventory("slurm", 4, environ={"SLURM_NODELIST": "n1"})
    assert (bare.hosts[0].vcpus, bare.hosts[0].gpus) == (None, None)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "slurm:SLURM_JOB_NODELIST: not set"),
        ({"SLURM_JOB_NODELIST": "n[1-"}, "slurm:SLURM_JOB_NODELIST: '[' is never closed"),
        ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "4"},
         "slurm:SLURM_JOB_CPUS_PER_NODE: \"4\" gives 1 counts for 2 nodes"),
        ({"SLURM_JOB_NODELIST": "n1", "SLURM_JOB_CPUS_PER_NODE": "x"},
         "slurm:SLURM_JOB_CPUS_PER_NODE: 'x' is not a CPU count"),
        ({"SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "many"},
         "slurm:SLURM_GPUS_ON_NODE: \"many\" is not a whole number"),
    ],
)  # fmt: skip
def test_slurm_errors(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SpecError) as e:
        resolve_inventory("slurm", 4, environ=env)
    assert str(e.value).startswith(expected)


def test_pbs(tmp_path: Path) -> None:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn2\n\nn1\nn3.cluster\n")
    i = resolve_inventory("pbs", 4, environ={"PBS_NODEFILE": str(nodefile)})
    assert [(h.name, h.vcpus) for h in i.hosts] == [("n1", 3), ("n2", 1), ("n3.cluster", 1)]
    assert i.source == "pbs"
    with pytest.raises(SpecError, match="^pbs:PBS_NODEFILE: not set"):
        resolve_inventory("pbs", 4, environ={})
    with pytest.raises(SpecError) as e:
        resolve_inventory("pbs", 4, environ={"PBS_NODEFILE": str(tmp_path / "missing")})
    assert str(e.value) == f"{tmp_path / 'missing'}: no such file"


def test_hostfiles(tmp_path: Path) -> None:
    mpich = tmp_path / "hosts.mpich"
    mpich.write_text("# cluster\nn1:4\nn2:2  # comment\n\nn3\nn2:2\n")
    i = resolve_inventory(f"hostfile:{mpich}", 4, environ={})
    assert [(h.name, h.vcpus) for h in i.hosts] == [("n1", 4), ("n2", 4), ("n3", None)]
    assert i.source == f"hostfile:{mpich}"
    ompi = tmp_path / "hosts.ompi"
    ompi.write_text("a slots=8 max_slots=16\nb\n")
    i = resolve_inventory(f"hostfile:{ompi}", 4, environ={})
    assert [(h.name, h.vcpus, h.transport) for h in i.hosts] == [
        ("a", 8, "ssh"),
        ("b", None, "ssh"),
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("n1:x\n", ':1: "n1:x" is not host:N'),
        ("n1\nn2 cpus=4\n", ':2: "cpus=4" is not understood'),
        ("n[1-2]\n", ':1: "n[1-2]" is not a host name'),
        ("n1:0\n", ":1: 0 slots"),
        ("# nothing\n", ": no hosts"),
        ("-evil\n", ':1: "-evil" is not a host name'),
    ],
)
def test_hostfile_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "hf"
    path.write_text(content)
    with pytest.raises(SpecError) as e:
        resolve_inventory(f"hostfile:{path}", 4, environ={})
    assert str(e.value).startswith(f"{path}{expected}")


def test_auto(tmp_path: Path) -> None:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("p1\n")
    path = tmp_path / "inv.toml"
    path.write_text('[[hosts]]\nnames = "f1"\n')
    both = {"SLURM_JOB_NODELIST": "s1", "PBS_NODEFILE": str(nodefile), "MNP_INVENTORY": str(path)}
    assert resolve_inventory("auto", 4, environ=both).hosts[0].name == "s1"
    del both["SLURM_JOB_NODELIST"]
    assert resolve_inventory("auto", 4, environ=both).hosts[0].name == "p1"
    del both["PBS_NODEFILE"]
    assert resolve_inventory("auto", 4, environ=both).hosts[0].name == "f1"
    assert resolve_inventory("auto", 2, environ={"MNP_INVENTORY": "auto"}).source == "local"
    assert len(resolve_inventory("auto", 2, environ={}).hosts) == 2


def test_resolve_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        resolve_inventory("slrum", 4, environ={})
    assert str(e.value) == (
        "slrum: no such file; --inventory takes a TOML file, local, slurm, pbs, hostfile:PATH "
        "or auto"
    )
    with pytest.raises(SpecError, match=r"^<command line>:--inventory: hostfile: needs a path"):
        resolve_inventory("hostfile:", 4, environ={})
