"""Direct MPI launch against real MPICH (the ``mpich`` wheel): no mpiexec anywhere.

Ranks run on fake nodes (one ``AsyncNode`` PMI server each, reached through
``PMI_FD``) and an in-process ``Exchange`` plays the controller; see
``tests/pmi_harness.py``.
"""

from __future__ import annotations

import os
import re

import pytest

from mnp.model import NodeGroup
from tests.pmi_harness import launch, python

pytestmark = pytest.mark.mpi

HELLO = re.compile(r"Hello, World! I am process (\d+) of (\d+) on ")

# prints rank, size, appnum, and the sum of all ranks (an allreduce across the world)
APPNUM = (
    "from mpi4py import MPI; w = MPI.COMM_WORLD; "
    "s = w.allreduce(w.Get_rank()); "
    "print(sys.argv[1], w.Get_rank(), w.Get_size(), w.Get_attr(MPI.APPNUM), s)"
)


def still_there(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.exists(p)]


def ranks_said_hello(output: dict[int, str], size: int) -> None:
    assert sorted(output) == list(range(size))
    for rank, text in output.items():
        m = HELLO.search(text)
        assert m is not None, (rank, text)
        assert (int(m[1]), int(m[2])) == (rank, size)


@pytest.mark.parametrize(
    ("nodes", "per_node", "via"),
    [(1, 4, "fd"), (2, 2, "fd"), (4, 2, "fd"), (2, 2, "port")],
)
async def test_helloworld(nodes: int, per_node: int, via: str) -> None:
    world = await launch(
        [NodeGroup(0, nodes - 1, tasks_per_node=per_node)],
        [python("-m", "mpi4py.bench", "helloworld")],
        via=via,
    )
    size = nodes * per_node
    ranks_said_hello(world.output, size)
    assert world.returncodes == {r: 0 for r in range(size)}
    assert world.aborts == world.lost == []
    assert world.barriers >= 1
    # across nodes every rank's address went round; on one node MPICH uses shared memory only
    assert world.exchanged_keys >= size if nodes > 1 else world.exchanged_keys == 0
    assert world.leftovers == []  # MPI_Finalize removed its shared memory


async def test_pingpong_between_two_nodes() -> None:
    world = await launch(
        [NodeGroup(0, 1, tasks_per_node=1)],
        [python("-m", "mpi4py.bench", "pingpong", "-m", "1", "-n", "4096", "-l", "10")],
    )
    assert world.returncodes == {0: 0, 1: 0}
    lines = world.output[0].splitlines()
    assert lines[0] == "# MPI PingPong Test", world.output
    sizes = [int(line.split()[0]) for line in lines if not line.startswith("#")]
    assert sizes == [2**i for i in range(13)]  # 1 B .. 4 KiB, each measured


async def test_ringtest_completes_across_nodes() -> None:
    world = await launch(
        [NodeGroup(0, 1, tasks_per_node=2)],
        [python("-m", "mpi4py.bench", "ringtest", "-n", "64", "-l", "5")],
    )
    assert world.returncodes == {r: 0 for r in range(4)}
    assert re.match(r"time for 5 loops = \S+ seconds \(4 processes, 64 bytes\)", world.output[0]), (
        world.output
    )
    assert all(world.output[r] == "" for r in (1, 2, 3))


async def test_mpmd_two_groups_form_one_world() -> None:
    groups = [NodeGroup(0, 0, tasks_per_node=2), NodeGroup(1, 2, tasks_per_node=1)]
    world = await launch(
        groups,
        [
            python("-c", "import sys; " + APPNUM, "first"),
            python("-c", "import sys; " + APPNUM, "second"),
        ],
    )
    assert world.returncodes == {r: 0 for r in range(4)}
    said = {r: world.output[r].split() for r in range(4)}
    assert said == {
        0: ["first", "0", "4", "0", "6"],
        1: ["first", "1", "4", "0", "6"],
        2: ["second", "2", "4", "1", "6"],
        3: ["second", "3", "4", "1", "6"],
    }


async def test_abort_reports_rank_and_code_and_ends_the_others() -> None:
    abort_rank_2 = (
        "from mpi4py import MPI; import time; w = MPI.COMM_WORLD\n"
        "if w.Get_rank() == 2: w.Abort(7)\n"
        "time.sleep(60)"
    )
    world = await launch(
        [NodeGroup(0, 1, tasks_per_node=2)], [python("-c", abort_rank_2)], within=30
    )
    assert [(rank, code) for rank, code, _ in world.aborts] == [(2, 7)]
    assert sorted(world.returncodes) == [0, 1, 2, 3]
    # nobody slept out the minute: the others were killed, none exited cleanly
    assert all(rc != 0 for rc in world.returncodes.values()), world.returncodes
    # killed ranks leave MPICH's shared memory under the names shm_leftovers says
    assert any("/mpich_shm_" in path for path in world.leftovers), world.leftovers
    assert still_there(world.leftovers) == []


async def test_a_rank_that_exits_before_init_is_reported() -> None:
    groups = [NodeGroup(0, 0, tasks_per_node=1), NodeGroup(1, 1, tasks_per_node=1)]
    world = await launch(
        groups,
        [
            python("-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"),
            python("-c", "raise SystemExit(3)"),
        ],
        within=30,
    )
    assert world.lost[0] == (1, "before init")
    assert world.returncodes[1] == 3
    assert world.returncodes[0] != 0  # killed while waiting in MPI_Init for rank 1


async def test_a_rank_that_dies_after_init_is_reported() -> None:
    die_rank_1 = (
        "from mpi4py import MPI; import os, time; w = MPI.COMM_WORLD\n"
        "if w.Get_rank() == 1: os._exit(9)\n"
        "time.sleep(60)"
    )
    world = await launch([NodeGroup(0, 1, tasks_per_node=1)], [python("-c", die_rank_1)], within=30)
    assert world.lost[0] == (1, "after init, before finalize")
    assert world.returncodes[1] == 9
