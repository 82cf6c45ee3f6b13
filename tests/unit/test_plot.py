"""``mnp plot``'s data (``mnp.plot``): bars of a job, usage series of the cluster."""

from __future__ import annotations

from typing import Any

from mnp.plot import Bar, job_bars, usage_series


def span(job_id: str, start: float, stop: float | None, **kw: Any) -> dict[str, Any]:
    return {"job_id": job_id, "number": 1, "queue": "q", "hosts": ["h0"], "start": start,
            "stop": stop, "state": "SUCCEEDED" if stop else None, **kw}  # fmt: skip


def node_ev(index: int, status: str, t: float) -> dict[str, Any]:
    return {"type": "job-state-change", "job_id": f"5#{index}", "node_index": index,
            "status": status, "time": t}  # fmt: skip


def test_a_multinode_job_has_a_bar_per_node_from_its_events() -> None:
    job = {"id": "5", "nodes": [{"node_index": 0, "host": "a"}, {"node_index": 1, "host": "b"}]}
    events = [node_ev(0, "STARTING", 1.0), node_ev(1, "STARTING", 1.5),
              node_ev(0, "RUNNING", 2.0), node_ev(0, "SUCCEEDED", 9.0), node_ev(1, "RUNNING", 2.0),
              {"type": "job-state-change", "job_id": "5", "status": "RUNNING", "time": 0.5},
    ]  # fmt: skip
    assert job_bars(job, [span("5", 1.0, None)], events, now=10.0) == [
        Bar("#0 a", 1.0, 9.0, "SUCCEEDED", "a"),
        Bar("#1 b", 1.5, 10.0, "RUNNING", "b"),  # still running: ends now
    ]


def test_an_array_has_a_bar_per_child_attempt_in_start_order() -> None:
    spans = [span("3:1", 2.0, 4.0), span("3:0", 1.0, 3.0, state="FAILED", hosts=["x", "y"]),
             span("3:0", 3.5, 5.0, number=2)]  # fmt: skip
    assert job_bars({"id": "3"}, spans, [], now=9.0) == [
        Bar(":0 x,y", 1.0, 3.0, "FAILED", "x,y"),
        Bar(":1 h0", 2.0, 4.0, "SUCCEEDED", "h0"),
        Bar(":0 (2) h0", 3.5, 5.0, "SUCCEEDED", "h0"),
    ]
    assert job_bars({"id": "3"}, [span("3", 1.0, 2.0)], [], now=9.0) == [
        Bar("attempt 1 h0", 1.0, 2.0, "SUCCEEDED", "h0")
    ]
    assert job_bars({"id": "3"}, [], [], now=9.0) == []


def test_usage_counts_each_attempt_in_every_slice_it_touches() -> None:
    spans = [
        span("1", 0.0, 2.5, hosts=["a", "b"]),  # slices 0..2, on both hosts
        span("2", 3.2, 3.3, queue="other"),  # short: still counted in slice 3
        span("3", 8.5, None),  # running: to the end
        span("4", -5.0, -1.0),  # before the window
    ]
    times, by_host = usage_series(spans, 0.0, 10.0, "host", buckets=10)
    assert times == [float(i) for i in range(10)]
    assert by_host == {
        "a": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        "b": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        "h0": [0, 0, 0, 1, 0, 0, 0, 0, 1, 1],
    }
    _, by_queue = usage_series(spans, 0.0, 10.0, "queue", buckets=10)
    assert by_queue == {
        "other": [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        "q": [1, 1, 1, 0, 0, 0, 0, 0, 1, 1],
    }
