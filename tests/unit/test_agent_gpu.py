"""The agent's GPU usage sampler (mnp/agent/gpu.py) against a fake NVML: which
processes count for a task, the device fallback, utilisation means, and a sample's
cost. No GPU machine was available: NVML is faked throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mnp.agent.gpu import GpuSampler, GpuUse, parse_devices
from mnp.agent.loop import Loop

MIB = 1 << 20


class NotSupported(Exception):
    pass


class FakeNvml:
    """Devices: index -> (processes [(pid, bytes or None)] or None (not supported),
    utilisation percents taken one per sample, used bytes)."""

    def __init__(self, devices: dict[int, tuple[Any, list[int], int]]) -> None:
        self.devices = devices
        self.calls = 0
        self.shut = False

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self.calls += 1
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        self.calls += 1
        procs = self.devices[h][0]
        if procs is None:
            raise NotSupported("Not Supported")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in procs]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        self.calls += 1
        rates = self.devices[h][1]
        return SimpleNamespace(gpu=rates.pop(0) if len(rates) > 1 else rates[0], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(used=self.devices[h][2], total=80 << 30)

    def nvmlShutdown(self) -> None:
        self.shut = True


def _child_of(pid: int) -> int:
    for _ in range(200):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if text:
            return int(text[0])
        time.sleep(0.01)
    raise AssertionError("no child")


def test_parse_devices() -> None:
    assert parse_devices("0,3") == [0, 3]
    assert parse_devices("") == []
    assert parse_devices("GPU-1234") == []


def test_sampler_counts_the_tasks_processes_and_falls_back_to_device_memory() -> None:
    # a task: a shell (its own session) and the sleep it started
    main = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        child = _child_of(main.pid)
        fake = FakeNvml(
            {
                # the task's child and a process that is not the task's
                0: ([(child, 100 * MIB), (other.pid, 900 * MIB)], [40, 60], 5 << 30),
                # per process not supported: the device's used memory counts
                1: (None, [10, 30], 7 << 30),
                2: ([(other.pid, 50 * MIB)], [99], 1 << 30),  # not the task's device
            }
        )
        sampler = GpuSampler(Loop(), opener=lambda: fake)
        one = GpuUse(main.pid, [0])
        two = GpuUse(main.pid, [0, 1])
        sampler.sample([one, two])
        fake.devices[0][0][0] = (child, 300 * MIB)  # it grew
        sampler.sample([one, two])
        assert one.report() == {
            "gpu_samples": 2,
            "gpu_max_memory_bytes": 300 * MIB,
            "gpu_memory_source": "process",
            "gpu_utilization_percent": 50.0,
            "gpu_devices": [
                {"index": 0, "max_memory_bytes": 300 * MIB, "utilization_percent": 50.0}
            ],
        }
        r = two.report()
        assert r["gpu_memory_source"] == "device"
        assert r["gpu_max_memory_bytes"] == 300 * MIB + (7 << 30)
        assert r["gpu_devices"][1] == {
            "index": 1,
            "max_memory_bytes": 7 << 30,
            "utilization_percent": 20.0,
        }
        # one read per device and sample, shared by the tasks on it: the mean of
        # device 0's 40, 60 and device 1's 10, 30
        assert r["gpu_utilization_percent"] == pytest.approx((40 + 60 + 10 + 30) / 4)
        # a container's task: device memory only
        boxed = GpuUse(main.pid, [2], own_pids=False)
        sampler.sample([boxed])
        assert boxed.report()["gpu_max_memory_bytes"] == 1 << 30
        assert boxed.report()["gpu_memory_source"] == "device"
        sampler.close()
        assert fake.shut
    finally:
        for p in (main, other):
            p.kill()
            p.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except (NameError, ProcessLookupError):
            pass


def test_no_sample_before_the_first_tick_and_broken_nvml_stops_sampling() -> None:
    use = GpuUse(1, [0])
    assert use.report() == {"gpu_samples": 0}

    def broken() -> Any:
        raise RuntimeError("NVML Shared Library Not Found")

    sampler = GpuSampler(Loop(), opener=broken)
    sampler.sample([use])
    assert sampler.broken and use.samples == 0
    sampler.start(GpuUse(2, [0]))
    assert sampler.timer is None and not sampler.uses


def test_a_sample_is_cheap() -> None:
    """8 devices, 8 tasks, 8 processes a device: a sample's cost (without NVML's own
    time, which the fake does not have)."""
    main = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        pids = [main.pid] + [100000 + i for i in range(7)]  # gone pids: looked up once
        fake = FakeNvml({i: ([(p, MIB) for p in pids], [50], 1 << 30) for i in range(8)})
        sampler = GpuSampler(Loop(), opener=lambda: fake)
        uses = [GpuUse(main.pid if i == 0 else 1 + i, [i]) for i in range(8)]
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            sampler.sample(uses)
        each = (time.perf_counter() - t0) / n
        print(f"GPU sample: {each * 1e3:.3f} ms for 8 devices and 8 tasks (fake NVML)")
        assert each < 0.02, each
        assert uses[0].report()["gpu_max_memory_bytes"] == MIB
    finally:
        main.kill()
        main.wait()
