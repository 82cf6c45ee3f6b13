"""GPU usage of the tasks given GPUs, sampled through NVML while they run.

A task is given GPUs by its spawn's `env`: `CUDA_VISIBLE_DEVICES` as host (NVML)
indices, what the controller grants (mnp/wiring.py; `CUDA_DEVICE_ORDER=PCI_BUS_ID`
makes CUDA's order NVML's). Only on an agent whose facts said NVML works (`nvml`) is
anything done: every `SAMPLE_EVERY` seconds, while such tasks run, one timer asks
NVML, once per device in use, for the compute processes on it
(`nvmlDeviceGetComputeRunningProcesses`) and its utilisation
(`nvmlDeviceGetUtilizationRates(...).gpu`). A task's memory in a sample is the used
GPU memory of the processes of its tree on its devices (a process belongs to the task
when its session or process group is the task's, or the task's main process is an
ancestor); where a device cannot say per process (NVML raises, or gives no
`usedGpuMemory`), or the task runs in a podman/docker container (its processes are
not in the agent's tree), the device's used memory instead: `gpu_memory_source`
then says `"device"`, else `"process"`.

pynvml is the module facts.py imports; it is imported and initialised at the first
sample (not at the spawn), and shut down when the agent ends. Without NVML, or for a
task without GPUs, nothing of this runs and `usage` has none of its fields.
"""

from __future__ import annotations

import sys
import time

from .proc import read_stat
from .request import index_list

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

    from .loop import Loop, Timer

GPUS_VAR = "CUDA_VISIBLE_DEVICES"
SAMPLE_EVERY = 1.0  # seconds between NVML samples while tasks with GPUs run


parse_devices = index_list  # CUDA_VISIBLE_DEVICES: [] for GPU UUIDs


class GpuUse:
    """What one task's GPUs did in the samples taken so far."""

    __slots__ = ("pid", "devices", "own_pids", "device_memory", "samples", "peak", "dev")

    def __init__(self, pid: int, devices: List[int], own_pids: bool = True) -> None:
        self.pid = pid  # the task's main process (its session and process group)
        self.devices = devices  # NVML indices
        self.own_pids = own_pids  # False: a container's; only device figures mean anything
        self.device_memory = False  # some sample used a device's memory, not processes'
        self.samples = 0
        self.peak = 0  # the largest memory of a sample, over its devices
        # index -> [peak memory, sum of utilisation, utilisation samples]
        self.dev: Dict[int, List[int]] = {i: [0, 0, 0] for i in devices}

    def report(self) -> Dict[str, Any]:
        """The fields this adds to `usage` (none before the first sample)."""
        if not self.samples:
            return {"gpu_samples": 0}
        out: Dict[str, Any] = {
            "gpu_samples": self.samples,
            "gpu_max_memory_bytes": self.peak,
            "gpu_memory_source": "device" if self.device_memory else "process",
        }
        total = count = 0
        detail = []
        for index in self.devices:
            peak, util, n = self.dev[index]
            entry: Dict[str, Any] = {"index": index, "max_memory_bytes": peak}
            if n:
                entry["utilization_percent"] = round(util / n, 1)
                total += util
                count += n
            detail.append(entry)
        if count:
            out["gpu_utilization_percent"] = round(total / count, 1)
        out["gpu_devices"] = detail
        return out


def _import_nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


class GpuSampler:
    """One timer sampling the devices of every running task with GPUs."""

    def __init__(self, loop: Loop, opener: Callable[[], Any] = _import_nvml) -> None:
        self.loop = loop
        self.opener = opener
        self.nvml: Any = None  # the initialised module
        self.broken = False  # NVML failed to start here: sample nothing more
        self.handles: Dict[int, Any] = {}
        self.uses: List[GpuUse] = []  # of tasks not yet reaped
        self.timer: Optional[Timer] = None
        self.cost = 0.0  # seconds the last sample took

    def start(self, use: GpuUse) -> None:
        if self.broken:
            return
        self.uses.append(use)
        if self.timer is None:
            self.timer = self.loop.call_later(SAMPLE_EVERY, self._tick)

    def stop(self, use: GpuUse) -> None:
        """The task's main process was reaped: no more samples for it."""
        if use in self.uses:
            self.uses.remove(use)

    def _tick(self) -> None:
        self.timer = None
        if not self.uses:
            return
        self.sample(self.uses)
        if self.uses and not self.broken:
            self.timer = self.loop.call_later(SAMPLE_EVERY, self._tick)

    def _module(self) -> Any:
        if self.nvml is None and not self.broken:
            try:
                self.nvml = self.opener()
            except Exception as e:
                sys.stderr.write("mnp agent: NVML for GPU usage: %s\n" % e)
                self.broken = True
                self.uses = []
        return self.nvml

    def _handle(self, index: int) -> Any:
        h = self.handles.get(index)
        if h is None:
            h = self.handles[index] = self.nvml.nvmlDeviceGetHandleByIndex(index)
        return h

    def sample(self, uses: Iterable[GpuUse]) -> None:
        """One sample of the devices `uses` need, each asked once, added to each."""
        t0 = time.monotonic()
        nvml = self._module()
        if nvml is None:
            return
        uses = list(uses)
        wanted = sorted({i for u in uses for i in u.devices})
        procs: Dict[int, Optional[List[Tuple[int, int]]]] = {}  # None: per process unknown
        used: Dict[int, int] = {}  # the device's used memory, read when needed
        util: Dict[int, Optional[int]] = {}
        for index in wanted:
            try:
                h = self._handle(index)
            except Exception:
                procs[index], util[index] = None, None
                continue
            try:
                listed = []
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    mem = getattr(p, "usedGpuMemory", None)
                    if mem is None:
                        raise ValueError("no usedGpuMemory")
                    listed.append((int(p.pid), int(mem)))
                procs[index] = listed
            except Exception:
                procs[index] = None
            try:
                util[index] = int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:
                util[index] = None
        owners: Dict[int, Optional[int]] = {}  # pid -> the task main pid it is under
        mains = {u.pid for u in uses if u.own_pids}
        for use in uses:
            total = 0
            for index in use.devices:
                on = procs.get(index)
                if on is None or not use.own_pids:
                    mem = used.get(index)
                    if mem is None:
                        try:
                            mem = int(nvml.nvmlDeviceGetMemoryInfo(self._handle(index)).used)
                        except Exception:
                            mem = 0
                        used[index] = mem
                    use.device_memory = True
                else:
                    mem = 0
                    for pid, m in on:
                        if pid not in owners:
                            owners[pid] = _owner(pid, mains)
                        if owners[pid] == use.pid:
                            mem += m
                d = use.dev[index]
                d[0] = max(d[0], mem)
                u = util.get(index)
                if u is not None:
                    d[1] += u
                    d[2] += 1
                total += mem
            use.peak = max(use.peak, total)
            use.samples += 1
        self.cost = time.monotonic() - t0

    def close(self) -> None:
        self.loop.cancel(self.timer)
        self.timer = None
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml = None


def _owner(pid: int, mains: Any) -> Optional[int]:
    """The main pid (of `mains`) of the task `pid` belongs to: its session, its process
    group, or its nearest ancestor among them; None when none (another user's, ...)."""
    seen = 0
    while pid > 1 and seen < 64:
        if pid in mains:
            return pid
        p = read_stat(pid)
        if p is None:
            return None
        if p.sid in mains:
            return p.sid
        if p.pgrp in mains:
            return p.pgrp
        pid = p.ppid
        seen += 1
    return None
