"""``mnp run``'s progress line (``mnp.sink``): what it says, and how it is drawn."""

from __future__ import annotations

import io

import pytest

from mnp.sink import Progress, Sink, progress_line


@pytest.mark.parametrize(
    ("done", "running", "failed", "elapsed", "want"),
    [
        (0, 0, 0, 0.0, "mnp: job 7: 0/100 children done, 0 running, 0 failed"),
        (0, 4, 0, 3.0, "mnp: job 7: 0/100 children done, 4 running, 0 failed"),
        (40, 8, 10, 10.0, "mnp: job 7: 40/100 children done, 8 running, 10 failed; 5/s, "
         "about 10s left"),
        (1, 1, 0, 50.0, "mnp: job 7: 1/100 children done, 1 running, 0 failed; 0.02/s, "
         "about 1h22m left"),
        (9, 0, 1, 2.0, "mnp: job 7: 9/100 children done, 0 running, 1 failed; 5/s, "
         "about 18s left"),
        (99, 0, 1, 20.0, "mnp: job 7: 99/100 children done, 0 running, 1 failed; 5/s"),
    ],
)  # fmt: skip
def test_progress_line(done: int, running: int, failed: int, elapsed: float, want: str) -> None:
    assert progress_line("7", 100, "children", done, running, failed, elapsed) == want


def ev(job_id: str, status: str) -> dict[str, object]:
    return {"type": "job-state-change", "job_id": job_id, "status": status}


def test_progress_counts_the_last_state_of_each_child_or_node() -> None:
    now = [0.0]
    p = Progress("7", 3, "children", clock=lambda: now[0])
    for e in [
        ev("7", "RUNNING"),
        ev("7:0", "RUNNING"),
        ev("7:1", "STARTING"),
        ev("7:0", "SUCCEEDED"),
        ev("7:2", "FAILED"),
        ev("70:1", "FAILED"),
        ev("7:1#0", "FAILED"),
        {"type": "other", "job_id": "7:1", "status": "FAILED"},
    ]:
        p.feed(e)  # fmt: skip
    now[0] = 4.0
    assert p.line() == "mnp: job 7: 1/3 children done, 1 running, 1 failed; 0.5/s, about 2s left"
    nodes = Progress("8", 2, "nodes", clock=lambda: 0.0)
    for e in [ev("8#0", "RUNNING"), ev("8#1", "RUNNING"), ev("8", "RUNNING"), ev("8:0", "FAILED")]:
        nodes.feed(e)
    assert nodes.line() == "mnp: job 8: 0/2 nodes done, 2 running, 0 failed"


def test_output_clears_the_line_and_draws_it_again() -> None:
    out, err = io.StringIO(), io.StringIO()
    sink = Sink(stdout=out, stderr=err)
    sink.write(2, "before\n")
    sink.status("P1")
    sink.write(1, "a line\n")
    sink.write(2, "an error\n")
    sink.status("P2")
    sink.status("P2")  # the same: not drawn again
    sink.status("")
    assert out.getvalue() == "a line\n"
    assert err.getvalue() == (
        "before\n\r\x1b[KP1\r\x1b[K\r\x1b[KP1\r\x1b[Kan error\n\r\x1b[KP1\r\x1b[KP2\r\x1b[K"
    )
