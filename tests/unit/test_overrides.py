"""The submit/run overrides are one table (mnp.overrides.OVERRIDES): the CLI's options
are generated from it and mnp.spec applies it."""

from __future__ import annotations

import pytest

from mnp.cli import run, submit
from mnp.overrides import OVERRIDES
from mnp.spec import apply_overrides, definition_from_command

EDITS = {"set", "every", "array", "append", "merge", "env", "nodes", "container", ""}


def test_table_is_well_formed() -> None:
    assert len({o.name for o in OVERRIDES}) == len({o.flag for o in OVERRIDES}) == len(OVERRIDES)
    for o in OVERRIDES:
        assert o.edit in EDITS, o
        assert o.value in {"whole", "number", "text"}, o
        assert o.flag.startswith("--") and o.help, o
        assert bool(o.path) == (o.edit not in {"env", "nodes", ""}), o
    assert [o.name for o in OVERRIDES if o.edit == "nodes"] == ["nodes"]


@pytest.mark.parametrize("command", [run, submit])
def test_cli_options_come_from_the_table(command: object) -> None:
    params = {p.name: p for p in command.params}  # type: ignore[attr-defined]
    for o in OVERRIDES:
        p = params[o.name]
        assert p.opts == [o.flag]
        assert p.help == o.help
        assert p.multiple == o.multiple and p.is_flag == o.is_flag


def test_unknown_override_lists_every_one() -> None:
    with pytest.raises(TypeError, match=r"unknown override nodez; the overrides are: name, "):
        definition_from_command(["true"], nodez=2)
    with pytest.raises(TypeError, match="python_env"):
        apply_overrides(definition_from_command(["true"]), bogus=1)


def test_every_override_applies() -> None:
    defn = definition_from_command(
        ["echo", "Ref::x"],
        name="n",
        queue="q",
        params={"x": "1"},
        env={"A": "b"},
        array_size=3,
        array_parallelism="2",
        sequential=True,
        nodes=None,
        vcpus="1.5",
        memory="1GiB",
        gpus=0,
        attempts="2",
        timeout="90s",
        cwd="/tmp",
        python_env="none",
        tags={"team": "x"},
    )
    assert defn.tags == {"team": "x"}
    assert (defn.name, defn.queue, defn.parameters["x"], defn.environment["A"]) == (
        "n",
        "q",
        "1",
        "b",
    )
    assert defn.array is not None and (defn.array.size, defn.array.parallelism) == (3, 2)
    assert defn.array.sequential and defn.retry.attempts == 2
    assert defn.resources.vcpus == 1.5 and defn.resources.gpus == 0
    assert defn.timeout.attempt_duration == 90 and defn.cwd == "/tmp"
    multi = apply_overrides(
        definition_from_command(["true"]), nodes="3", tasks_per_node=2, env={"A": "c"}
    )
    assert multi.multinode is not None and multi.multinode.num_nodes == 3
    assert all(g.tasks_per_node == 2 for g in multi.multinode.groups)
