"""GPU wiring end to end on hosts that declare GPUs (``gpus = N``): the allocator's
indices reach ``CUDA_VISIBLE_DEVICES``, per node or per task, without any GPU."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import mnp

INVENTORY = """\
[[hosts]]
names = "g[1-2]"
transport = "local"
vcpus = 8
gpus = 4
"""

PRINT = "echo [${CUDA_VISIBLE_DEVICES-unset}] ${CUDA_DEVICE_ORDER-unset}"


def test_per_task_binding_splits_each_nodes_gpus(tmp_path: Path) -> None:
    inv = tmp_path / "gpu.toml"
    inv.write_text(INVENTORY)
    job = tmp_path / "job.toml"
    job.write_text(
        f"""\
name = "gpus"
[resources]
gpus = 4
[multinode]
num_nodes = 2
[[multinode.groups]]
target_nodes = ":"
tasks_per_node = 2
gpu_bind = "per-task"
command = ["sh", "-c", "{PRINT}; test $MNP_NODE_INDEX$LOCAL_RANK != 00 || sleep 1"]
"""
    )
    r = mnp("run", "--inventory", str(inv), str(job))
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [
        "0.0: [0,1] PCI_BUS_ID",
        "0.1: [2,3] PCI_BUS_ID",
        "1.0: [0,1] PCI_BUS_ID",
        "1.1: [2,3] PCI_BUS_ID",
    ]


def test_array_children_get_distinct_gpus_and_zero_means_none(tmp_path: Path) -> None:
    inv = tmp_path / "gpu.toml"
    inv.write_text(INVENTORY.replace('names = "g[1-2]"', 'names = "g1"'))
    r = mnp(
        "run",
        "--inventory",
        str(inv),
        "--gpus",
        "1",
        "--array-size",
        "4",
        "--",
        "sh",
        "-c",
        f"{PRINT}; sleep 0.5",
    )
    assert r.returncode == 0, r.stderr
    gpus = sorted(line.split()[1] for line in r.stdout.splitlines())
    assert gpus == ["[0]", "[1]", "[2]", "[3]"]
    r = mnp("run", "--inventory", str(inv), "--", "sh", "-c", PRINT)
    assert r.stdout == "[] PCI_BUS_ID\n"  # asked for none on a GPU host: CUDA_VISIBLE_DEVICES=""
