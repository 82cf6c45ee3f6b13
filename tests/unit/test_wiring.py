"""The task environment (SPEC §5) against golden files.

Regenerate after an intended change with ``MNP_UPDATE_GOLDEN=1 pytest tests/unit/test_wiring.py``
and review the diff: these files are the contract tasks rely on.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from mnp.model import (
    ArrayProperties,
    JobDefinition,
    JobType,
    MultiNodeProperties,
    NodeGroup,
    Resources,
)
from mnp.wiring import (
    Launch,
    NodePlacement,
    hostfile_mpich,
    hostfile_ompi,
    node_command,
    substitute,
    task_environment,
    task_id,
)

GOLDEN = Path(__file__).parent.parent / "golden"


def check_golden(name: str, value: object) -> None:
    path = GOLDEN / name
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    if os.environ.get("MNP_UPDATE_GOLDEN"):
        path.write_text(text)
    assert json.loads(path.read_text()) == json.loads(text), f"{name} differs from golden"


MN = JobDefinition(
    name="hetero",
    type=JobType.MULTINODE,
    command=("python3", "main.py", "--size", "Ref::size"),
    parameters={"size": "10 $HOME"},
    environment={"OMP_NUM_THREADS": "1"},
    aws_batch_env=True,
    multinode=MultiNodeProperties(
        num_nodes=3,
        main_node=0,
        groups=(
            NodeGroup(0, 0, command=None, resources=Resources(vcpus=1)),
            NodeGroup(
                1,
                2,
                command=("python3", "worker.py", "Ref::size"),
                tasks_per_node=2,
                resources=Resources(vcpus=2, gpus=2),
                environment={"ROLE": "worker"},
                gpu_bind="per-task",
            ),
        ),
    ),
)

PLACEMENT = (
    NodePlacement(0, "node01", "10.0.0.1", 1, 0),
    NodePlacement(1, "node02", "10.0.0.2", 2, 1, gpus=(2, 3), host_has_gpus=True),
    NodePlacement(2, "node03", "10.0.0.3", 2, 1, gpus=(0, 1), host_has_gpus=True),
)

LAUNCH = Launch(
    job_id="42",
    job_name="hetero",
    attempt=2,
    queue="default",
    ce="gpu",
    nodes=PLACEMENT,
    main_node=0,
    master_port=29511,
    hostfile="/tmp/run/42.2/hostfile",
    hostfile_ompi="/tmp/run/42.2/hostfile.ompi",
)


def test_multinode_environment_golden() -> None:
    assert MN.multinode is not None
    envs = {}
    for node in PLACEMENT:
        for t in range(node.slots):
            envs[task_id(LAUNCH, node.index, t, node.slots)] = task_environment(
                MN, LAUNCH, node.index, t
            )
    check_golden("multinode_env.json", envs)


def test_torch_ranks_are_dense_and_unique() -> None:
    ranks = []
    for node in PLACEMENT:
        for t in range(node.slots):
            env = task_environment(MN, LAUNCH, node.index, t)
            ranks.append(int(env["RANK"]))
            assert env["WORLD_SIZE"] == "5"
            assert env["LOCAL_WORLD_SIZE"] == str(node.slots)
            assert env["MASTER_ADDR"] == "10.0.0.1"
    assert ranks == list(range(5))


def test_per_task_gpu_binding_splits_the_node_gpus() -> None:
    a = task_environment(MN, LAUNCH, 1, 0)["CUDA_VISIBLE_DEVICES"]
    b = task_environment(MN, LAUNCH, 1, 1)["CUDA_VISIBLE_DEVICES"]
    assert (a, b) == ("2", "3")


def test_main_address_only_on_children_as_aws_does() -> None:
    main = task_environment(MN, LAUNCH, 0, 0)
    child = task_environment(MN, LAUNCH, 2, 1)
    assert "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS" not in main
    assert child["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"] == "10.0.0.1"


def test_hostfiles_golden() -> None:
    check_golden(
        "hostfiles.json", {"mpich": hostfile_mpich(PLACEMENT), "ompi": hostfile_ompi(PLACEMENT)}
    )


def test_parameters_are_protected_from_node_side_expansion() -> None:
    assert substitute(["--size", "Ref::size", "$HOME"], {"size": "10 $HOME"}) == [
        "--size",
        "10 $$HOME",
        "$HOME",
    ]


def test_main_group_without_command_falls_back_to_the_job_command() -> None:
    assert MN.multinode is not None
    main = node_command(MN, MN.multinode.groups[0], 0)
    assert main == ["python3", "main.py", "--size", "10 $$HOME"]
    worker = node_command(MN, MN.multinode.groups[1], 1)
    assert worker == ["python3", "worker.py", "10 $$HOME"]


def test_held_child_group_runs_nothing() -> None:
    defn = JobDefinition(
        name="mpi",
        type=JobType.MULTINODE,
        multinode=MultiNodeProperties(
            num_nodes=2,
            groups=(NodeGroup(0, 0, command=("mpiexec",)), NodeGroup(1, 1)),
        ),
    )
    assert defn.multinode is not None
    assert node_command(defn, defn.multinode.groups[1], 1) is None


@pytest.mark.parametrize(
    ("gpus", "has", "expected"),
    [((), True, ""), ((1,), True, "1"), ((), False, None)],
)
def test_array_child_gpu_visibility(gpus: tuple[int, ...], has: bool, expected: str | None) -> None:
    defn = JobDefinition(name="a", command=("true",), array=ArrayProperties(size=3))
    launch = Launch(
        job_id="7:1",
        job_name="a",
        attempt=1,
        queue="q",
        ce="c",
        array_index=1,
        array_size=3,
        host="h",
        gpus=gpus,
        host_has_gpus=has,
    )
    env = task_environment(defn, launch)
    assert env["MNP_JOB_ID"] == "7:1"
    assert env["MNP_ARRAY_INDEX"] == "1" and env["MNP_ARRAY_SIZE"] == "3"
    assert env.get("CUDA_VISIBLE_DEVICES") == expected


def test_main_ipv4_is_the_resolved_address_and_main_addr_stays_as_written() -> None:
    named = tuple(replace(p, address=f"node0{p.index + 1}") for p in PLACEMENT)
    launch = replace(LAUNCH, nodes=named, main_ipv4="10.9.8.7")
    child = task_environment(MN, launch, 1, 0)
    assert child["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"] == "10.9.8.7"
    assert child["MNP_MAIN_NODE_ADDR"] == child["MASTER_ADDR"] == "node01"
    assert "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS" not in task_environment(MN, launch, 0)
    # not resolved (the controller could not): the address as written
    unresolved = task_environment(MN, replace(launch, main_ipv4=None), 1, 0)
    assert unresolved["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"] == "node01"
