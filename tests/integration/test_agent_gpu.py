"""GPU usage in `exited` and `mnp describe --json`, end to end, with a fake NVML: no
GPU machine was available. A directory on PYTHONPATH holds a fake `pynvml` and a
`sitecustomize` that makes `/dev/nvidiactl` appear to exist, so the agent's facts find
NVML and its tasks given GPUs are sampled through the fake. The fake lists as compute
processes every process whose command line holds `fake-gpu-user` (256 MiB each) and
pid 1 (1 GiB: not the task's, never counted); device d is busy 25 * (d + 1) percent."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import mnp
from tests.integration.test_agent_driver import CTL, REPO, Agent

FAKE_PYNVML = """
import os
from types import SimpleNamespace

class NVMLError(Exception):
    pass

def nvmlInit():
    pass

def nvmlShutdown():
    pass

def nvmlDeviceGetCount():
    return 2

def nvmlDeviceGetHandleByIndex(i):
    return i

def nvmlDeviceGetName(h):
    return "Fake GPU"

def nvmlDeviceGetUUID(h):
    return "GPU-fake-%d" % h

def nvmlDeviceGetMemoryInfo(h):
    return SimpleNamespace(total=80 << 30, used=3 << 30, free=77 << 30)

def nvmlDeviceGetUtilizationRates(h):
    return SimpleNamespace(gpu=25 * (h + 1), memory=0)

def nvmlDeviceGetComputeRunningProcesses(h):
    out = [SimpleNamespace(pid=1, usedGpuMemory=1 << 30)]
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/cmdline" % name, "rb") as f:
                    if b"fake-gpu-user" in f.read():
                        out.append(SimpleNamespace(pid=int(name), usedGpuMemory=256 << 20))
            except OSError:
                pass
    return out
"""

SITECUSTOMIZE = """
import os.path
_exists = os.path.exists
os.path.exists = lambda p: p == "/dev/nvidiactl" or _exists(p)
"""

# two processes on the GPU: the shell's two children (the marker is built, so that
# the shell's own command line does not hold it)
USER = "python3 -c 'import time; time.sleep(2.6)' $m-user"
TASK = ["sh", "-c", f"m=fake-gpu; {USER} & {USER}; wait"]


@pytest.fixture
def fake_nvml(tmp_path: Path) -> str:
    d = tmp_path / "fake-nvml"
    d.mkdir()
    (d / "pynvml.py").write_text(FAKE_PYNVML)
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return str(d)


def _gpu_agent(fake: str, monkeypatch: pytest.MonkeyPatch) -> Agent:
    monkeypatch.setenv("PYTHONPATH", fake + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return Agent(cmd=[sys.executable, "-m", "mnp.agent", "--ctl", CTL])


def test_a_task_given_gpus_reports_their_memory_and_utilisation(
    fake_nvml: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = _gpu_agent(fake_nvml, monkeypatch)
    try:
        assert agent.ready["nvml"] is True and len(agent.ready["gpus"]) == 2
        agent.send(op="spawn", tid="g", argv=TASK, env={"CUDA_VISIBLE_DEVICES": "1"})
        agent.send(op="spawn", tid="n", argv=["sh", "-c", "sleep 1.2"])
        no_gpus = {"CUDA_VISIBLE_DEVICES": ""}
        agent.send(op="spawn", tid="e", argv=["sh", "-c", "sleep 1.2"], env=no_gpus)
        usage = agent.expect("exited", "g", timeout=20)["usage"]
        assert usage["gpu_samples"] >= 1
        assert usage["gpu_max_memory_bytes"] == 512 << 20  # pid 1's GiB is not the task's
        assert usage["gpu_memory_source"] == "process"
        assert usage["gpu_utilization_percent"] == 50.0
        assert usage["gpu_devices"] == [
            {"index": 1, "max_memory_bytes": 512 << 20, "utilization_percent": 50.0}
        ]
        for tid in ("n", "e"):  # no GPUs given: no GPU fields
            u = agent.expect("exited", tid, timeout=20)["usage"]
            assert not [k for k in u if k.startswith("gpu")], u
    finally:
        agent.close()


def test_no_nvml_no_gpu_fields() -> None:
    agent = Agent()
    try:
        agent.send(op="spawn", tid="g", argv=["true"], env={"CUDA_VISIBLE_DEVICES": "0"})
        u = agent.expect("exited", "g")["usage"]
        gpu = {k: v for k, v in u.items() if k.startswith("gpu")}
        # without NVML (this machine): nothing; with it, too short for a sample
        assert gpu == ({"gpu_samples": 0} if agent.ready["nvml"] else {}), u
    finally:
        agent.close()


INVENTORY = """\
[[hosts]]
names = "g1"
transport = "local"
vcpus = 4
gpus = 2
"""


def test_describe_shows_the_gpu_usage_of_a_job(
    fake_nvml: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inv = tmp_path / "gpu.toml"
    inv.write_text(INVENTORY)
    # a home of its own: job 1 is this job whatever ran before (the session shares one home)
    env = {"PYTHONPATH": fake_nvml + os.pathsep + str(REPO), "MNP_HOME": str(tmp_path / "home")}
    r = mnp("run", "--inventory", str(inv), "--gpus", "1", "--", *TASK, env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(mnp("describe", "1", "--json", env=env).stdout)
    (usage,) = d["attempts"][-1]["usage"].values()
    assert usage["gpu_max_memory_bytes"] == 512 << 20
    assert usage["gpu_utilization_percent"] == 25.0  # device 0, the one granted
    assert usage["gpu_memory_source"] == "process"
    text = mnp("describe", "1", env=env).stdout
    assert "gpu 512.0 MiB" in text and "util 25.0%" in text
