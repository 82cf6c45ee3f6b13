"""The srun transport's command line and when ``--inventory slurm`` chooses it (pure)."""

from __future__ import annotations

import pytest

from mnp.errors import SpecError, TransportError
from mnp.model import HostSpec
from mnp.spec import resolve_inventory
from mnp.transport import srun
from mnp.transport.bootstrap import bootstrap

NODES = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "8(x2)"}


def test_argv_is_one_overlapping_step_on_the_node() -> None:
    host = HostSpec(name="n2", address="n2", vcpus=8, transport="srun")
    argv = srun.srun_argv("/usr/bin/srun", "42", host, "/venv/bin/python", ["--ctl", "T"])
    assert argv[0] == "/usr/bin/srun"
    opts = argv[1 : argv.index("/venv/bin/python")]
    for opt in ("--jobid=42", "--nodelist=n2", "--nodes=1", "--ntasks=1", "--overlap",
                "--cpu-bind=none", "--cpus-per-task=8", "--quiet"):  # fmt: skip
        assert opt in opts
    assert argv[argv.index("/venv/bin/python") :] == [
        "/venv/bin/python", "-c", bootstrap(), "--parent-death", "--ctl", "T",
    ]  # fmt: skip
    auto = srun.srun_argv("srun", "42", HostSpec(name="n1", address="n1"), "py", [])
    assert not any(a.startswith("--cpus-per-task") for a in auto)


@pytest.mark.parametrize(
    ("extra", "transport"),
    [
        ({}, "ssh"),  # the nodelist alone: not inside the allocation
        ({"SLURM_JOB_ID": "7"}, "srun"),
        ({"SLURM_JOBID": "7"}, "srun"),
        ({"SLURM_JOB_ID": "7", "MNP_SLURM_TRANSPORT": "ssh"}, "ssh"),
        ({"SLURM_JOB_ID": "7", "MNP_SLURM_TRANSPORT": "srun"}, "srun"),
    ],
)
def test_slurm_inventory_transport(extra: dict[str, str], transport: str) -> None:
    inv = resolve_inventory("slurm", 4, environ={**NODES, **extra})
    assert [h.transport for h in inv.hosts] == [transport, transport]
    assert [h.vcpus for h in inv.hosts] == [8, 8]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"MNP_SLURM_TRANSPORT": "rsh"}, "slurm:MNP_SLURM_TRANSPORT: \"rsh\" is not allowed"),
        ({"MNP_SLURM_TRANSPORT": "srun"}, "slurm:MNP_SLURM_TRANSPORT: srun needs"),
    ],
)  # fmt: skip
def test_slurm_transport_errors(extra: dict[str, str], expected: str) -> None:
    with pytest.raises(SpecError) as e:
        resolve_inventory("slurm", 4, environ={**NODES, **extra})
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_make_needs_an_allocation() -> None:
    inv = resolve_inventory("slurm", 4, environ={**NODES, "SLURM_JOB_ID": "7"})
    t = srun.make(inv, environ={"SLURM_JOB_ID": "7", "MNP_SRUN_PYTHON": "/p/python3"})
    assert (t.job_id, t.python, t.name) == ("7", "/p/python3", "srun")
    with pytest.raises(TransportError, match="needs a Slurm allocation"):
        srun.make(inv, environ={})


def test_inventory_file_accepts_srun(tmp_path: object) -> None:
    from mnp.spec.inventory import parse_inventory

    inv = parse_inventory({"hosts": [{"names": "n[1-2]", "transport": "srun"}]}, "inv.toml")
    assert [h.transport for h in inv.hosts] == ["srun", "srun"]


def test_agent_of_a_managed_allocation_sees_the_whole_allocation() -> None:
    """Started from outside (a managed environment's allocation), the step would see only
    its own node; ``env`` inside the step gives the agent and its tasks the allocation."""
    job_env = srun.allocation_vars(["n3", "n4"])
    assert job_env == {
        "SLURM_JOB_NODELIST": "n[3-4]",
        "SLURM_NODELIST": "n[3-4]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
    }
    n3 = HostSpec(name="n3", address="n3")
    argv = srun.srun_argv("srun", "77", n3, "/py", ["--ctl", "t"], job_env)
    at = argv.index("env")
    assert argv[at + 1 : at + 5] == [
        "SLURM_JOB_NODELIST=n[3-4]",
        "SLURM_JOB_NUM_NODES=2",
        "SLURM_NNODES=2",
        "SLURM_NODELIST=n[3-4]",
    ]
    assert argv[at + 5] == "/py" and argv[0] == "srun" and "--jobid=77" in argv
    assert "env" not in srun.srun_argv("srun", "77", n3, "/py", [])
