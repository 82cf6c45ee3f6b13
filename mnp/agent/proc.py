"""The processes of this host as the agent sees them: /proc, prctl and signals.

Linux only. Everything here reads /proc directly with os.open/os.read (cheaper than
psutil, and available on every node); a process that vanishes or cannot be read
mid-scan is simply skipped.
"""

from __future__ import annotations

import os
import signal
import time

from .jobid import top_of

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Dict, Iterable, List, Optional, Set, Tuple


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_PF_KTHREAD = 0x00200000
_DEAD = ("Z", "X", "x")


class Proc:
    """One line of /proc/PID/stat; `(pid, start)` names a process across pid reuse."""

    __slots__ = ("pid", "ppid", "pgrp", "sid", "start", "state", "comm")

    def __init__(
        self, pid: int, ppid: int, pgrp: int, sid: int, start: int, state: str, comm: bytes = b""
    ):
        self.pid = pid
        self.ppid = ppid
        self.pgrp = pgrp
        self.sid = sid
        self.start = start
        self.state = state
        self.comm = comm  # the program's name; an exec changes it (the pid and start stay)

    @property
    def dead(self) -> bool:
        return self.state in _DEAD


def read_file(path: str, limit: int = 1 << 24) -> Optional[bytes]:
    """The whole file, or None when it cannot be read (gone, no permission)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        parts: List[bytes] = []
        size = 0
        while size < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_stat(pid: int) -> Optional[Proc]:
    """The process's stat line, or None if it is gone or a kernel thread."""
    try:  # one read: the kernel writes the line, well under 4 KiB, whole
        fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not data:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    end = data.rfind(b")")
    fields = data[end + 2 :].split()
    try:
        if int(fields[6]) & _PF_KTHREAD:
            return None
        return Proc(
            pid,
            int(fields[1]),
            int(fields[2]),
            int(fields[3]),
            int(fields[19]),
            fields[0].decode("ascii", "replace"),
            data[data.find(b"(") + 1 : end],
        )
    except (IndexError, ValueError):
        return None


def job_part(tid: str) -> str:
    """`42` for `42`, `42:7`, `42#3` and `42#3.1`: the top of the id (`jobid.top_of`)."""
    return top_of(tid)


class Tagger:
    """Reads the `MNP_JOB_ID` of processes that carry this controller's token."""

    def __init__(self, ctl: str) -> None:
        self.needle = b"\0MNP_CONTROLLER_ID=" + ctl.encode("utf-8", "surrogateescape") + b"\0"
        # (pid, start, comm) -> its tags, from the last scan, for processes older than a
        # second: a process's environment is fixed at its exec, and an exec of another
        # program changes comm (one of the same program, right after a fork, may not)
        self.known: Dict[Tuple[int, int, bytes], Optional[Tuple[str, Optional[str]]]] = {}

    def tag(self, pid: int) -> Optional[str]:
        found = self.tags(pid)
        return None if found is None else found[0]

    def tags(self, pid: int) -> Optional[Tuple[str, Optional[str]]]:
        """`(MNP_JOB_ID, MNP_AGENT_ID)` of the process, from one read of its environment,
        if it carries this controller's token and a job id."""
        data = read_file("/proc/%d/environ" % pid)
        if not data:
            return None
        data = b"\0" + data if data.endswith(b"\0") else b"\0" + data + b"\0"
        if self.needle not in data:
            return None
        job = _variable(data, b"MNP_JOB_ID")
        return None if job is None else (job, _variable(data, b"MNP_AGENT_ID"))


def _variable(environ: bytes, name: bytes) -> Optional[str]:
    """The value of `name` in `environ` (NUL-separated, starting and ending with NUL)."""
    key = b"\0" + name + b"="
    i = environ.find(key)
    if i < 0:
        return None
    i += len(key)
    return environ[i : environ.index(b"\0", i)].decode("utf-8", "surrogateescape")


def agent_identity() -> str:
    """`BOOT_ID.PIDNS:PID:START` of this process: names it across pid reuse, reboots and
    pid namespaces (containers sharing a kernel see other pids), so that a later agent
    can tell whether the agent that started a task still runs."""
    boot = (read_file("/proc/sys/kernel/random/boot_id") or b"").strip().decode("ascii", "replace")
    try:
        ns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        ns = ""
    me = read_stat(os.getpid())
    if not boot or not ns or me is None:
        return ""
    return "%s.%s:%d:%d" % (boot, ns, me.pid, me.start)


def agent_alive(identity: str, here: str, procs: Dict[int, Proc]) -> Optional[bool]:
    """Whether the agent named by `identity` runs, according to `procs` (the processes of
    `here`, the `BOOT_ID.PIDNS` of this agent); None when it cannot be told (another
    machine or pid namespace, or no identity)."""
    parts = identity.split(":")
    if len(parts) != 3 or not here or parts[0] != here:
        return None
    try:
        pid, start = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    p = procs.get(pid)
    return p is not None and p.start == start and not p.dead


class Snapshot:
    """Every process on the host at one moment, indexed the ways teardown looks them up."""

    def __init__(
        self,
        procs: Dict[int, Proc],
        tags: Dict[int, str],
        protected: Set[int],
        agents: Optional[Dict[int, str]] = None,
    ):
        self.procs = procs
        self.tags = tags
        self.agents = agents or {}  # tagged pid -> the MNP_AGENT_ID it carries
        self.protected = protected
        self.children: Dict[int, List[int]] = {}
        self.by_group: Dict[int, List[int]] = {}
        for p in procs.values():
            self.children.setdefault(p.ppid, []).append(p.pid)
            self.by_group.setdefault(p.pgrp, []).append(p.pid)
            if p.sid != p.pgrp:
                self.by_group.setdefault(p.sid, []).append(p.pid)
        self.by_tag: Dict[str, List[int]] = {}
        for pid, tag in tags.items():
            self.by_tag.setdefault(tag, []).append(pid)

    def tree(self, seeds: Iterable[int]) -> Dict[int, Proc]:
        """The live, unprotected processes among `seeds` and all their descendants."""
        out: Dict[int, Proc] = {}
        seen: Set[int] = set()
        stack = [pid for pid in seeds if pid in self.procs]
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            p = self.procs[pid]
            if not p.dead and pid not in self.protected:
                out[pid] = p
            stack.extend(self.children.get(pid, ()))
        return out


def snapshot(tagger: Tagger) -> Snapshot:
    procs: Dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read_stat(int(name))
            if p is not None:
                procs[p.pid] = p
    # never signal the agent itself or what started it (a controller may run inside a task)
    protected: Set[int] = {0, 1}
    pid = os.getpid()
    while pid in procs and pid not in protected:
        protected.add(pid)
        pid = procs[pid].ppid
    tags: Dict[int, str] = {}
    agents: Dict[int, str] = {}
    known = tagger.known
    seen: Dict[Tuple[int, int, bytes], Optional[Tuple[str, Optional[str]]]] = {}
    settled = now_ticks() - _HZ  # younger ones may not have exec'd yet: read every time
    for p in procs.values():
        if not p.dead and p.pid not in protected:
            key = (p.pid, p.start, p.comm)
            found = known[key] if key in known else tagger.tags(p.pid)
            if p.start < settled:
                seen[key] = found
            if found is not None:
                tags[p.pid] = found[0]
                if found[1] is not None:
                    agents[p.pid] = found[1]
    tagger.known = seen
    return Snapshot(procs, tags, protected, agents)


def children_list() -> Optional[bytes]:
    """/proc/PID/task/PID/children of the agent: its children, orphans it adopted as
    subreaper included, as "PID PID ... "; None when the kernel lacks it
    (CONFIG_PROC_CHILDREN)."""
    pid = os.getpid()
    return read_file("/proc/%d/task/%d/children" % (pid, pid))


def pipe_inodes(pid: int, limit: int = 64) -> Set[int]:
    """The inodes of the pipes among the process's first `limit` descriptors (a task's
    output pipes, inherited by what it starts unless that closes or redirects them)."""
    base = "/proc/%d/fd" % pid
    try:
        names = os.listdir(base)
    except OSError:
        return set()
    out: Set[int] = set()
    for name in names[:limit]:
        try:
            link = os.readlink(base + "/" + name)
        except OSError:
            continue
        if link.startswith("pipe:["):
            try:
                out.add(int(link[6:-1]))
            except ValueError:
                pass
    return out


_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
try:
    _HZ = os.sysconf("SC_CLK_TCK")
except (ValueError, OSError):
    _HZ = 100


def now_ticks() -> int:
    """Now, in the unit and from the origin of /proc/PID/stat's start time (clock ticks
    since boot), rounded down: a process started after this call has a start >= it."""
    return int(time.clock_gettime(_CLOCK) * _HZ)


def agent_children() -> Optional[List[int]]:
    data = children_list()
    return None if data is None else [int(x) for x in data.split()]


def send(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except OSError:  # gone, or not ours to signal
        return False


def send_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except OSError:
        return False


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except OSError:
        return True


def prctl(option: int, value: int) -> bool:
    """prctl(2) through ctypes; False where it is not available or refused."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except Exception:
        return False


def default_signals() -> List[int]:
    """Signals a task must start with at their default action, whatever the agent inherited
    (Python ignores SIGPIPE; nohup and `&` ignore SIGHUP, SIGINT and SIGQUIT)."""
    skip = (signal.SIGKILL, signal.SIGSTOP)
    return [s for s in range(1, 32) if s not in skip]


def cloexec_inherited() -> None:
    """Mark every inherited descriptor above 2 close-on-exec so no task inherits it."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
