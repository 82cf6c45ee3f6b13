"""The Slurm provider's commands and how it reads squeue (pure parts)."""

from __future__ import annotations

from mnp.provider.slurm import AllocationStatus, as_allocation, parse_squeue, submit_argv
from mnp.sched.autoscale import Allocation


def test_submit_argv_holds_whole_nodes_and_puts_options_last() -> None:
    argv = submit_argv(2, 3601, "mnp-burst", ["--partition=debug", "--time=5"])
    assert argv[:2] == ["sbatch", "--parsable"]
    assert "--nodes=2" in argv and "--exclusive" in argv and "--job-name=mnp-burst" in argv
    assert "--time=61" in argv  # whole minutes, rounded up
    assert argv.index("--time=61") < argv.index("--time=5")  # the user's option wins
    assert argv[-2:] == ["--wrap", "exec sleep infinity"]
    assert not any(a.startswith("--time") for a in submit_argv(1, None, "x"))


def test_parse_squeue() -> None:
    text = (
        "41|RUNNING|n[1-2]|None|59:58|2\n"
        "42|PENDING||Resources|1:00:00|3\n"
        "43|CANCELLED by 0|n3|None|INVALID|1\n"
        "44|RUNNING|n4|None|UNLIMITED|1\n"
        "garbage line\n"
    )
    got = parse_squeue(text)
    assert got["41"] == AllocationStatus("41", "RUNNING", ("n1", "n2"), "", 3598.0, 2)
    assert got["42"].phase == "PENDING" and got["42"].reason == "Resources"
    assert got["43"].state == "CANCELLED" and got["43"].phase == "ENDED"
    assert got["44"].time_left is None and got["44"].phase == "RUNNING"
    assert set(got) == {"41", "42", "43", "44"}
    assert AllocationStatus("9", "GONE").phase == "ENDED"


def test_as_allocation() -> None:
    got = parse_squeue("41|RUNNING|n[1-2]|None|10:00|2\n42|PENDING||Resources|1:00:00|3\n")
    assert as_allocation(got["41"], 100.0, used=(1.0, 0.0)) == Allocation(
        "41", 2, "RUNNING", (1.0, 0.0), None, 700.0
    )
    assert as_allocation(got["42"], 100.0) == Allocation("42", 3, "PENDING")
    assert as_allocation(AllocationStatus("9", "TIMEOUT"), 100.0) is None
