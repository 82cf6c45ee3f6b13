"""The PBS provider's commands, held to golden argv and qstat output (PBS is not
packaged here; it was not run against a real PBS server)."""

from __future__ import annotations

import json

import pytest

from mnp.provider.pbs import cancel_argv, parse_qstat, poll_argv, submit_argv, walltime
from mnp.provider.slurm import ProviderError


@pytest.mark.parametrize(
    ("nodes", "limit", "options", "argv"),
    [
        (2, None, (), ["qsub", "-N", "mnp-burst", "-l", "select=2:ncpus=1", "-l",
                       "place=scatter:excl", "-o", "/dev/null", "-e", "/dev/null", "-j", "oe",
                       "--", "/bin/sleep", "2147483647"]),
        (1, 3600.0, ("-q", "debug"), ["qsub", "-N", "mnp-burst", "-l", "select=1:ncpus=1", "-l",
                                      "place=scatter:excl", "-l", "walltime=01:00:00", "-o",
                                      "/dev/null", "-e", "/dev/null", "-j", "oe", "-q", "debug",
                                      "--", "/bin/sleep", "2147483647"]),
    ],
)  # fmt: skip
def test_submit_argv(
    nodes: int, limit: float | None, options: tuple[str, ...], argv: list[str]
) -> None:
    assert submit_argv(nodes, limit, "mnp-burst", options) == argv


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(1, "00:01:00"), (90, "00:02:00"), (3600, "01:00:00"), (86400 + 61, "24:02:00")],
)
def test_walltime_rounds_up_to_minutes(seconds: float, text: str) -> None:
    assert walltime(seconds) == text


def test_poll_and_cancel_argv() -> None:
    assert poll_argv(["12.srv", "13.srv"]) == [
        "qstat",
        "-f",
        "-F",
        "json",
        "-x",
        "12.srv",
        "13.srv",
    ]
    assert cancel_argv("12.srv") == ["qdel", "-W", "force", "12.srv"]


def test_parse_qstat_states_nodes_and_time_left() -> None:
    doc = {
        "Jobs": {
            "12.srv": {"job_state": "R", "exec_host": "n1/0*2+n2/0*2",
                       "Resource_List": {"walltime": "01:00:00", "nodect": 2},
                       "resources_used": {"walltime": "00:10:00"}},
            "13.srv": {"job_state": "Q", "comment": "Not Running: Insufficient resources",
                       "Resource_List": {"nodect": 1}},
            "14.srv": {"job_state": "F", "Exit_status": 271, "exec_host": "n3/0"},
            "15.srv": {"job_state": "F", "Exit_status": 0},
        }
    }  # fmt: skip
    got = parse_qstat(json.dumps(doc))
    run = got["12.srv"]
    assert (run.phase, run.nodes, run.time_left, run.node_count) == (
        "RUNNING",
        ("n1", "n2"),
        3000.0,
        2,
    )
    assert got["12"] is run  # the number alone, as some sites print it
    pend = got["13.srv"]
    assert (pend.phase, pend.reason, pend.node_count) == (
        "PENDING",
        "Not Running: Insufficient resources",
        1,
    )
    assert (got["14.srv"].phase, got["14.srv"].state) == ("ENDED", "CANCELLED")
    assert (got["15.srv"].phase, got["15.srv"].state) == ("ENDED", "COMPLETED")
    assert parse_qstat("") == {}
    with pytest.raises(ProviderError):
        parse_qstat("qstat: not json")
