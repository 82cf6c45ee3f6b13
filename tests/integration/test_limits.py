"""Resources that are limits, end to end on local nodes (issue 14): memory enforced
(kernel cgroup where the agent can make one, /proc sampling otherwise, forced here by
MNP_MEMORY_ENFORCE=sample), cores bound without overlap, usage recorded."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from mnp.agent.limits import MODE_VAR, memory_cgroup_dir
from tests.helpers import describe, mnp, submit, wait_until
from tests.integration.test_agent_driver import Agent


def _cgroups_here() -> bool:
    own = memory_cgroup_dir()
    if own is None:
        return False
    probe = os.path.join(own, f"mnp-probe.{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    os.rmdir(probe)
    return True


MODES = ["sample"] + (["cgroup"] if _cgroups_here() else [])


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"MNP_HOME": str(tmp_path / "home")}
    yield env
    mnp("controller", "stop", env=env)


def _ended(env: dict[str, str], job: str) -> dict[str, object]:
    return wait_until(  # type: ignore[no-any-return]
        f"job {job} ends",
        lambda: (d := describe(env, job))["state"] in ("SUCCEEDED", "FAILED") and d,
        60,
    )


ALLOC = "import time; b = bytearray(300 << 20); time.sleep(5)"


@pytest.mark.parametrize("mode", MODES)
def test_memory_above_the_limit_is_killed_with_its_reason(home: dict[str, str], mode: str) -> None:
    env = {**home, "MNP_MEMORY_ENFORCE": mode}
    job = submit(env, "--memory", "64MiB", "--", "python3", "-c", ALLOC)
    d = _ended(env, job)
    assert d["state"] == "FAILED"
    reason = str(d["reason"])
    assert reason.startswith("OutOfMemoryError: Container killed due to memory usage"), reason
    assert "of its 64.0 MiB" in reason
    (attempt,) = d["attempts"]  # type: ignore[misc]
    usage = attempt["usage"][job]
    assert usage["enforced"] == mode and usage["memory_limit"] == 64 << 20
    assert usage["max_rss_bytes"] >= 64 << 20
    text = mnp("describe", job, env=home).stdout
    assert f"{job}: peak" in text and f"({mode})" in text


@pytest.mark.parametrize("mode", MODES)
def test_memory_below_the_limit_runs_and_reports_usage(home: dict[str, str], mode: str) -> None:
    env = {**home, "MNP_MEMORY_ENFORCE": mode}
    script = (
        "import time\n"
        "b = bytearray(100 << 20)\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 1.0: pass\n"
    )
    job = submit(env, "--memory", "512MiB", "--", "python3", "-c", script)
    d = _ended(env, job)
    assert d["state"] == "SUCCEEDED", d
    usage = d["attempts"][0]["usage"][job]  # type: ignore[index]
    assert usage["max_rss_bytes"] >= 100 << 20
    assert usage["cpu_seconds"] >= 0.5
    events = [json.loads(x) for x in Path(home["MNP_HOME"], "events.jsonl").read_text().split()]
    (terminal,) = [e for e in events if e["job_id"] == job and e["status"] == "SUCCEEDED"]
    assert terminal["usage"][job]["max_rss_bytes"] >= 100 << 20


def test_usage_without_limits(home: dict[str, str]) -> None:
    job = submit(home, "--", "python3", "-c", "b = bytearray(100 << 20)")
    d = _ended(home, job)
    usage = d["attempts"][0]["usage"][job]  # type: ignore[index]
    assert usage["max_rss_bytes"] >= 100 << 20 and "memory_limit" not in usage


def test_cores_are_bound_without_overlap(home: dict[str, str], tmp_path: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")  # this machine has 2; a CI runner may have 1
    script = (
        "import os, sys, time\n"
        "print(os.environ['MNP_CPUS'], sorted(os.sched_getaffinity(0)), flush=True)\n"
        "time.sleep(1.5)\n"
    )
    args = ("--inventory", "local", "--local-nodes", "1", "--vcpus", "1", "--cpu-bind", "cores")
    jobs = [submit(home, *args, "--", "python3", "-c", script) for _ in range(2)]
    seen = []
    for job in jobs:
        d = _ended(home, job)
        assert d["state"] == "SUCCEEDED", d
        out = mnp("logs", job, env=home).stdout.split(None, 1)
        cpus = [int(c) for c in out[0].split(",")]
        assert json.loads(out[1]) == cpus  # the task runs where MNP_CPUS says
        assert d["attempts"][0]["usage"][job]["cpus"] == cpus  # type: ignore[index]
        seen.append((cpus, d["started"], d["stopped"]))
    (a, a0, a1), (b, b0, b1) = seen
    assert a0 < b1 and b0 < a1  # they ran at the same time
    assert not set(a) & set(b)


def test_multinode_main_node_killed_for_memory(home: dict[str, str]) -> None:
    job = submit(home, "--nodes", "2", "--memory", "64MiB", "--", "python3", "-c", ALLOC)
    d = _ended(home, job)
    assert d["state"] == "FAILED"
    assert str(d["reason"]).startswith("OutOfMemoryError: Container killed"), d["reason"]
    usage = d["attempts"][0]["usage"]  # type: ignore[index]
    assert set(usage) == {f"{job}#0", f"{job}#1"}


# ---------------------------------------------------------------- the agent alone


def _agent(mode: str, **env: str) -> Agent:
    os.environ[MODE_VAR] = mode  # agent_env() copies os.environ
    os.environ.update(env)
    try:
        return Agent()
    finally:
        for name in (MODE_VAR, *env):
            os.environ.pop(name, None)


@pytest.mark.parametrize("mode", MODES)
def test_agent_limits_only_what_the_spawn_asks(mode: str) -> None:
    """The agent's own MNP_MEMORY_LIMIT / MNP_CPUS (it runs inside a task) are not its
    tasks': a spawn without them runs unlimited and unbound, and does not see them."""
    a = _agent(mode, MNP_MEMORY_LIMIT=str(32 << 20), MNP_CPUS="0")
    try:
        script = "import os; b = bytearray(100 << 20); print(len(os.sched_getaffinity(0)), "
        script += "os.environ.get('MNP_MEMORY_LIMIT'), os.environ.get('MNP_CPUS'))"
        exited, _ = a.run("1", ["python3", "-c", script])
        assert exited["code"] == 0 and "error" not in exited, exited
        assert a.output("1") == f"{len(os.sched_getaffinity(0))} None None\n"
        assert "memory_limit" not in exited["usage"] and "cpus" not in exited["usage"]
        exited, _ = a.run("2", ["python3", "-c", ALLOC], env={"MNP_MEMORY_LIMIT": str(64 << 20)})
        assert exited["signal"] == signal.SIGKILL
        assert exited["error"].startswith("OutOfMemoryError: ")
        assert exited["usage"]["enforced"] == mode
    finally:
        a.close()


@pytest.mark.skipif("cgroup" not in MODES, reason="the agent cannot make cgroups here")
def test_cgroups_are_removed_after_tasks_and_after_a_sigkilled_agent() -> None:
    own = memory_cgroup_dir()
    assert own is not None
    a = _agent("cgroup")
    mine = Path(own, f"mnp-agent.{a.proc.pid}")
    try:
        a.run("1", ["true"], env={"MNP_MEMORY_LIMIT": str(64 << 20)})
        assert mine.is_dir() and not Path(mine, "1").exists()  # removed once it is gone
        a.send(op="spawn", tid="9", argv=["sleep", "100"], env={"MNP_MEMORY_LIMIT": "99999999"})
        a.expect("started", "9")
        assert Path(mine, "9").is_dir()
        a.proc.kill()
    finally:
        a.close()
    b = Agent()
    try:
        b.send(op="stale", live=[], below=100, grace=1)
        assert b.expect("stale", timeout=10)["killed"] == 1
        assert not mine.exists()
    finally:
        b.close()
    assert not Path(own, f"mnp-agent.{b.proc.pid}").exists()  # made only when needed
