"""The controller's side of a PMI barrier: merge every node's puts, once per epoch."""

from __future__ import annotations

import pytest

from mnp.pmi.exchange import Complete, Exchange, Rejected, Waiting


def test_a_barrier_completes_when_every_node_arrived() -> None:
    ex = Exchange.of([0, 2, 5])
    assert ex.arrive(2, 0, {"b": "2"}) == Waiting((0, 5))
    assert ex.arrive(0, 0, {"a": "1"}) == Waiting((5,))
    assert ex.arrive(5, 0, {}) == Complete(0, {"a": "1", "b": "2"})
    # the next barrier starts empty: only its own puts go back
    assert ex.arrive(0, 1, {"c": "3"}) == Waiting((2, 5))
    assert ex.arrive(5, 1, {}) == Waiting((2,))
    assert ex.arrive(2, 1, {}) == Complete(1, {"c": "3"})


def test_one_node_completes_alone() -> None:
    ex = Exchange.of([7])
    assert ex.arrive(7, 0, {"k": "v"}) == Complete(0, {"k": "v"})
    assert ex.arrive(7, 1, {}) == Complete(1, {})


@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        ([(0, 0), (0, 0)], "node 0 arrived twice at barrier 0"),
        ([(3, 0)], "node 3 runs no rank of this job"),
        ([(0, 1)], "node 0 is ahead: barrier 1 while 0 is open"),
        ([(0, 0), (1, 0), (1, 0)], "node 1 is late: barrier 0 already completed"),
    ],
)
def test_duplicate_late_ahead_and_foreign_nodes_are_rejected(
    steps: list[tuple[int, int]], reason: str
) -> None:
    ex = Exchange.of([0, 1])
    results = [ex.arrive(node, epoch, {}) for node, epoch in steps]
    assert results[-1] == Rejected(reason)


def test_a_key_put_with_two_values_is_rejected_and_equal_ones_merge() -> None:
    ex = Exchange.of([0, 1])
    ex.arrive(0, 0, {"k": "same", "x": "1"})
    assert ex.arrive(1, 0, {"k": "same"}) == Complete(0, {"k": "same", "x": "1"})
    ex.arrive(0, 1, {"k": "a"})
    assert ex.arrive(1, 1, {"k": "b"}) == Rejected(
        "key 'k' put with different values on nodes 0 and 1"
    )


def test_an_exchange_needs_a_node() -> None:
    with pytest.raises(ValueError):
        Exchange.of([])
