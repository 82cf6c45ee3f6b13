"""The agent's containers: wrapping a spawn, and removing what a teardown left.

A podman or docker container outlives its client when the client is killed: its
processes are the runtime's (conmon's) children, not the task's. They carry the task's
tags (`MNP_JOB_ID`, `MNP_CONTROLLER_ID`, `MNP_AGENT_ID` are passed in), so the agent's
teardown and sweeps kill them as any tagged process; what is then left is the
container's record, which `--rm` removes unless its monitor was killed first. So:

- each container has a marker file in the run directory (`containers/NAME`) while its
  task is on this agent;
- until SIGKILL time a teardown signals only the container's processes, never the
  runtime's client or monitor (`Containers.spare`): the monitor records the exit and
  removes the container, the client then exits with the container's status;
- a task that ends otherwise than by itself (a `kill`, `sweep`, shutdown, or a
  teardown that had to kill something) has its container removed (`RUNTIME rm -f`);
- a later agent's `stale` removes the containers whose markers name a dead or abandoned
  agent, or a job the controller no longer runs, as the tag sweep does for processes.

`rm -f` runs in a process of its own (a new session), never waited for by the loop;
the agent remembers its pid so its orphan logic leaves it alone.

The teardowns reach this through `ContainerStep` (teardown.py's `Step`): what a teardown
spares, the group SIGTERM a container task does not get, and the `stale` removal. The
spawn (spawn.py) wraps the argv with `wrap_spawn`; the agent's `gone` calls `task_gone`.
"""

from __future__ import annotations

import json
import os
import signal

from .container import (
    MEMORY_VAR,
    ContainerError,
    Spec,
    container_name,
    find_runtime,
    forwarded,
    marker,
    wrap,
)
from .limits import oom_reason
from .proc import agent_alive, job_part, read_file, read_stat
from .spawn import SpawnError
from .teardown import Step

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

    from .proc import Proc, Snapshot
    from .sweep import StaleRule
    from .tasks import Task, Teardown


RM_TRIES = 5
RM_AT_LEAST = 3  # tries, however soon the containers are gone (see `_remove`)
PMI_VARS = {"PMI_PORT", "PMI_ID"}


class Containers:
    def __init__(self, ctl: str, identity: str) -> None:
        self.ctl = ctl
        self.identity = identity
        self.rundir = ""  # set once the agent made it
        self.running: Dict[str, Tuple[str, str, str]] = {}  # tid → (name, kind, exe)
        self.helpers: Set[int] = set()  # pids of `rm -f` processes, until reaped
        self.cidfiles: Dict[str, Tuple[str, int]] = {}  # tid → (cidfile, memory limit)
        self.failed: Set[str] = set()  # tids whose container failed: removed when gone

    def check(self, value: Any) -> Optional[Spec]:
        """A spawn's `container` field, checked (None: none); ValueError says what is wrong."""
        return None if value is None else Spec.from_message(value)

    def wrap_spawn(
        self,
        spec: Spec,
        tid: str,
        argv: List[str],
        env: Dict[str, str],
        changes: Mapping[str, Optional[str]],
        cwd: Optional[str],
        interactive: bool,
    ) -> Tuple[List[str], Dict[str, str]]:
        """The runtime's (argv, env) that run the task `tid` in `spec`'s image; SpawnError
        (127) when this host has no such runtime."""
        try:
            kind, exe = find_runtime(spec.runtime, env.get("PATH"))
        except ContainerError as e:
            raise SpawnError(e.code, e.msg) from None
        name = container_name(self.ctl, tid)
        labels = {
            "mnp.job": job_part(tid),
            "mnp.task": tid,
            "mnp.ctl": self.ctl,
            "mnp.agent": self.identity,
        }
        # an MPI rank's PMI_PORT and PMI_ID (ranks.py) are the agent's, not the controller's
        names = sorted({n for n in forwarded(changes) if n in env} | (PMI_VARS & set(env)))
        cidfile = None
        memory = env.get(MEMORY_VAR, "")
        if kind != "apptainer" and self._dir() and memory.isdigit() and int(memory) > 0:
            cidfile = os.path.join(self._dir(), name + ".cid")
            try:
                os.makedirs(self._dir(), 0o700, exist_ok=True)
            except OSError:
                cidfile = None
            else:
                _unlink(cidfile)  # the runtime refuses to overwrite one
                self.cidfiles[tid] = (cidfile, int(memory))
        out = wrap(kind, exe, spec, argv, env, names, cwd, name, labels, interactive, cidfile)
        if kind != "apptainer":  # apptainer's processes are the task's own
            self.running[tid] = (name, kind, exe)
            self._write_marker(name, marker(name, kind, exe, tid, self.identity))
        return out

    def limited(
        self, tid: str, changes: Mapping[str, Optional[str]]
    ) -> Mapping[str, Optional[str]]:
        """The spawn `env` the agent's own limits (limits.py) read for `tid`: without
        `MNP_MEMORY_LIMIT` when its podman/docker container enforces it (`wrap`): the
        container's processes are not in the cgroup the agent would make, and the
        runtime's client alone (some 40 MB) must not be held to the task's limit."""
        if tid not in self.running or MEMORY_VAR not in changes:
            return changes
        return {k: v for k, v in changes.items() if k != MEMORY_VAR}

    def exited(
        self, tid: str, code: Optional[int], sig: Optional[int]
    ) -> Optional[Tuple[str, int]]:
        """The task `tid`'s client exited: (`exited`'s error, the container's memory
        then) when its podman/docker container was killed for its memory limit, else
        None. A container that failed is removed at `task_gone` whatever ended it: a
        rank's container SIGTERMed as its job fails was seen left "Exited (143)" under
        load, its `--rm` not done.

        The runtimes cannot say so here: podman 4.3 with runc and cgroupfs reports
        `State.OOMKilled` false for such a container, and its cgroup is gone with it.
        The kernel's OOM report (/dev/kmsg) names the memory cgroup that hit its limit,
        whose path holds the container's id (`--cidfile`), and that cgroup's usage.
        Looked for only when the client exited 137 (the container's SIGKILL) or was
        SIGKILLed; None where /dev/kmsg is not readable (`kernel.dmesg_restrict` and no
        CAP_SYSLOG)."""
        if tid in self.running and (code != 0 or sig is not None):
            self.failed.add(tid)
        entry = self.cidfiles.get(tid)
        if entry is None or not (code == 137 or sig == signal.SIGKILL):
            return None
        cidfile, limit = entry
        cid = (read_file(cidfile, 256) or b"").strip().decode("ascii", "replace")
        if len(cid) < 12:
            return None
        used = kernel_oom_usage(cid)
        if used is None:
            return None
        used = max(used, limit)
        return oom_reason(used, limit), used

    def task_gone(self, tid: str, abnormal: bool) -> None:
        """The task `tid` is over: remove its container if it may be left over."""
        found = self.cidfiles.pop(tid, None)
        if found is not None:
            _unlink(found[0])
        entry = self.running.pop(tid, None)
        if tid in self.failed:
            self.failed.discard(tid)
            abnormal = True
        if entry is None:
            return
        name, _, exe = entry
        if abnormal:
            self._remove(exe, [name])
        self._drop_marker(name)

    def stale(self, rule: StaleRule) -> int:
        """Remove the containers other agents of this controller left (see the module
        docstring); returns how many."""
        found: Dict[str, List[str]] = {}
        markers = self._markers()
        for path, data in markers:
            agent = data.get("agent") or ""
            if agent == self.identity:
                continue
            job = job_part(str(data.get("tid") or ""))
            over = job not in rule.live and job.isdigit() and int(job) < rule.below
            dead = agent in rule.abandoned or _agent_dead(agent, rule.here)
            if over or dead:
                found.setdefault(str(data.get("exe") or ""), []).append(str(data["name"]))
                _unlink(path)
                _unlink(path + ".cid")
        for exe, names in found.items():
            if exe:
                self._remove(exe, names)
        return sum(len(n) for n in found.values())

    def spare(self, found: Dict[int, Proc], terming: bool, tagged: Mapping[int, str]) -> None:
        """Take out of a teardown's targets `found` what it must not signal: our `rm -f`
        processes, and while it only SIGTERMs (`terming`), the runtime's client (the
        task's main process) and monitor (conmon) of our containers. The container's own
        processes carry the task's tags: they get the SIGTERM, and the container exits;
        its monitor records that and removes it (`--rm`), and the client then exits with
        the container's status. A client signalled while the container starts hangs
        (podman 4.3) and a monitor killed first leaves the client waiting, both until
        SIGKILL; so neither is signalled before SIGKILL time (the agent does not SIGTERM
        a container task's process group either)."""
        for pid in self.helpers:
            found.pop(pid, None)
        if not terming or not self.running:
            return
        names = {entry[0] for entry in self.running.values()}
        spared = {pid for pid in found if _runtime_process_of(pid) in names}
        # with what they started (the monitor's `podman container cleanup`), except the
        # container's processes (tagged)
        while spared:
            for pid in spared:
                del found[pid]
            spared = {pid for pid, p in found.items() if p.ppid in spared and pid not in tagged}

    def reaped(self, pid: int) -> bool:
        """Whether `pid` was one of ours (a `rm -f`)."""
        if pid in self.helpers:
            self.helpers.discard(pid)
            return True
        return False

    # ------------------------------------------------------------------ internals

    def client_cwd(self, cwd: Optional[str]) -> Optional[str]:
        """Where the runtime's client runs: the agent's containers folder (podman's conmon
        writes an `oom` file into its working directory when a container is killed for
        memory), else the task's own directory."""
        folder = self._dir()
        if not folder:
            return cwd
        try:
            os.makedirs(folder, 0o700, exist_ok=True)
        except OSError:
            return cwd
        return folder

    def _dir(self) -> str:
        return os.path.join(self.rundir, "containers") if self.rundir else ""

    def _write_marker(self, name: str, text: str) -> None:
        folder = self._dir()
        if not folder:
            return
        try:
            os.makedirs(folder, 0o700, exist_ok=True)
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        except OSError:
            pass  # the tag sweeps still cover its processes

    def _drop_marker(self, name: str) -> None:
        folder = self._dir()
        if folder:
            _unlink(os.path.join(folder, name))

    def _markers(self) -> List[Tuple[str, Dict[str, Any]]]:
        folder = self._dir()
        try:
            names = os.listdir(folder) if folder else []
        except OSError:
            return []
        out = []
        for n in names:
            path = os.path.join(folder, n)
            try:
                with open(path) as f:
                    data = json.loads(f.read())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("name"), str):
                out.append((path, data))
        return out

    def _remove(self, exe: str, names: List[str]) -> None:
        """`exe rm -f NAMES`, tried up to RM_TRIES times a second apart, at least RM_AT_LEAST,
        until `inspect` finds none of them: a first try that races the container's own teardown (its
        client's and monitor's `--rm`) can leave it "Stopping" or "Exited" (podman 4.3),
        and the next one removes it."""
        opts = "--time 0 " if os.path.basename(exe) == "podman" else ""  # no stop timeout
        # done once none of them is there any more, from the RM_AT_LEAST-th try on: a `rm -f`
        # racing the container's own cleanup was seen to succeed and leave it "Exited",
        # and a client killed while its container was being created leaves the runtime
        # to finish creating it a moment later (a failed MPI job's other ranks)
        script = (
            'for i in %s; do "$0" rm -f %s"$@" >/dev/null 2>&1; left=; for n in "$@"; do '
            '"$0" inspect --format . "$n" >/dev/null 2>&1 && left=1; done; '
            '[ -z "$left" ] && [ "$i" -ge %d ] && exit 0; sleep 1; done; exit 1'
        ) % (" ".join(str(i) for i in range(RM_TRIES)), opts, RM_AT_LEAST - 1)
        argv = ["/bin/sh", "-c", script, exe] + names
        try:
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
            pid = os.posix_spawn(
                argv[0],
                argv,
                dict(os.environ),
                file_actions=actions,
                setsid=True,
                setsigdef=(signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGCHLD),
            )
            self.helpers.add(pid)
        except (OSError, AttributeError, NotImplementedError):
            pass
        finally:
            os.close(devnull)


def kernel_oom_usage(cid: str) -> Optional[int]:
    """The memory (bytes) of the cgroup whose path holds `cid` when the kernel's OOM
    killer last acted for its limit (`oom-kill:...,oom_memcg=.../<cid>...`, after
    `memory: usage NkB, limit ...` of the same report), from /dev/kmsg; None when the
    log has no such kill or cannot be read."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    records = []
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # overwritten while read: go on from the next
                continue
            except OSError:
                break
            if not record:
                break
            records.append(record.decode("utf-8", "replace").partition(";")[2])
    finally:
        os.close(fd)
    return oom_usage_in(records, cid)


def oom_usage_in(messages: List[str], cid: str) -> Optional[int]:
    """`kernel_oom_usage` on the kernel log's messages (without their /dev/kmsg prefix)."""
    usage = 0
    found = None
    for text in messages:
        if text.startswith("memory: usage "):
            word = text[len("memory: usage ") :].split(",")[0]
            if word.endswith("kB") and word[:-2].isdigit():
                usage = int(word[:-2]) * 1024
        elif text.startswith("oom-kill:"):
            for part in text.split(","):
                if part.startswith("oom_memcg=") and cid in part:
                    found = usage
    return found


def _runtime_process_of(pid: int) -> Optional[str]:
    """The container a runtime client (`podman run ... --name NAME`) or monitor (`conmon
    ... -n NAME`) process is for, or None."""
    data = read_file("/proc/%d/cmdline" % pid, 1 << 16)
    if not data:
        return None
    argv = data.split(b"\0")
    prog = os.path.basename(argv[0])
    if prog == b"conmon":
        flags: Tuple[bytes, ...] = (b"-n", b"--name")
    elif prog in (b"podman", b"docker") and argv[1:2] == [b"run"]:
        flags = (b"--name",)
    else:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg in flags:
            return argv[i + 1].decode("utf-8", "surrogateescape")
    return None


def _agent_dead(identity: str, here: str) -> bool:
    parts = identity.split(":")
    if len(parts) != 3:
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    p = read_stat(pid)
    return agent_alive(identity, here, {pid: p} if p is not None else {}) is False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class ContainerStep(Step):
    """The teardowns' part of containers: a teardown spares our `rm -f`s and, until
    SIGKILL time, the runtime's client and monitor (`Containers.spare`), a container
    task's process group gets no SIGTERM, and `stale` removes the containers that other
    agents left (their count is not in the reply's `killed`: containers, not processes,
    as before)."""

    def __init__(self, containers: Containers) -> None:
        self.containers = containers

    def begin(self, td: Teardown) -> None:
        if td.kind == "stale" and td.rule is not None:
            self.containers.stale(td.rule)

    def spare(self, td: Teardown, found: Dict[int, Proc], snap: Snapshot, killing: bool) -> None:
        self.containers.spare(found, not killing, snap.tags)

    def spares_group(self, task: Task) -> bool:
        return task.tid in self.containers.running
