"""The direct MPI launch's definition field (``mpi``, ``--mpi``) and the controller's
world of an attempt (``mnp.pmi.world``): what a rank's spawn carries, and how a
barrier's puts go back to every host."""

from __future__ import annotations

import pytest

from mnp.errors import SpecError
from mnp.pmi.world import INIT_WITHIN, init_within, plan
from mnp.spec import apply_overrides, definition_from_command, parse_definition

MPMD = {
    "mpi": "pmi",
    "multinode": {
        "num_nodes": 4,
        "groups": [
            {"target_nodes": "0", "command": ["a"], "tasks_per_node": 2},
            {"target_nodes": "1", "command": ["b"], "mpi": "none"},
            {"target_nodes": "2:", "command": ["c"]},
        ],
    },
}


def test_mpi_field_defaults_to_groups_and_round_trips() -> None:
    d = parse_definition(MPMD, "x.toml")
    assert d.mpi == "pmi" and d.multinode is not None
    assert [g.mpi for g in d.multinode.groups] == ["pmi", "none", "pmi"]
    again = apply_overrides(d)  # through definition_to_dict and back
    assert again.multinode == d.multinode and again.mpi == "pmi"


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        (
            {"command": ["x"], "mpi": "pmix", "multinode": {"num_nodes": 2}},
            "mpi",
            "PMIx (Open MPI) is not supported",
        ),
        ({"command": ["x"], "mpi": "ompi", "multinode": {"num_nodes": 2}}, "mpi", '"none", "pmi"'),
        ({"command": ["x"], "mpi": "pmi"}, "mpi", "needs a multinode job"),
        (
            {
                "multinode": {
                    "num_nodes": 2,
                    "groups": [{"target_nodes": ":", "command": ["x"], "mpi": "PMIx"}],
                }
            },
            "multinode.groups[0].mpi",
            "PMIx (Open MPI) is not supported",
        ),
    ],
)
def test_bad_mpi_values_are_refused(data: dict[str, object], field: str, says: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_definition(data, "x.toml")
    text = str(e.value)
    assert text.startswith(f"x.toml:{field}: ") and says in text and "\n" not in text


def test_mpi_override_sets_every_group_and_blames_the_flag() -> None:
    d = apply_overrides(definition_from_command(["hello"]), nodes=3, tasks_per_node=2, mpi="pmi")
    assert d.multinode is not None and all(g.mpi == "pmi" for g in d.multinode.groups)
    with pytest.raises(SpecError, match=r"^<command line>:--mpi: .*PMIx \(Open MPI\) is not"):
        apply_overrides(definition_from_command(["hello"]), nodes=2, mpi="pmix")


def test_plan_numbers_the_mpi_groups_and_names_each_launch() -> None:
    d = parse_definition(MPMD, "x.toml")
    hosts = ["h0", "h1", "h0", "h2"]
    world = plan(d, "42", 1, hosts, 5.0)
    assert world is not None
    # node 1 (mpi = "none") runs no rank; nodes 0, 2, 3 do: ranks 0-1, 2, 3
    assert [(r.rank, r.node, r.local, r.appnum) for r in world.lay.ranks] == [
        (0, 0, 0, 0),
        (1, 0, 1, 0),
        (2, 2, 0, 1),
        (3, 3, 0, 1),
    ]
    assert world.hosts == {0: "h0", 2: "h0", 3: "h2"}
    assert world.rank_of(0, 1) == 1 and world.rank_of(1, 0) is None
    assert world.kvsname.startswith("mnp-42-1-")
    assert plan(d, "42", 1, hosts).kvsname != world.kvsname  # type: ignore[union-attr]
    part = world.rank_part(2)
    assert part == {
        "kvsname": world.kvsname,
        "node": 2,
        "node_id": 1,
        "rank": 2,
        "size": 4,
        "appnums": {"2": 1},
        "attrs": {"PMI_process_mapping": "(vector,(0,1,2),(1,2,1))", "universeSize": "4"},
        "init_within": 5.0,
    }
    env = world.rank_env(1)
    assert env == {
        "PMI_RANK": "1",
        "PMI_SIZE": "4",
        "MPI_LOCALNRANKS": "2",
        "MPI_LOCALRANKID": "1",
        "MNP_MPI_KVSNAME": world.kvsname,
    }
    assert (
        plan(
            parse_definition({"command": ["x"], "multinode": {"num_nodes": 2}}, "x"),
            "1",
            1,
            ["a", "b"],
        )
        is None
    )


def test_barrier_releases_once_per_host_when_every_node_arrived() -> None:
    d = parse_definition(MPMD, "x.toml")
    world = plan(d, "7", 2, ["h0", "h1", "h0", "h2"])
    assert world is not None
    assert world.barrier(0, 0, {"a": "1"}) is None
    assert world.barrier(3, 0, {"c": "3"}) is None
    out = world.barrier(2, 0, {"b": "2"})
    assert isinstance(out, list)
    kvs = {"a": "1", "b": "2", "c": "3"}
    assert out == [
        {
            "host": "h0",
            "op": "pmi_release",
            "kvsname": world.kvsname,
            "nodes": [0, 2],
            "epoch": 0,
            "kvs": kvs,
        },
        {
            "host": "h2",
            "op": "pmi_release",
            "kvsname": world.kvsname,
            "nodes": [3],
            "epoch": 0,
            "kvs": kvs,
        },
    ]
    why = world.barrier(1, 1, {})
    assert isinstance(why, str) and why.startswith("MPI barrier failed: node 1 runs no rank")


def test_init_bound_from_the_environment() -> None:
    assert init_within({}) == INIT_WITHIN == 60.0
    assert init_within({"MNP_PMI_INIT_TIMEOUT": "2.5"}) == 2.5
    assert init_within({"MNP_PMI_INIT_TIMEOUT": "soon"}) == INIT_WITHIN
    assert init_within({"MNP_PMI_INIT_TIMEOUT": "-1"}) == INIT_WITHIN
