"""Rank numbering, MPMD application numbers and PMI environment of a direct MPI launch."""

from __future__ import annotations

import pytest

from mnp.model import NodeGroup
from mnp.pmi.layout import Rank, job_attributes, layout, rank_env


def g(start: int, end: int, tasks: int) -> NodeGroup:
    return NodeGroup(start, end, command=("a.out",), tasks_per_node=tasks)


@pytest.mark.parametrize(
    ("groups", "placed", "mapping"),
    [
        # one node, one rank
        ([g(0, 0, 1)], [(0, 0, 0)], "(vector,(0,1,1))"),
        # 2 nodes x 2 ranks: contiguous on each node, in node order
        ([g(0, 1, 2)], [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)], "(vector,(0,2,2))"),
        # MPMD: two groups, different tasks_per_node, appnum by node order
        (
            [g(0, 0, 2), g(1, 2, 1)],
            [(0, 0, 0), (0, 1, 0), (1, 0, 1), (2, 0, 1)],
            "(vector,(0,1,2),(1,2,1))",
        ),
        # given out of node order: still numbered in node order
        ([g(2, 2, 1), g(0, 1, 1)], [(0, 0, 0), (1, 0, 0), (2, 0, 1)], "(vector,(0,3,1))"),
        # a node without ranks in between (a group that is not MPI): no hole in node ids
        (
            [g(0, 0, 1), g(2, 3, 3)],
            [(0, 0, 0)] + [(n, t, 1) for n in (2, 3) for t in range(3)],
            "(vector,(0,1,1),(1,2,3))",
        ),
    ],
)
def test_ranks_are_numbered_in_node_order(
    groups: list[NodeGroup], placed: list[tuple[int, int, int]], mapping: str
) -> None:
    lay = layout(groups)
    assert lay.ranks == tuple(Rank(i, n, t, a) for i, (n, t, a) in enumerate(placed))
    assert lay.size == len(placed)
    assert lay.process_mapping() == mapping
    assert job_attributes(lay) == {"PMI_process_mapping": mapping, "universeSize": str(len(placed))}


@pytest.mark.parametrize(
    ("groups", "error"),
    [
        ([g(0, 1, 1), g(1, 2, 1)], "overlap"),
        ([g(0, 0, 0)], "tasks_per_node must be at least 1"),
        ([g(2, 1, 1)], "empty or negative"),
    ],
)
def test_impossible_layouts_are_refused(groups: list[NodeGroup], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        layout(groups)


def test_rank_env_with_an_inherited_fd_or_a_port() -> None:
    lay = layout([g(0, 1, 2)])
    assert rank_env(lay, 3, fd=5) == {
        "PMI_RANK": "3",
        "PMI_SIZE": "4",
        "PMI_FD": "5",
        "MPI_LOCALNRANKS": "2",
        "MPI_LOCALRANKID": "1",
    }
    assert rank_env(lay, 2, port="10.0.0.7:4567") == {
        "PMI_RANK": "2",
        "PMI_SIZE": "4",
        "PMI_PORT": "10.0.0.7:4567",
        "PMI_ID": "2",
        "MPI_LOCALNRANKS": "2",
        "MPI_LOCALRANKID": "0",
    }
    with pytest.raises(ValueError):
        rank_env(lay, 0)
    with pytest.raises(ValueError):
        rank_env(lay, 0, fd=3, port="h:1")


def test_nodes_and_ranks_on_a_node() -> None:
    lay = layout([g(0, 0, 2), g(3, 4, 1)])
    assert lay.nodes == (0, 3, 4)
    assert [r.rank for r in lay.on_node(0)] == [0, 1]
    assert [r.rank for r in lay.on_node(4)] == [3]
    assert lay.on_node(1) == ()
    assert [lay.node_id(n) for n in lay.nodes] == [0, 1, 2]
