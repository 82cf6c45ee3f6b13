"""Nodesets, node ranges and Slurm CPU lists."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mnp.spec.nodeset import (
    MAX_NAMES,
    expand_nodeset,
    expand_slurm_cpus,
    fold_nodeset,
    parse_node_range,
)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[08-10]", ["node08", "node09", "node10"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[01-03,20]", ["node01", "node02", "node03", "node20"]),
        ("a[1-2],b7", ["a1", "a2", "b7"]),
        ("a[1-2], b7", ["a1", "a2", "b7"]),
        ("gpu-[1-2]-[0-1]", ["gpu-1-0", "gpu-1-1", "gpu-2-0", "gpu-2-1"]),
        ("gpu-a[01-03],gpu-b07", ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-b07"]),
        ("n[1-7/3]", ["n1", "n4", "n7"]),
        ("[1-2]x", ["1x", "2x"]),
        ("host.example.com", ["host.example.com"]),
        ("n[1,1]", ["n1", "n1"]),
    ],
)
def test_expand(text: str, names: list[str]) -> None:
    assert expand_nodeset(text) == names


def test_expand_sixteen_plus_one() -> None:
    names = expand_nodeset("node[01-16,20]")
    assert len(names) == 17 and names[0] == "node01" and names[-1] == "node20"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty nodeset"),
        ("node[", "never closed"),
        ("node]", "without '['"),
        ("n[[1]]", "nested"),
        ("a,,b", "empty name"),
        ("a,", "empty name"),
        ("n[]", "empty brackets"),
        ("n[3-1]", "backwards"),
        ("n[a-b]", "bad range"),
        ("n[1-]", "bad range"),
        ("n[1-4/0]", "step 0"),
        ("node 1", "not allowed in a node name"),
        ("n@1", "not allowed"),
        ("n[0-9999999]", f"more than {MAX_NAMES}"),
        ("a[0-999]b[0-999]c[0-9]", f"more than {MAX_NAMES}"),
    ],
)
def test_expand_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        expand_nodeset(text)


@pytest.mark.parametrize(
    ("names", "folded"),
    [
        (["node01", "node02", "node03"], "node[01-03]"),
        (["node08", "node09", "node10"], "node[08-10]"),
        (["n1", "n2", "n3", "n7"], "n[1-3,7]"),
        (["n7", "n1", "n2"], "n[1-2,7]"),
        (["a1", "a2", "b7"], "a[1-2],b7"),
        (["x"], "x"),
        (["node", "node1"], "node,node1"),
        ([], ""),
    ],
)
def test_fold(names: list[str], folded: str) -> None:
    assert fold_nodeset(names) == folded


_name = st.from_regex(r"[a-z]{1,3}(-?[0-9]{1,3})?", fullmatch=True)


@given(st.lists(_name, min_size=1, max_size=30))
def test_fold_then_expand_keeps_the_names(names: list[str]) -> None:
    assert sorted(set(expand_nodeset(fold_nodeset(names)))) == sorted(set(names))


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("0", 4, (0, 0)),
        ("1:3", 4, (1, 3)),
        ("4:", 8, (4, 7)),
        (":", 4, (0, 3)),
        (":3", 8, (0, 3)),
        (" 2 ", 4, (2, 2)),
        ("0:0", 1, (0, 0)),
    ],
)
def test_node_range(text: str, n: int, expected: tuple[int, int]) -> None:
    assert parse_node_range(text, n) == expected


@pytest.mark.parametrize(
    ("text", "n", "message"),
    [
        ("4", 4, "node 4 is out of range; this job has nodes 0..3"),
        ("2:9", 4, "node 9 is out of range"),
        ("3:1", 4, "backwards"),
        ("", 4, "empty node range"),
        ("-1", 4, "not a node range"),
        ("a:b", 4, "not a node range"),
        ("1:2:3", 4, "not a node range"),
        ("9" * 50, 4, "not a node range"),
        ("٣", 4, "not a node range"),
    ],
)
def test_node_range_refuses(text: str, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_node_range(text, n)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("2(x3),1", [2, 2, 2, 1]),
        ("36(x2),72,8", [36, 36, 72, 8]),
        ("4", [4]),
    ],
)
def test_slurm_cpus(text: str, cpus: list[int]) -> None:
    assert expand_slurm_cpus(text) == cpus


@pytest.mark.parametrize("text", ["", "x", "2(3)", "2(x)", "2,,3", "2(x99999999)"])
def test_slurm_cpus_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        expand_slurm_cpus(text)


@given(st.text(max_size=40))
def test_expand_only_raises_value_error(text: str) -> None:
    try:
        names = expand_nodeset(text)
    except ValueError as e:
        assert "\n" not in str(e)
    else:
        assert names and all(names)


@given(st.text(max_size=12), st.integers(min_value=0, max_value=2000))
def test_node_range_only_raises_value_error(text: str, n: int) -> None:
    try:
        start, end = parse_node_range(text, n)
    except ValueError as e:
        assert "\n" not in str(e)
    else:
        assert 0 <= start <= end < n
