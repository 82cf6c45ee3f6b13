"""Every ready job definition in nodegroups/ validates, and is run by some integration test."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mnp.spec import load_definition, validate_file

ROOT = Path(__file__).resolve().parents[2]
NODEGROUPS = ROOT / "nodegroups"

# nodegroup -> the integration tests that run it (local default first), as file::function
RUN_BY: dict[str, list[str]] = {
    "mpi-hello.toml": [
        "tests/integration/test_run_local.py::test_mpi_hello_runs_on_four_local_nodes",
        "tests/integration/test_mpi.py::test_mpi_across_four_sshd_hosts",
    ],
    "mpi-allreduce.toml": [
        "tests/integration/test_mpi.py::test_mpi_allreduce_on_local_nodes",
        "tests/integration/test_mpi.py::test_mpi_across_four_sshd_hosts",
    ],
    "mpi-pingpong.toml": [
        "tests/integration/test_mpi.py::test_mpi_pingpong_on_local_nodes",
        "tests/integration/test_mpi.py::test_mpi_across_four_sshd_hosts",
    ],
    "torch-ddp.toml": [
        "tests/integration/test_torch.py::test_ddp_on_four_local_nodes",
        "tests/integration/test_torch.py::test_ddp_on_four_sshd_hosts",
    ],
    "container-hello.toml": [
        "tests/integration/test_containers.py::test_container_hello_on_four_local_nodes",
        "tests/integration/test_containers.py::test_container_hello_across_sshd_hosts",
    ],
    "pmi-hello.toml": [
        "tests/integration/test_mpi_direct.py::test_nodegroups_hello_and_allreduce_on_local_nodes",
        "tests/integration/test_mpi_direct.py::test_nodegroups_across_sshd_hosts",
    ],
    "pmi-allreduce.toml": [
        "tests/integration/test_mpi_direct.py::test_nodegroups_hello_and_allreduce_on_local_nodes",
        "tests/integration/test_mpi_direct.py::test_nodegroups_across_sshd_hosts",
    ],
    "pmi-mpmd.toml": [
        "tests/integration/test_mpi_direct.py::test_mpmd_two_groups_on_local_nodes",
        "tests/integration/test_mpi_direct.py::test_nodegroups_across_sshd_hosts",
    ],
    "hetero.toml": [
        "tests/integration/test_mpi.py::test_heterogeneous_job_on_local_nodes",
        "tests/integration/test_mpi.py::test_heterogeneous_job_across_sshd_hosts",
    ],
}

FILES = sorted(p.name for p in NODEGROUPS.glob("*.toml"))


@pytest.mark.parametrize("name", FILES)
def test_nodegroup_validates(name: str) -> None:
    line = validate_file(NODEGROUPS / name)
    assert line.startswith(f"{NODEGROUPS / name}: ok (")


def test_mnp_validate_accepts_every_nodegroup() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mnp", "validate", *(f"nodegroups/{n}" for n in FILES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == len(FILES)


@pytest.mark.parametrize("name", FILES)
def test_nodegroup_programs_exist(name: str) -> None:
    """Every examples/ path a command names is in the repository."""
    defn = load_definition(NODEGROUPS / name)
    groups = defn.multinode.groups if defn.multinode is not None else ()
    commands = [defn.command, *(g.command for g in groups)]
    paths = {a for c in commands if c for a in c if a.startswith("examples/")}
    assert paths, f"{name} runs nothing from examples/"
    for p in paths:
        assert (ROOT / p).is_file(), p


def test_every_nodegroup_is_run_by_an_integration_test() -> None:
    assert sorted(RUN_BY) == FILES, "add the new nodegroup to RUN_BY with the tests that run it"
    for name, tests in RUN_BY.items():
        assert tests, name
        assert tests[0].split("::")[1].endswith("local_nodes"), f"{name}: run it locally first"
        for ref in tests:
            file, func = ref.split("::")
            source = (ROOT / file).read_text()
            tree = ast.parse(source)
            (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func]
            # the nodegroup is named in the test itself or in its parameters
            body = ast.get_source_segment(source, fn) or ""
            decorated = "".join(ast.get_source_segment(source, d) or "" for d in fn.decorator_list)
            stem = name.removesuffix(".toml")
            assert stem in body + decorated, f"{ref} does not run {name}"
