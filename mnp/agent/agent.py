"""The node agent: reads ops on stdin, runs tasks, reports events on stdout.

Lifecycle of a task: `spawn` → `started` → `out`... → main process reaped →
`exited` → (anything of it left? tear it down) → `gone`. The common case, a task
that leaves nothing behind, costs one killpg(pgid, 0) and one read of the agent's
children list after the reap; only leftovers, `kill`, `sweep` and shutdown scan
/proc (one scan per tick, shared by every teardown in progress).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from .containers import Containers
from .expand import expand
from .facts import collect, load, make_rundir
from .loop import Feeder, LineReader, Loop, Output, Stream
from .proc import (
    Tagger,
    agent_children,
    agent_identity,
    children_list,
    group_exists,
    job_part,
    now_ticks,
    pipe_inodes,
    read_stat,
    send,
    send_group,
    snapshot,
)
from .spawn import Spawner, SpawnError, task_env, with_python_env, write_files
from .tasks import FIRST_CHECK, INF, MAX_CHECK, Orphan, StaleRule, Task, Teardown, targets

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

    from .loop import Timer
    from .proc import Proc, Snapshot


MAX_LINE = 16 << 20
GIVE_UP = 5.0  # seconds after SIGKILL before a teardown reports survivors and ends
BUSY_CHILDREN = 64  # with more children than this, exits are checked for orphans in batches
CHECK_BATCH = 0.002
PRE_WAIT = 0.05  # how long a teardown waits for a main process it sent SIGTERM to die
SETTLED = 0.1  # a sweep SIGTERMs a task of its job before scanning once it ran this long
PORTS_REMEMBERED = 256
ORPHAN_POLL = 1.0  # seconds between looks for new orphans while tasks run
CLOCK_SLACK = 2  # clock ticks: a task started this much after an orphan may still own it


class BadRequest(Exception):
    pass


def _now() -> float:
    return time.time()


class Agent:
    def __init__(self, ctl: str, grace: float, out: Optional[Output] = None) -> None:
        self.ctl = ctl
        self.grace = grace
        self.pid = os.getpid()
        self.started = _now()
        self.loop = Loop()
        self.out = out if out is not None else Output()
        self.env = dict(os.environ)
        self.envs: Dict[str, Dict[str, str]] = {}  # `pyenv` → self.env with it activated
        self.tagger = Tagger(ctl)
        self.identity = agent_identity()  # MNP_AGENT_ID of its tasks
        self.spawner = Spawner()
        self.tasks: Dict[str, Task] = {}  # until `gone`
        self.by_pid: Dict[int, Task] = {}  # main process → task, until reaped
        self.all_tids: Set[str] = set()  # every tid this agent started: what shutdown sweeps
        self.orphans: Dict[int, Orphan] = {}  # adopted, until reaped
        self.poll_timer: Optional[Timer] = None
        self.teardowns: Dict[str, Teardown] = {}
        self.tick_timer: Optional[Timer] = None
        self.last_tick = 0.0
        self.tick_gap = FIRST_CHECK
        self.unchecked: List[Task] = []  # exited, waiting for the orphan check
        self.check_timer: Optional[Timer] = None
        self.input: Optional[LineReader] = None
        self.stopping = False
        self.signals: List[int] = []
        self.ports_given: List[int] = []
        self.rundir = ""
        self.containers = Containers(ctl, self.identity)  # issue 14: containers
        self.ops: Dict[str, Callable[[Dict[str, Any]], None]] = {
            "spawn": self.op_spawn,
            "signal": self.op_signal,
            "kill": self.op_kill,
            "sweep": self.op_sweep,
            "stale": self.op_stale,
            "ping": self.op_ping,
            "facts": self.op_facts,
            "port": self.op_port,
            "load": self.op_load,
            "shutdown": self.op_shutdown,
        }

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
        self.containers.rundir = self.rundir  # issue 14: containers
        self.out.emit(dict(ev="ready", **self._facts()))
        self.out.flush()

    def listen(self) -> None:
        """Start taking ops from stdin."""
        self.input = LineReader(self.loop, 0, self._line, self._error, self._on_eof, MAX_LINE)

    def run(self) -> int:
        try:
            while not (self.stopping and not self.tasks and not self.teardowns):
                self.out.flush()
                self.loop.run_once()
                if self.signals:
                    self._handle_signals()
        except BaseException:
            self._emergency()
            raise
        finally:
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
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            self._error("unknown op %.80r" % (op,), msg)
            return
        try:
            handler(msg)
        except BadRequest as e:
            self._error("%s: %s" % (op, e), msg)
        except Exception as e:  # a bug must not take the tasks down with the agent
            import traceback

            traceback.print_exc(file=sys.stderr)
            self._error("%s failed: %s: %s" % (op, type(e).__name__, e), msg)

    def _base_env(self, pyenv: Optional[str]) -> Dict[str, str]:
        """The agent's environment, with the Python environment `pyenv` activated when it
        exists on this host (checked once per agent and environment)."""
        if not pyenv:
            return self.env
        env = self.envs.get(pyenv)
        if env is None:
            env = self.envs[pyenv] = with_python_env(self.env, pyenv)
        return env

    def _error(self, text: str, msg: Optional[Dict[str, Any]] = None) -> None:
        event: Dict[str, Any] = {"ev": "error", "msg": text}
        if msg is not None and isinstance(msg.get("tid"), str):
            event["tid"] = msg["tid"]
        self.out.emit(event)

    # ---------------------------------------------------------------- ops

    def op_spawn(self, msg: Dict[str, Any]) -> None:
        tid = _tid(msg)
        argv = msg.get("argv")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise BadRequest("argv must be a non-empty list of strings")
        if not argv[0] or any("\0" in a for a in argv):
            raise BadRequest("argv[0] must not be empty and no argument may hold a NUL")
        changes = msg.get("env")
        if changes is None:
            changes = {}
        if not isinstance(changes, dict) or not all(_env_entry(k, v) for k, v in changes.items()):
            raise BadRequest("env must map names (no '=', no NUL) to strings or null")
        cwd = _opt(msg, "cwd", str)
        if cwd is not None and (not cwd or "\0" in cwd):
            raise BadRequest("cwd must be a non-empty path")
        pyenv = _opt(msg, "pyenv", str)
        do_expand = _opt(msg, "expand", bool)
        stdin = _opt(msg, "stdin", str)
        files = _files(msg)
        try:  # issue 14: containers
            container = self.containers.check(msg.get("container"))
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if tid in self.tasks:
            raise BadRequest("task %s is already on this agent" % tid)
        stale = self.teardowns.get("t:" + tid)
        if stale is not None:  # a `kill` of its previous run still sweeping the tag
            self._drop_tag_sweep(stale)
        if self.stopping:
            raise BadRequest("the agent is shutting down")

        env = task_env(self._base_env(pyenv), changes, tid, self.ctl, self.identity)
        if cwd is not None and "PWD" not in changes:
            env["PWD"] = cwd  # as a shell's cd would: the login shell's PWD is wrong here
        if do_expand is not False:
            argv = [expand(a, env) for a in argv]
        feed_r = feed_w = -1
        try:
            try:
                data = None if stdin is None else stdin.encode("utf-8", "surrogateescape")
                if data is not None:
                    feed_r, feed_w = os.pipe()
                if files:
                    write_files(files)
                if container is not None:  # issue 14: run it in its container
                    argv, env = self.containers.wrap_spawn(
                        container, tid, argv, env, changes, cwd, data is not None
                    )
                born_ticks = now_ticks()
                pid, out_fd, err_fd = self.spawner.spawn(
                    argv, env, cwd, feed_r if feed_r >= 0 else None
                )
            except ValueError as e:  # text the OS cannot take (a lone surrogate, ...)
                raise SpawnError(126, "%s: %s" % (argv[0], e)) from None
            finally:
                if feed_r >= 0:
                    os.close(feed_r)
        except SpawnError as e:
            self.containers.task_gone(tid, False)  # issue 14: containers
            if feed_w >= 0:
                os.close(feed_w)
            self.out.emit(
                {
                    "ev": "exited",
                    "tid": tid,
                    "code": e.code,
                    "signal": None,
                    "t": _now(),
                    "error": e.msg,
                }
            )
            self.out.emit({"ev": "gone", "tid": tid, "t": _now(), "killed": 0})
            return
        streams = [
            Stream(self.loop, self.out, tid, out_fd, 1),
            Stream(self.loop, self.out, tid, err_fd, 2),
        ]
        feeder = None if data is None else Feeder(self.loop, feed_w, data)
        pipes = set()
        for fd in (out_fd, err_fd):
            try:
                pipes.add(os.fstat(fd).st_ino)
            except OSError:
                pass
        task = Task(tid, pid, streams, feeder, time.monotonic(), born_ticks, pipes)
        self.tasks[tid] = task
        self.by_pid[pid] = task
        self.all_tids.add(tid)
        self.out.emit({"ev": "started", "tid": tid, "pid": pid, "t": _now()})
        if self.poll_timer is None:
            self.poll_timer = self.loop.call_later(ORPHAN_POLL, self._poll_orphans)

    def op_signal(self, msg: Dict[str, Any]) -> None:
        tid = _tid(msg)
        sig = msg.get("sig")
        if not isinstance(sig, int) or isinstance(sig, bool) or not 0 < sig < 65:
            raise BadRequest("sig must be a signal number")
        task = self.tasks.get(tid)
        if task is None:
            raise BadRequest("no task %s on this agent" % tid)
        if not send_group(task.pid, sig) and not task.reaped:
            send(task.pid, sig)

    def op_kill(self, msg: Dict[str, Any]) -> None:
        tid = _tid(msg)
        grace = self._grace(msg)
        task = self.tasks.get(tid)
        if task is not None:
            self._teardown("t:" + tid, "task", tid, task, grace)
            return
        # No task (any more): its `gone` was sent. Tids are reused by retries, so a second
        # `gone` would be read as the next attempt's: answer only if the tag is still on
        # this host, and tear that down.
        if ("t:" + tid) not in self.teardowns:
            probe = Teardown("", "tag", tid, None, 0.0)
            if not self._targets_of(probe, snapshot(self.tagger)):
                return
        self._teardown("t:" + tid, "tag", tid, None, grace)

    def op_sweep(self, msg: Dict[str, Any]) -> None:
        job = msg.get("job")
        if not isinstance(job, str) or not job:
            raise BadRequest("job must be a non-empty string")
        grace = self._grace(msg)
        kill_at = time.monotonic() + grace
        # the agent's own tasks of the job end as a `kill` with this grace would end them;
        # a teardown already under way keeps its course, with this deadline if sooner.
        # Those that run for SETTLED already get SIGTERM (their group) now, before the
        # first scan; younger ones are left to the scan, whose milliseconds let a task
        # started as the main node exited (`--nodes N -- echo`) finish its output.
        now = time.monotonic()
        termed: List[Task] = []
        for task in self.tasks.values():
            if task.gone or job_part(task.tid) != job:
                continue
            task.deadline = min(task.deadline, kill_at)  # for its leftovers, if any
            if task.teardown is not None:
                task.teardown.kill_at = min(task.teardown.kill_at, kill_at)
            if task.reaped:
                continue
            if not task.termed and now - task.born >= SETTLED:
                self._term_group(task)
            if task.termed:
                termed.append(task)
        self._teardown("s:" + job, "sweep", job, None, grace, termed)

    def op_stale(self, msg: Dict[str, Any]) -> None:
        live = msg.get("live")
        if not (isinstance(live, list) and all(isinstance(j, str) for j in live)):
            raise BadRequest("live must be a list of job ids")
        below = msg.get("below")
        if not isinstance(below, int) or isinstance(below, bool) or below < 0:
            raise BadRequest("below must be an integer >= 0")
        abandoned = msg.get("abandoned")
        if abandoned is None:
            abandoned = []
        if not (isinstance(abandoned, list) and all(isinstance(a, str) for a in abandoned)):
            raise BadRequest("abandoned must be a list of agent identities")
        grace = self._grace(msg)
        old = self.teardowns.get("stale")
        if old is not None:  # the newer list wins; what the old one found is killed at once
            self._drop_tag_sweep(old)
        here = self.identity.split(":", 1)[0]
        rule = StaleRule(set(live), below, here, self.tagger, self.identity, set(abandoned))
        self._teardown("stale", "stale", "", None, grace)
        self.teardowns["stale"].rule = rule
        self.containers.stale(rule)  # issue 14: containers

    def op_ping(self, msg: Dict[str, Any]) -> None:
        self.out.emit({"ev": "pong", "id": msg.get("id"), "t": _now()})

    def op_facts(self, msg: Dict[str, Any]) -> None:
        self.out.emit(dict(ev="facts", **self._facts()))

    def _facts(self) -> Dict[str, Any]:
        return dict(
            agent_id=self.identity, ops=sorted(self.ops), **collect(self.started, self.rundir)
        )

    def op_load(self, msg: Dict[str, Any]) -> None:
        self.out.emit(dict(ev="load", id=msg.get("id"), t=_now(), **load()))

    def op_port(self, msg: Dict[str, Any]) -> None:
        """A TCP port free on this host now (for MASTER_PORT), not one handed out lately."""
        import socket

        for _ in range(20):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("", 0))
                port = int(sock.getsockname()[1])
            if port not in self.ports_given:
                break
        self.ports_given.append(port)
        del self.ports_given[:-PORTS_REMEMBERED]
        self.out.emit({"ev": "port", "id": msg.get("id"), "port": port, "t": _now()})

    def op_shutdown(self, msg: Dict[str, Any]) -> None:
        self.shutdown(self._grace(msg), detached=False)

    def _grace(self, msg: Dict[str, Any]) -> float:
        grace = msg.get("grace")
        if grace is None:
            return self.grace
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
            raise BadRequest("grace must be a number of seconds >= 0")
        return float(grace)

    def shutdown(self, grace: float, detached: bool) -> None:
        """Kill every task and everything tagged with a tid we started, then exit."""
        if detached:
            self.out.detach()
        if self.input is not None:
            self.input.stop()
        self.stopping = True
        for task in list(self.tasks.values()):
            if not task.gone:
                self._teardown("t:" + task.tid, "task", task.tid, task, grace)
        termed = [t for t in self.tasks.values() if t.termed and not t.reaped]
        self._teardown("*", "all", "*", None, grace, termed)

    # ---------------------------------------------------------------- exits

    def _reap(self) -> None:
        reaped = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            task = self.by_pid.pop(pid, None)
            if task is None:
                self.containers.reaped(pid)  # issue 14: an `rm -f` of ours
                self.orphans.pop(pid, None)
                reaped = True  # perhaps something a teardown waits for
            else:
                # a teardown (its own, or a sweep: it set a deadline) may wait for it
                waited = task.teardown is not None or task.termed or task.deadline < INF
                reaped = reaped or waited
                if not task.gone:
                    self._exited(task, status)
        if reaped and self.teardowns:
            for td in self.teardowns.values():
                # look again now, not after the back-off; a teardown that has not scanned
                # yet waits until every main process it sent SIGTERM to is reaped
                if td.steps or not any(pid in self.by_pid for pid in td.pre):
                    td.next_check = 0.0
            self._tick_soon()

    def _exited(self, task: Task, status: int) -> None:
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
        self.out.emit({"ev": "exited", "tid": task.tid, "code": code, "signal": sig, "t": _now()})
        if task.teardown is not None:
            return
        if group_exists(task.pid):
            self._teardown("t:" + task.tid, "task", task.tid, task, self.grace)
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
        listed = self._discover()
        snap: Optional[Snapshot] = None
        for task in tasks:
            if task.gone or task.teardown is not None:
                continue
            if listed:
                left = bool(self._orphan_seeds({task.tid}, None))
            else:
                snap = snap or snapshot(self.tagger)
                left = bool(self._targets_of(Teardown("", "task", task.tid, task, 0.0), snap))
            if left:
                self._teardown("t:" + task.tid, "task", task.tid, task, self.grace)
            else:
                self._gone(task, 0)

    def _poll_orphans(self) -> None:
        """While tasks run, look for new orphans once in a while (a read of the children
        list): one adopted while a task runs is then attributed while the exits around
        it are few."""
        self.poll_timer = None
        self._discover()
        if self.by_pid and not self.stopping:
            self.poll_timer = self.loop.call_later(ORPHAN_POLL, self._poll_orphans)

    def _discover(self, snap: Optional[Snapshot] = None) -> bool:
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
                continue  # (issue 14: helpers are the containers' `rm -f`s)
            p = snap.procs.get(pid) if snap is not None else read_stat(pid)
            if p is None or p.dead:
                continue
            tag = snap.tags.get(pid) if snap is not None else self.tagger.tag(pid)
            owners = self._attribute(p, tag)
            self.orphans[pid] = Orphan(pid, p.start, owners)
            if not owners:  # left by tasks that are over: it goes now
                self._teardown("o:%d" % pid, "stray", str(pid), None, self.grace)
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

    def _orphan_seeds(self, tids: Set[str], snap: Optional[Snapshot]) -> List[int]:
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

    def _gone(self, task: Task, killed: int) -> None:
        task.gone = True
        for stream in task.streams:
            stream.drain()
            stream.close()
        if task.feeder is not None:
            task.feeder.close()
        if self.tasks.get(task.tid) is task:
            del self.tasks[task.tid]
        self.containers.task_gone(task.tid, task.termed or killed > 0)  # issue 14
        self.out.emit({"ev": "gone", "tid": task.tid, "t": _now(), "killed": killed})

    # ---------------------------------------------------------------- teardown

    def _teardown(
        self,
        key: str,
        kind: str,
        name: str,
        task: Optional[Task],
        grace: float,
        termed: Sequence[Task] = (),
    ) -> None:
        """Start (or hurry) a teardown. `termed`: tasks whose groups were just sent SIGTERM
        on its behalf (a sweep's own tasks; at shutdown, the "all" teardown's)."""
        now = time.monotonic()
        kill_at = now + grace
        td = self.teardowns.get(key)
        if td is not None:
            td.kill_at = min(td.kill_at, kill_at)
            td.next_check = 0.0
        else:
            td = self.teardowns[key] = Teardown(key, kind, name, task, kill_at)
            if task is not None:
                task.teardown = td
                td.kill_at = min(td.kill_at, task.deadline)  # a sweep's, if sooner
                if not task.reaped:
                    # SIGTERM its group now, before any scan
                    self._term_group(task)
                    termed = (task,)
                elif task.termed:
                    td.quiet.add(task.pid)
            # a main process just sent SIGTERM is given PRE_WAIT to die before the first
            # scan (its reap cuts the wait short): the one scan then finds it gone
            td.next_check = now + PRE_WAIT if termed else 0.0
        for t in termed:
            td.quiet.add(t.pid)
            td.pre.add(t.pid)
        self._tick_soon(min(td.next_check, td.kill_at))

    def _term_group(self, task: Task) -> None:
        """SIGTERM the task's process group, once; no teardown signals its members again."""
        if not task.termed:
            if task.tid not in self.containers.running:  # issue 14: see Containers.spare
                send_group(task.pid, signal.SIGTERM)
            task.termed = True
            for td in self.teardowns.values():
                td.quiet.add(task.pid)

    def _tick_soon(self, at: float = 0.0) -> None:
        """Scan at `at` or as soon after as allowed: scans are spaced by twice the CPU time
        the last one took (and 5 ms), so teardowns never take more than a third of the
        agent's time."""
        when = max(at, time.monotonic(), self.last_tick + self.tick_gap)
        if self.tick_timer is not None:
            if self.tick_timer[0] <= when:
                return
            self.loop.cancel(self.tick_timer)
        self.tick_timer = self.loop.call_at(when, self._tick)

    def _tick(self) -> None:
        """One /proc scan, then every teardown due takes its next step."""
        self.tick_timer = None
        if not self.teardowns:
            return
        cpu = time.process_time()
        snap = snapshot(self.tagger)
        now = time.monotonic()
        self.last_tick = now
        # spaced by the scan's CPU time, not its wall time: on a busy machine the wall
        # time is mostly waiting for a core, and the gap would balloon with it
        self.tick_gap = max(FIRST_CHECK, 2 * (time.process_time() - cpu))
        for td in list(self.teardowns.values()):
            if td.next_check <= now or (td.killing_since is None and td.kill_at <= now):
                self._step(td, snap, now)
        if self.teardowns:
            when = min(
                td.next_check if td.killing_since is not None else min(td.next_check, td.kill_at)
                for td in self.teardowns.values()
            )
            self.loop.cancel(self.tick_timer)  # one a step may have set (a new teardown)
            self.tick_timer = self.loop.call_at(max(when, now + self.tick_gap), self._tick)

    def _step(self, td: Teardown, snap: Snapshot, now: float) -> None:
        td.steps += 1
        targets = self._targets_of(td, snap)
        task = td.task
        killing = td.kill_at <= now
        if killing:
            if td.killing_since is None:
                td.killing_since = now
                td.delay = FIRST_CHECK
            if task is not None and not td.group_gone:
                send_group(task.pid, signal.SIGKILL)
            for p in targets.values():
                send(p.pid, signal.SIGKILL)
                td.signalled.add((p.pid, p.start))
        else:
            if task is not None and not td.group_gone and not task.termed:
                self._term_group(task)
            for p in targets.values():
                ident = (p.pid, p.start)
                if ident not in td.termed:
                    if p.pgrp not in td.quiet:  # else its group had SIGTERM just now
                        send(p.pid, signal.SIGTERM)
                    if p.state == "T":
                        send(p.pid, signal.SIGCONT)
                    td.termed.add(ident)
                    td.signalled.add(ident)
        td.quiet.clear()
        if not targets and (task is None or task.reaped):
            self._finish(td)
            return
        if td.killing_since is not None and now - td.killing_since > GIVE_UP:
            self._error_td(
                td,
                "%d processes survived SIGKILL: %s"
                % (len(targets), " ".join(str(p) for p in sorted(targets))),
            )
            self._finish(td)
            return
        td.next_check = now + td.delay
        td.delay = min(td.delay * 2, MAX_CHECK)

    def _targets_of(self, td: Teardown, snap: Snapshot) -> Dict[int, Proc]:
        self._discover(snap)
        extra: Sequence[int] = ()
        if td.kind == "task":
            extra = self._orphan_seeds({td.name}, snap)
        elif td.kind == "sweep":
            tids = {t.tid for t in self.tasks.values() if job_part(t.tid) == td.name}
            extra = self._orphan_seeds(tids, snap) if tids else ()
        elif td.kind == "stray":
            o = self.orphans.get(int(td.name))
            p = snap.procs.get(o.pid) if o is not None else None
            if o is not None and p is not None and p.start == o.start and not o.owners:
                extra = (o.pid,)
        found = targets(td, snap, self.pid, self.tasks.values(), self.all_tids, extra)
        self.containers.spare(found, td.kill_at > time.monotonic(), snap.tags)  # issue 14
        return found

    def _drop_tag_sweep(self, td: Teardown) -> None:
        """SIGKILL at once what a tag sweep found, and forget it: a new task of that tid
        is about to carry the same tag."""
        for p in self._targets_of(td, snapshot(self.tagger)).values():
            send(p.pid, signal.SIGKILL)
        del self.teardowns[td.key]

    def _finish(self, td: Teardown) -> None:
        del self.teardowns[td.key]
        # what it signalled, and the main processes it SIGTERMed before any scan saw them
        killed = len(td.signalled) + len(td.pre - {pid for pid, _ in td.signalled})
        if td.kind == "task" and td.task is not None:
            td.task.teardown = None
            if not td.task.gone:
                self._gone(td.task, killed)
        elif td.kind == "tag":
            self.out.emit({"ev": "gone", "tid": td.name, "t": _now(), "killed": killed})
        elif td.kind == "sweep":
            self.out.emit({"ev": "swept", "job": td.name, "t": _now(), "killed": killed})
        elif td.kind == "stale":
            self.out.emit({"ev": "stale", "t": _now(), "killed": killed})

    def _error_td(self, td: Teardown, text: str) -> None:
        event: Dict[str, Any] = {"ev": "error", "msg": text}
        if td.kind in ("task", "tag"):
            event["tid"] = td.name
        self.out.emit(event)


def _tid(msg: Dict[str, Any]) -> str:
    tid = msg.get("tid")
    if not isinstance(tid, str) or not tid or "\0" in tid:
        raise BadRequest("tid must be a non-empty string")
    return tid


def _opt(msg: Dict[str, Any], key: str, kind: type) -> Any:
    value = msg.get(key)
    if value is not None and not isinstance(value, kind):
        raise BadRequest("%s must be %s or null" % (key, kind.__name__))
    return value


def _files(msg: Dict[str, Any]) -> List[Tuple[str, str]]:
    files = msg.get("files")
    if files is None:
        return []
    out: List[Tuple[str, str]] = []
    if isinstance(files, list):
        for f in files:
            if not isinstance(f, dict):
                break
            path, data = f.get("path"), f.get("data")
            if not (isinstance(path, str) and path.startswith("/") and "\0" not in path):
                break
            if not isinstance(data, str):
                break
            out.append((path, data))
        else:
            return out
    raise BadRequest("files must be a list of {path (absolute), data (str)}")


def _env_entry(key: Any, value: Any) -> bool:
    return (
        isinstance(key, str)
        and bool(key)
        and "=" not in key
        and "\0" not in key
        and (value is None or (isinstance(value, str) and "\0" not in value))
    )
