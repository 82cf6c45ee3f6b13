"""The node agent's loop: reads ops on stdin, runs tasks, reports events on stdout.

Lifecycle of a task: `spawn` → `started` → `out`... → main process reaped →
`exited` → (anything of it left? tear it down) → `gone`. The common case, a task
that leaves nothing behind, costs one killpg(pgid, 0) and one read of the agent's
children list after the reap; only leftovers, `kill`, `sweep` and shutdown scan
/proc (one scan per tick, shared by every teardown in progress).

Where things are: the op table and the small ops in ops.py; what happens on `spawn`
in spawn.py; how a task is torn down (and every other kill) in teardown.py; the
`sweep` and `stale` sweeps in sweep.py. Here: the loop, signals, reading ops, reaping
exits, attributing adopted orphans, shutdown.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from .containers import Containers, ContainerStep
from .facts import collect, make_rundir
from .limits import CgroupStep, Limits
from .loop import LineReader, Loop, Output
from .ops import OPS
from .proc import (
    Tagger,
    agent_children,
    agent_identity,
    children_list,
    group_exists,
    pipe_inodes,
    read_stat,
    send,
    send_group,
    snapshot,
)
from .ranks import Ranks
from .request import BadRequest
from .spawn import Spawner
from .tasks import INF, Orphan, Teardown
from .teardown import Teardowns

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Dict, List, Optional, Sequence, Set

    from .loop import Timer
    from .proc import Proc, Snapshot
    from .tasks import Task


MAX_LINE = 16 << 20
BUSY_CHILDREN = 64  # with more children than this, exits are checked for orphans in batches
CHECK_BATCH = 0.002
ORPHAN_POLL = 1.0  # seconds between looks for new orphans while tasks run
CLOCK_SLACK = 2  # clock ticks: a task started this much after an orphan may still own it
PORTS_REMEMBERED = 256  # ports handed out (`port`, a spawn's `port_env`) not given again
FEATURES = ("port_env",)  # what `ready` lists beyond the ops: spawn fields newer agents take


class Agent:
    def __init__(self, ctl: str, grace: float, out: Optional[Output] = None) -> None:
        self.ctl = ctl
        self.grace = grace
        self.pid = os.getpid()
        self.started = time.time()
        self.loop = Loop()
        self.out = out if out is not None else Output()
        self.env = dict(os.environ)
        self.envs: Dict[str, Dict[str, str]] = {}  # `pyenv` → self.env with it activated
        self.tagger = Tagger(ctl)
        self.identity = agent_identity()  # MNP_AGENT_ID of its tasks
        self.spawner = Spawner()
        self.ranks = Ranks(self)  # MPI ranks' PMI servers (ranks.py)
        self.tasks: Dict[str, Task] = {}  # until `gone`
        self.by_pid: Dict[int, Task] = {}  # main process → task, until reaped
        self.all_tids: Set[str] = set()  # every tid this agent started: what shutdown sweeps
        self.orphans: Dict[int, Orphan] = {}  # adopted, until reaped
        self.poll_timer: Optional[Timer] = None
        self.teardowns = Teardowns(self)
        self.limits = Limits(self)  # memory limits, CPU binding, usage (limits.py)
        self.teardowns.steps.append(CgroupStep(self.limits))
        self.containers = Containers(ctl, self.identity)  # a spawn's container (containers.py)
        self.teardowns.steps.append(ContainerStep(self.containers))
        self.unchecked: List[Task] = []  # exited, waiting for the orphan check
        self.check_timer: Optional[Timer] = None
        self.input: Optional[LineReader] = None
        self.stopping = False
        self.signals: List[int] = []
        self.ports_given: List[int] = []  # the last PORTS_REMEMBERED handed out, oldest first
        self.ports_keyed: Dict[str, int] = {}  # `port_key` of a spawn → the port it got
        self.rundir = ""
        self.nvml = False  # the facts said NVML works: GPU usage is sampled (gpu.py)

    # ---------------------------------------------------------------- running

    def start(self) -> None:
        """Catch signals (first: no SIGCHLD is lost) and say `ready`."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.loop.add_reader(wake_r, self._on_wakeup)
        self.rundir = make_rundir(self.ctl)
        self.containers.rundir = self.rundir
        self.out.emit(dict(ev="ready", **self.facts()))
        self.out.flush()

    def listen(self) -> None:
        """Start taking ops from stdin."""
        self.input = LineReader(self.loop, 0, self._line, self._error, self._on_eof, MAX_LINE)

    def run(self) -> int:
        try:
            while not (self.stopping and not self.tasks and not self.teardowns.active):
                self.out.flush()
                self.loop.run_once()
                if self.signals:
                    self._handle_signals()
        except BaseException:
            self._emergency()
            raise
        finally:
            self.limits.close()
            self.out.close()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum != signal.SIGCHLD:
            self.signals.append(signum)

    def _on_wakeup(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except OSError:
            pass
        self._reap()

    def _handle_signals(self) -> None:
        sigs, self.signals = self.signals, []
        for sig in sigs:
            if sig in (signal.SIGTERM, signal.SIGHUP):
                # a second one means: no more grace
                self.shutdown(0.0 if self.stopping else self.grace, detached=True)
            # SIGINT (a Ctrl-C meant for the controller) is the controller's to act on

    def _emergency(self) -> None:
        """The loop itself failed: kill everything we know of before dying."""
        for task in list(self.tasks.values()):
            send_group(task.pid, signal.SIGKILL)
        for pid in agent_children() or ():
            send(pid, signal.SIGKILL)

    # ---------------------------------------------------------------- input

    def _on_eof(self) -> None:
        self.shutdown(self.grace, detached=True)

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            msg = json.loads(line)
        except ValueError as e:
            self._error("not a JSON object: %s: %.80r" % (e, line))
            return
        if not isinstance(msg, dict):
            self._error("not a JSON object: %.80r" % (line,))
            return
        op = msg.get("op")
        handler = OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            self._error("unknown op %.80r" % (op,), msg)
            return
        try:
            handler(self, msg)
        except BadRequest as e:
            self._error("%s: %s" % (op, e), msg)
        except Exception as e:  # a bug must not take the tasks down with the agent
            import traceback

            traceback.print_exc(file=sys.stderr)
            self._error("%s failed: %s: %s" % (op, type(e).__name__, e), msg)

    def _error(self, text: str, msg: Optional[Dict[str, Any]] = None) -> None:
        event: Dict[str, Any] = {"ev": "error", "msg": text}
        if msg is not None and isinstance(msg.get("tid"), str):
            event["tid"] = msg["tid"]
        self.out.emit(event)

    def facts(self) -> Dict[str, Any]:
        """The body of `ready` and `facts`."""
        body = dict(
            agent_id=self.identity,
            ops=sorted(OPS),
            features=list(FEATURES),
            **collect(self.started, self.rundir),
        )
        self.nvml = bool(body.get("nvml"))
        return body

    def shutdown(self, grace: float, detached: bool) -> None:
        """Kill every task and everything tagged with a tid we started, then exit."""
        if detached:
            self.out.detach()
        if self.input is not None:
            self.input.stop()
        self.stopping = True
        for task in list(self.tasks.values()):
            if not task.gone:
                self.teardowns.start("t:" + task.tid, "task", task.tid, task, grace)
        termed = [t for t in self.tasks.values() if t.termed and not t.reaped]
        self.teardowns.start("*", "all", "*", None, grace, termed)

    # ---------------------------------------------------------------- tasks and exits

    def free_port(self, key: Optional[str] = None) -> int:
        """A TCP port free on this host now (bound to port 0 and released), none of the
        last PORTS_REMEMBERED handed out. With `key`: the port handed out for that key
        before, if any (the tasks of one main node share its MASTER_PORT)."""
        if key is not None and key in self.ports_keyed:
            return self.ports_keyed[key]
        import socket

        given = self.ports_given
        for _ in range(20):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("", 0))
                port = int(sock.getsockname()[1])
            if port not in given:
                break
        given.append(port)
        del given[:-PORTS_REMEMBERED]
        if key is not None:
            self.ports_keyed[key] = port
            while len(self.ports_keyed) > PORTS_REMEMBERED:
                del self.ports_keyed[next(iter(self.ports_keyed))]
        return port

    def add(self, task: Task, port: Optional[int] = None) -> None:
        """A task just spawned (spawn.py): its main process is the agent's to reap.
        `port`: the one its spawn's `port_env` got, said in `started`."""
        self.tasks[task.tid] = task
        self.by_pid[task.pid] = task
        self.all_tids.add(task.tid)
        event = {"ev": "started", "tid": task.tid, "pid": task.pid, "t": time.time()}
        if port is not None:
            event["port"] = port
        self.out.emit(event)
        if self.poll_timer is None:
            self.poll_timer = self.loop.call_later(ORPHAN_POLL, self._poll_orphans)

    def _reap(self) -> None:
        reaped = False
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            task = self.by_pid.pop(pid, None)
            if task is None:
                self.containers.reaped(pid)  # perhaps an `rm -f` of a container
                self.orphans.pop(pid, None)
                reaped = True  # perhaps something a teardown waits for
            else:
                # a teardown (its own, or a sweep: it set a deadline) may wait for it
                waited = task.teardown is not None or task.termed or task.deadline < INF
                reaped = reaped or waited
                if not task.gone:
                    self._exited(task, status, rusage)
        if reaped:
            self.teardowns.reaped()

    def _exited(self, task: Task, status: int, rusage: Any = None) -> None:
        task.reaped = True
        if task.feeder is not None:
            task.feeder.close()
        for stream in task.streams:
            stream.drain()  # everything the main process wrote comes before `exited`
        code: Optional[int] = None
        sig: Optional[int] = None
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
        else:
            code = os.WEXITSTATUS(status)
        self.ranks.exited(task, code, sig)  # an MPI rank's abort comes before its exit
        now = time.time()
        usage, error = self.limits.exit_report(task, rusage, code, sig)
        oom = self.containers.exited(task.tid, code, sig)  # podman/docker's own limit
        if oom is not None:
            error, usage["max_rss_bytes"] = oom
        event: Dict[str, Any] = {"ev": "exited", "tid": task.tid, "code": code, "signal": sig}
        event["t"] = now
        event["usage"] = usage
        if error is not None:
            event["error"] = error
        self.out.emit(event)
        if task.teardown is not None:
            return
        if group_exists(task.pid):
            self.teardowns.start("t:" + task.tid, "task", task.tid, task, self.grace)
            return
        # orphans it left to us: looked for once for all the exits of this moment
        self.unchecked.append(task)
        if self.check_timer is None:
            busy = len(self.by_pid) + len(self.orphans) > BUSY_CHILDREN
            self.check_timer = self.loop.call_later(CHECK_BATCH if busy else 0.0, self._check)

    def _check(self) -> None:
        """`gone` for the exited tasks that left no orphan, teardown for the others."""
        self.check_timer = None
        tasks, self.unchecked = self.unchecked, []
        listed = self.discover()
        snap: Optional[Snapshot] = None
        for task in tasks:
            if task.gone or task.teardown is not None:
                continue
            if listed:
                left = bool(self.orphan_seeds({task.tid}, None))
            else:
                snap = snap or snapshot(self.tagger)
                probe = Teardown("", "task", task.tid, task, 0.0)
                left = bool(self.teardowns.targets_of(probe, snap))
            if left:
                self.teardowns.start("t:" + task.tid, "task", task.tid, task, self.grace)
            else:
                self.gone(task, 0)

    def _poll_orphans(self) -> None:
        """While tasks run, look for new orphans once in a while (a read of the children
        list): one adopted while a task runs is then attributed while the exits around
        it are few."""
        self.poll_timer = None
        self.discover()
        if self.by_pid and not self.stopping:
            self.poll_timer = self.loop.call_later(ORPHAN_POLL, self._poll_orphans)

    def discover(self, snap: Optional[Snapshot] = None) -> bool:
        """Attribute the orphans we adopted since we last looked (from `snap`, or from
        the kernel's children list: False when it cannot list them). Reading the list
        costs about 0.5 us a child; parsing it is skipped when its length shows no child
        we do not know."""
        if snap is not None:
            pids: Sequence[int] = snap.children.get(self.pid, ())
        else:
            data = children_list()
            if data is None:
                return False
            if data.count(b" ") == len(self.by_pid) + len(self.orphans):
                return True
            pids = [int(x) for x in data.split()]
        for pid in pids:
            if pid in self.by_pid or pid in self.orphans or pid in self.containers.helpers:
                continue  # (helpers: the containers' `rm -f`s)
            p = snap.procs.get(pid) if snap is not None else read_stat(pid)
            if p is None or p.dead:
                continue
            tag = snap.tags.get(pid) if snap is not None else self.tagger.tag(pid)
            owners = self._attribute(p, tag)
            self.orphans[pid] = Orphan(pid, p.start, owners)
            if not owners:  # left by tasks that are over: it goes now
                self.teardowns.start("o:%d" % pid, "stray", str(pid), None, self.grace)
        return True

    def _attribute(self, p: Proc, tag: Optional[str]) -> Set[str]:
        """The tasks an orphan may belong to (see tasks.Orphan): the one whose session
        or process group it is in, whose tag it carries, or whose output pipes it holds;
        else those started before it, and of these the ones whose main process has
        ended (its death is what made the orphan) if any."""
        live = [t for t in self.tasks.values() if not t.gone]
        for t in live:
            if p.sid == t.pid or p.pgrp == t.pid:
                return {t.tid}
        if tag is not None:
            owner = self.tasks.get(tag)
            if owner is not None and not owner.gone:
                return {tag}
        held = pipe_inodes(p.pid)
        if held:
            for t in live:
                if t.pipes & held:
                    return {t.tid}
        before = [t for t in live if t.born_ticks <= p.start + CLOCK_SLACK]
        ended = [t for t in before if t.reaped]
        return {t.tid for t in (ended or before)}

    def orphan_seeds(self, tids: Set[str], snap: Optional[Snapshot]) -> List[int]:
        """The adopted orphans a teardown of the tasks `tids` must kill: those that may
        belong to no other task. Those that may also belong to another drop these
        owners (the last owner to end kills them)."""
        seeds: List[int] = []
        for o in list(self.orphans.values()):
            if o.owners.isdisjoint(tids):
                continue
            if o.owners <= tids:
                p = snap.procs.get(o.pid) if snap is not None else read_stat(o.pid)
                if p is not None and p.start == o.start and not p.dead:
                    seeds.append(o.pid)
            else:
                o.owners -= tids
        return seeds

    def gone(self, task: Task, killed: int) -> None:
        task.gone = True
        for stream in task.streams:
            stream.drain()
            stream.close()
        if task.feeder is not None:
            task.feeder.close()
        if self.tasks.get(task.tid) is task:
            del self.tasks[task.tid]
        self.limits.release(task)
        self.containers.task_gone(task.tid, task.termed or killed > 0)
        self.ranks.gone(task)
        self.out.emit({"ev": "gone", "tid": task.tid, "t": time.time(), "killed": killed})
