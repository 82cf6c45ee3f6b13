"""A teardown `Step` (mnp/agent/teardown.py): what a later room (containers, cgroups)
adds to every teardown without touching the loop. Driven in this process: an `Agent`
that is not started (no signal handlers), its loop run by hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

from mnp.agent.agent import Agent
from mnp.agent.loop import Output
from mnp.agent.ops import OPS
from mnp.agent.proc import Snapshot, read_stat
from mnp.agent.tasks import Teardown
from mnp.agent.teardown import Step


class Recorder(Step):
    def __init__(self, seed: int = 0, wait: int = 0) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.seed = seed
        self.wait = wait  # scans it keeps the teardown from finishing

    def begin(self, td: Teardown) -> None:
        self.calls.append(("begin", td.kind, td.name))

    def seeds(self, td: Teardown, snap: Snapshot) -> list[int]:
        return [self.seed] if self.seed and td.kind == "sweep" else []

    def pending(self, td: Teardown) -> bool:
        if self.wait:
            self.wait -= 1
            self.calls.append(("pending", td.kind, td.name))
            return True
        return False

    def end(self, td: Teardown) -> int:
        self.calls.append(("end", td.kind, td.name))
        return 2


def _agent(step: Step) -> Agent:
    r, w = os.pipe()
    os.close(r)
    agent = Agent(f"test-steps-{os.getpid()}", 1.0, out=Output(w))
    agent.teardowns.steps.append(step)
    return agent


def _settle(agent: Agent, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while agent.teardowns.active and time.monotonic() < deadline:
        agent.loop.run_once()
    assert not agent.teardowns.active
    return [json.loads(line) for line in agent.out.lines]


def test_a_step_begins_holds_and_ends_a_sweep_and_counts_in_killed() -> None:
    step = Recorder(wait=2)
    agent = _agent(step)
    OPS["sweep"](agent, {"op": "sweep", "job": "9999991", "grace": 0})
    assert step.calls == [("begin", "sweep", "9999991")]
    events = _settle(agent)
    # only the sweep's calls: orphans of earlier tests reparented to this process are
    # torn down as strays by the same loop
    assert [c for c in step.calls if c[1] == "sweep"] == [
        ("begin", "sweep", "9999991"),
        ("pending", "sweep", "9999991"),
        ("pending", "sweep", "9999991"),
        ("end", "sweep", "9999991"),
    ]
    swept = [e for e in events if e["ev"] == "swept"]
    assert len(swept) == 1 and swept[0]["job"] == "9999991" and swept[0]["killed"] == 2


def test_a_step_adds_processes_for_a_sweep_to_kill() -> None:
    # not a child of this process (the agent would adopt that as an orphan of its own)
    out = subprocess.run(
        ["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True
    )
    pid = int(out.stdout)
    try:
        step = Recorder(seed=pid)
        agent = _agent(step)
        start = time.monotonic()
        OPS["sweep"](agent, {"op": "sweep", "job": "9999992", "grace": 5})
        events = _settle(agent)
        assert time.monotonic() - start < 5  # SIGTERM did it, within the grace
        p = read_stat(pid)
        assert p is None or p.dead
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    swept = [e for e in events if e["ev"] == "swept"]
    # the process it signalled, plus the 2 the step's end reports
    assert len(swept) == 1 and swept[0]["killed"] == 3
    mine = [c for c in step.calls if c[1] == "sweep"]
    assert mine == [("begin", "sweep", "9999992"), ("end", "sweep", "9999992")]


def test_a_stale_sweep_runs_the_steps_with_its_rule() -> None:
    seen: list[Any] = []

    class Rules(Step):
        def begin(self, td: Teardown) -> None:
            seen.append((td.kind, td.rule is not None and td.rule.below))

    agent = _agent(Rules())
    OPS["stale"](agent, {"op": "stale", "live": ["7"], "below": 9, "grace": 0})
    events = _settle(agent)
    assert seen == [("stale", 9)]
    assert [e["ev"] for e in events] == ["stale"]
