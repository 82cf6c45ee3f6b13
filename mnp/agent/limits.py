"""Resources that are limits: a task's memory, its CPU cores, and what it used.

A spawn whose `env` sets `MNP_MEMORY_LIMIT` (bytes) runs under that limit, with
everything it starts: kernel-enforced in a memory cgroup of its own where the agent
can make one (cgroup v1 `memory` hierarchy, writable: root, or a delegated
directory), else by sampling /proc every `SAMPLE_EVERY` seconds and SIGKILLing the
task's tree once its resident memory is above the limit. Either way its `exited`
carries `error` "OutOfMemoryError: Container killed due to memory usage (...)".
`MNP_MEMORY_ENFORCE` in the agent's own environment picks the mode: `auto`
(default), `cgroup` (as auto: a cgroup when one can be made), `sample`.

A spawn whose `env` sets `MNP_CPUS` ("0,3") runs pinned to those CPUs
(sched_setaffinity).

Both are applied race-free: the agent moves itself into the task's cgroup and
narrows its own affinity just before the spawn, the child inherits both, and the
agent moves back. The agent is single-threaded, so nothing else runs meanwhile.

Every `exited` carries `usage`: `max_rss_bytes` (the largest of the cgroup's peak,
the sampled peak and the reaped process's ru_maxrss) and `cpu_seconds` (user +
system time of the main process and the descendants it waited for); a task given GPUs
(`CUDA_VISIBLE_DEVICES` in its spawn's `env`) on an agent with NVML also gets its GPU
memory and utilisation, sampled while it runs (gpu.py).
"""

from __future__ import annotations

import os
import signal

from .gpu import GPUS_VAR, GpuSampler, GpuUse, parse_devices
from .proc import read_file, read_stat, send, send_group
from .request import index_list
from .teardown import Step

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

    from .agent import Agent
    from .tasks import Task, Teardown

MEMORY_VAR = "MNP_MEMORY_LIMIT"
CPUS_VAR = "MNP_CPUS"
MODE_VAR = "MNP_MEMORY_ENFORCE"
SAMPLE_EVERY = 0.25  # seconds between /proc samples of tasks limited by sampling
OOM = "OutOfMemoryError: Container killed due to memory usage"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


parse_cpus = index_list  # MNP_CPUS


def mib(n: int) -> str:
    return "%.1f MiB" % (n / 1048576.0)


def oom_reason(used: int, limit: int) -> str:
    return "%s (used %s of its %s)" % (OOM, mib(used), mib(limit))


def memory_cgroup_dir() -> Optional[str]:
    """The directory of the agent's own cgroup in the v1 `memory` hierarchy, or None
    (no such hierarchy mounted: cgroup v2 only, or no cgroups)."""
    own = None
    for line in (read_file("/proc/self/cgroup") or b"").decode("utf-8", "replace").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            own = parts[2]
    if own is None:
        return None
    for line in (read_file("/proc/self/mountinfo") or b"").decode("utf-8", "replace").splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] != "cgroup":
            continue
        if "memory" not in rest[2].split(","):
            continue
        root, mount = fields[3], fields[4]
        rel = own[len(root) :] if own.startswith(root) else None
        if rel is None:
            continue
        return mount + ("/" + rel.strip("/") if rel.strip("/") else "")
    return None


def _write(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, text.encode("ascii"))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _read_int(path: str) -> Optional[int]:
    data = read_file(path)
    try:
        return int(data) if data is not None else None
    except ValueError:
        return None


def _oom_kills(cg: str) -> int:
    """How many processes the kernel's OOM killer ended in cgroup `cg` (v1
    memory.oom_control's `oom_kill`; on kernels without it, failcnt as a hint)."""
    data = read_file(cg + "/memory.oom_control") or b""
    for line in data.decode("ascii", "replace").splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 1 if (_read_int(cg + "/memory.failcnt") or 0) > 0 else 0


class TaskLimits:
    """What one task was given and what it used so far."""

    __slots__ = ("memory", "cpus", "cgroup", "peak", "oom", "gpus", "gpu")

    def __init__(self, memory: int, cpus: List[int], gpus: Optional[List[int]] = None) -> None:
        self.memory = memory  # bytes; 0: none
        self.cpus = cpus  # [] : not bound
        self.gpus = gpus or []  # NVML indices it was given (sampled: the agent has NVML)
        self.gpu: Optional[GpuUse] = None  # what they did, once it runs
        self.cgroup = ""  # its memory cgroup's directory ("" : sampled, or no limit)
        self.peak = 0  # the largest resident size sampled
        self.oom = 0  # >0: killed for memory (what it used then)


class Limits:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        # an agent started from inside a task inherits that task's limits: they are
        # not its tasks' (a task gets its own from its spawn, or none)
        for name in (MEMORY_VAR, CPUS_VAR):
            agent.env.pop(name, None)
        mode = os.environ.get(MODE_VAR, "auto")
        self.sample_only = mode == "sample"
        self.parent: Optional[str] = None  # this agent's directory of task cgroups
        self.own: Optional[str] = None  # the agent's own memory cgroup
        self.tried = False
        self.leftover: Set[str] = set()  # task cgroups not yet removed
        self.timer: Any = None
        self.gpu = GpuSampler(agent.loop)  # GPU usage of tasks given GPUs (gpu.py)
        try:
            self.affinity: Optional[Set[int]] = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.affinity = None

    # ------------------------------------------------------------ cgroups

    def _cgroups(self) -> Optional[str]:
        """This agent's directory of task cgroups, made on first use; None when the
        agent cannot make cgroups (then memory is sampled)."""
        if not self.tried:
            self.tried = True
            if not self.sample_only:
                own = memory_cgroup_dir()
                if own is not None:
                    parent = "%s/mnp-agent.%d" % (own, os.getpid())
                    try:
                        os.mkdir(parent, 0o755)
                        self.own, self.parent = own, parent
                    except FileExistsError:
                        self.own, self.parent = own, parent
                    except OSError:
                        pass
        return self.parent

    def mode(self) -> str:
        return "cgroup" if self._cgroups() is not None else "sample"

    def _make_cgroup(self, tid: str, memory: int) -> str:
        parent = self._cgroups()
        if parent is None:
            return ""
        name = "".join(c if c.isalnum() else "_" for c in tid)
        path = "%s/%s" % (parent, name)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError:
            return ""
        _write(path + "/memory.swappiness", "0")
        if not _write(path + "/memory.limit_in_bytes", str(memory)):
            self._remove(path)
            return ""
        _write(path + "/memory.memsw.limit_in_bytes", str(memory))  # no swapping around it
        return path

    def _remove(self, path: str) -> None:
        try:
            os.rmdir(path)
            self.leftover.discard(path)
        except FileNotFoundError:
            self.leftover.discard(path)
        except OSError:
            self.leftover.add(path)

    # ------------------------------------------------------------ spawn

    def before(self, tid: str, changes: Mapping[str, Optional[str]]) -> Optional[TaskLimits]:
        """Read the task's limits from the spawn's `env`, and put the agent where the
        task must start: in its cgroup, on its CPUs. `after` undoes it."""
        mem_text = changes.get(MEMORY_VAR) or ""
        cpus_text = changes.get(CPUS_VAR) or ""
        memory = int(mem_text) if mem_text.isdigit() else 0
        cpus = parse_cpus(cpus_text) if cpus_text else []
        gpus = parse_devices(changes.get(GPUS_VAR) or "") if self.agent.nvml else []
        if not memory and not cpus and not gpus:
            return None
        lim = TaskLimits(memory, cpus, gpus)
        if memory:
            lim.cgroup = self._make_cgroup(tid, memory)
            if lim.cgroup and not _write(lim.cgroup + "/cgroup.procs", str(os.getpid())):
                self._remove(lim.cgroup)
                lim.cgroup = ""
        if cpus and self.affinity is not None:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:  # CPUs this host does not have: the task runs unbound
                lim.cpus = []
        return lim

    def after(self, lim: Optional[TaskLimits]) -> None:
        if lim is None:
            return
        if lim.cgroup and self.own is not None:
            _write(self.own + "/cgroup.procs", str(os.getpid()))
        if lim.cpus and self.affinity is not None:
            try:
                os.sched_setaffinity(0, self.affinity)
            except OSError:
                pass

    def started(self, task: Task) -> None:
        lim = task.limits
        if lim is not None and lim.memory and not lim.cgroup and self.timer is None:
            self.timer = self.agent.loop.call_later(SAMPLE_EVERY, self._sample)
        if lim is not None and lim.gpus:
            # a container's processes are not in the agent's tree: device figures only
            own = task.tid not in self.agent.containers.running
            lim.gpu = GpuUse(task.pid, lim.gpus, own)
            self.gpu.start(lim.gpu)

    # ------------------------------------------------------------ sampling

    def _sample(self) -> None:
        """Sum the resident memory of each sampled task's processes (its session and
        process group, and their descendants); SIGKILL a task above its limit."""
        self.timer = None
        sampled = [
            t
            for t in self.agent.tasks.values()
            if t.limits is not None and t.limits.memory and not t.limits.cgroup and not t.reaped
        ]
        if not sampled:
            return
        children: Dict[int, List[int]] = {}
        groups: Dict[int, List[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            p = read_stat(int(name))
            if p is None or p.dead:
                continue
            children.setdefault(p.ppid, []).append(p.pid)
            groups.setdefault(p.sid, []).append(p.pid)
            if p.pgrp != p.sid:
                groups.setdefault(p.pgrp, []).append(p.pid)
        for task in sampled:
            lim = task.limits
            assert lim is not None
            tree = _tree([task.pid] + groups.get(task.pid, []), children)
            used = sum(_rss(pid) for pid in tree)
            lim.peak = max(lim.peak, used)
            if used > lim.memory and not lim.oom:
                lim.oom = used
                send_group(task.pid, signal.SIGKILL)
                for pid in tree:
                    send(pid, signal.SIGKILL)
        self.timer = self.agent.loop.call_later(SAMPLE_EVERY, self._sample)

    # ------------------------------------------------------------ exit

    def exit_report(
        self, task: Task, rusage: Any, code: Optional[int], sig: Optional[int]
    ) -> Tuple[Dict[str, Any], Optional[str]]:
        """(usage, error) for the task's `exited`: error names an OOM kill."""
        peak = 0
        cpu = 0.0
        if rusage is not None:
            peak = int(rusage.ru_maxrss) * 1024
            cpu = float(rusage.ru_utime) + float(rusage.ru_stime)
        lim = task.limits
        error = None
        if lim is not None:
            peak = max(peak, lim.peak)
            if lim.cgroup:
                peak = max(peak, _read_int(lim.cgroup + "/memory.max_usage_in_bytes") or 0)
                failed = sig is not None or (code is not None and code != 0)
                if failed and _oom_kills(lim.cgroup):
                    lim.oom = max(peak, lim.memory)
            if lim.oom:
                error = oom_reason(max(lim.oom, peak), lim.memory)
        usage: Dict[str, Any] = {"max_rss_bytes": peak, "cpu_seconds": round(cpu, 3)}
        if lim is not None and lim.memory:
            usage["memory_limit"] = lim.memory
            usage["enforced"] = "cgroup" if lim.cgroup else "sample"
        if lim is not None and lim.cpus:
            usage["cpus"] = lim.cpus
        if lim is not None and lim.gpu is not None:
            self.gpu.stop(lim.gpu)
            usage.update(lim.gpu.report())
        return usage, error

    def release(self, task: Task) -> None:
        """The task is gone: remove its cgroup (empty now)."""
        lim = task.limits
        if lim is not None and lim.cgroup:
            self._remove(lim.cgroup)
        for path in list(self.leftover):
            self._remove(path)

    def close(self) -> None:
        """The agent ends: remove what is left of its cgroups; let go of NVML."""
        self.gpu.close()
        for path in list(self.leftover):
            self._remove(path)
        if self.parent is not None:
            try:
                os.rmdir(self.parent)
            except OSError:
                pass


def _tree(seeds: List[int], children: Dict[int, List[int]]) -> Set[int]:
    out: Set[int] = set()
    stack = list(seeds)
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        out.add(pid)
        stack.extend(children.get(pid, ()))
    return out


def _rss(pid: int) -> int:
    data = read_file("/proc/%d/statm" % pid)
    if not data:
        return 0
    try:
        return int(data.split()[1]) * _PAGE
    except (IndexError, ValueError):
        return 0


def sweep_dead_agents(own: Optional[str] = None) -> int:
    """Remove the empty task cgroups of agents that no longer run (SIGKILLed ones):
    `mnp-agent.PID` directories under the agent's own memory cgroup. Returns how many
    directories were removed."""
    base = own if own is not None else memory_cgroup_dir()
    if base is None:
        return 0
    removed = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        if not name.startswith("mnp-agent."):
            continue
        pid_text = name[len("mnp-agent.") :]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        if read_stat(int(pid_text)) is not None:
            continue  # its agent (or a process reusing its pid) runs: leave it
        path = base + "/" + name
        try:
            subs = [e for e in os.listdir(path) if os.path.isdir(path + "/" + e)]
        except OSError:
            continue
        for sub in subs:
            try:
                os.rmdir(path + "/" + sub)
                removed += 1
            except OSError:
                pass
        try:
            os.rmdir(path)
            removed += 1
        except OSError:
            pass
    return removed


class CgroupStep(Step):
    """Teardowns remove cgroups: at shutdown ("all") what is left of this agent's, on
    `stale` the empty ones of agents that no longer run."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def end(self, td: Teardown) -> int:
        if td.kind == "all":
            self.limits.close()
        elif td.kind == "stale" and not self.limits.sample_only:
            sweep_dead_agents()
        return 0  # directories, not processes: not counted in `killed`
