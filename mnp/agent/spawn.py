"""What happens on `spawn`: the op's fields checked (`op_spawn`), the task's
environment, program lookup, the fork/exec itself, and the new `Task` handed to the
agent (which reaps it; teardown.py ends what it leaves).

`os.posix_spawn` (glibc: clone(CLONE_VFORK) + exec, reporting exec errors to the
parent and reaping a child that failed) is the fast path: it starts a process in
a new session with its pipes, without copying the agent's page tables and without
running Python in the child. The working directory is set by changing the agent's
own directory around the call (the agent is single-threaded) and returning
through a descriptor kept open. Where posix_spawn lacks `setsid` (glibc < 2.26)
subprocess.Popen does the same job, more slowly.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from .expand import expand
from .loop import Feeder, Stream
from .proc import default_signals, now_ticks
from .request import BadRequest, env_entry, files_of, optional, tid_of
from .tasks import Task

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Any, Dict, List, Mapping, Optional, Tuple

    from .agent import Agent


EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 126


class SpawnError(Exception):
    """The task could not be started: `code` is what `exited` reports."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def with_python_env(base: Mapping[str, str], prefix: str) -> Dict[str, str]:
    """`base` as if the Python environment at `prefix` (a venv or conda prefix) were
    activated: its `bin` first on PATH, VIRTUAL_ENV (venv) or CONDA_PREFIX (conda) set,
    PYTHONHOME unset. Unchanged when `prefix/bin` is not a directory on this host (the
    hosts do not share the submitter's filesystem)."""
    env = dict(base)
    bindir = os.path.join(prefix, "bin")
    if not os.path.isdir(bindir):
        return env
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]
    env["PATH"] = os.pathsep.join([bindir] + (path or ["/usr/local/bin", "/usr/bin", "/bin"]))
    env.pop("PYTHONHOME", None)
    if os.path.exists(os.path.join(prefix, "pyvenv.cfg")):
        env["VIRTUAL_ENV"] = prefix
    elif os.path.isdir(os.path.join(prefix, "conda-meta")):
        env["CONDA_PREFIX"] = prefix
    return env


def task_env(
    base: Mapping[str, str],
    changes: Mapping[str, Optional[str]],
    tid: str,
    ctl: str,
    agent: str = "",
) -> Dict[str, str]:
    env = dict(base)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["MNP_JOB_ID"] = tid
    env["MNP_CONTROLLER_ID"] = ctl
    if agent:
        env["MNP_AGENT_ID"] = agent
    else:
        env.pop("MNP_AGENT_ID", None)
    return env


def write_files(files: List[Tuple[str, str]]) -> None:
    """Write each (absolute path, text), parents made as needed (0700), atomically: a
    task never reads half a file. SpawnError 126 on failure."""
    for path, data in files:
        tmp = "%s.%d.tmp" % (path, os.getpid())
        try:
            os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data.encode("utf-8", "surrogateescape"))
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise SpawnError(EXIT_CANNOT_RUN, "file %s: %s" % (path, e.strerror or e)) from None


def find_program(name: str, path: Optional[str]) -> str:
    """Where execvp would find `name` on `path` (the task's PATH), relative to the current
    directory; SpawnError 127 when nowhere, 126 when found but not executable."""
    if "/" in name:
        return name
    denied = False
    for entry in (path if path is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(entry, name) if entry else name
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
        denied = True
    if denied:
        raise SpawnError(EXIT_CANNOT_RUN, "%s: Permission denied" % name)
    raise SpawnError(EXIT_NOT_FOUND, "%s: command not found" % name)


def _exec_error(prog: str, err: OSError) -> SpawnError:
    code = EXIT_NOT_FOUND if err.errno == errno.ENOENT else EXIT_CANNOT_RUN
    return SpawnError(code, "%s: %s" % (prog, err.strerror or err))


class Spawner:
    """Starts tasks; owns the descriptors every spawn shares."""

    def __init__(self) -> None:
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.home: Optional[int] = os.open(".", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # started in a directory that is gone: stay wherever chdir leaves us
            self.home = None
        self.sigdef = default_signals()
        self.posix_spawn = hasattr(os, "posix_spawn")
        self.path = os.environ.get("PATH")

    def spawn(
        self,
        argv: List[str],
        env: Dict[str, str],
        cwd: Optional[str],
        stdin: Optional[int],
        keep: Optional[int] = None,
    ) -> Tuple[int, int, int]:
        """Start argv in a new session; returns (pid, stdout read end, stderr read end).

        `stdin` is the descriptor the task reads (None: /dev/null); the caller keeps
        ownership of it. `keep`: an inheritable descriptor the task keeps as it is (an
        MPI rank's PMI_FD). Raises SpawnError, having closed everything it opened.
        """
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            if cwd is not None:
                try:
                    os.chdir(cwd)
                except OSError as e:
                    raise SpawnError(EXIT_CANNOT_RUN, "cwd %s: %s" % (cwd, e.strerror)) from None
            try:
                path = env.get("PATH")
                if path is not None and path == self.path and "/" not in argv[0]:
                    prog = ""  # the agent's own PATH: glibc's posix_spawnp searches it faster
                else:
                    prog = find_program(argv[0], path)
                fd0 = self.devnull if stdin is None else stdin
                pid = self._start(prog, argv, env, fd0, out_w, err_w, keep)
            finally:
                if cwd is not None:
                    self._go_home()
        except BaseException:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        os.close(out_w)
        os.close(err_w)
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        return pid, out_r, err_r

    def _go_home(self) -> None:
        if self.home is not None:
            os.fchdir(self.home)
        else:
            os.chdir("/")

    def _start(
        self,
        prog: str,
        argv: List[str],
        env: Dict[str, str],
        fd0: int,
        fd1: int,
        fd2: int,
        keep: Optional[int] = None,
    ) -> int:
        if self.posix_spawn:
            actions = [
                (os.POSIX_SPAWN_DUP2, fd0, 0),
                (os.POSIX_SPAWN_DUP2, fd1, 1),
                (os.POSIX_SPAWN_DUP2, fd2, 2),
            ]
            try:
                spawn = os.posix_spawn if prog else os.posix_spawnp
                return spawn(
                    prog or argv[0],
                    argv,
                    env,
                    file_actions=actions,
                    setsid=True,
                    setsigdef=self.sigdef,
                    setsigmask=(),
                )
            except NotImplementedError:
                self.posix_spawn = False
            except OSError as e:
                raise _exec_error(argv[0], e) from None
        if not prog:
            prog = find_program(argv[0], env.get("PATH"))
        return self._popen(prog, argv, env, fd0, fd1, fd2, keep)

    def _popen(
        self,
        prog: str,
        argv: List[str],
        env: Dict[str, str],
        fd0: int,
        fd1: int,
        fd2: int,
        keep: Optional[int] = None,
    ) -> int:
        import subprocess

        try:
            p = subprocess.Popen(
                argv,
                executable=prog,
                env=env,
                stdin=fd0,
                stdout=fd1,
                stderr=fd2,
                close_fds=True,
                pass_fds=() if keep is None else (keep,),
                start_new_session=True,
                restore_signals=True,
            )
        except OSError as e:
            raise _exec_error(argv[0], e) from None
        # the agent reaps with waitpid(-1); keep Popen from ever waiting for or warning about it
        p.returncode = 0
        return p.pid


# ---------------------------------------------------------------- the `spawn` op


def op_spawn(agent: Agent, msg: Dict[str, Any]) -> None:
    tid = tid_of(msg)
    argv = msg.get("argv")
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise BadRequest("argv must be a non-empty list of strings")
    if not argv[0] or any("\0" in a for a in argv):
        raise BadRequest("argv[0] must not be empty and no argument may hold a NUL")
    changes = msg.get("env")
    if changes is None:
        changes = {}
    if not isinstance(changes, dict) or not all(env_entry(k, v) for k, v in changes.items()):
        raise BadRequest("env must map names (no '=', no NUL) to strings or null")
    cwd = optional(msg, "cwd", str)
    if cwd is not None and (not cwd or "\0" in cwd):
        raise BadRequest("cwd must be a non-empty path")
    port_env = optional(msg, "port_env", str)
    if port_env is not None and not env_entry(port_env, ""):
        raise BadRequest("port_env must be an environment variable's name")
    port_key = optional(msg, "port_key", str)
    pyenv = optional(msg, "pyenv", str)
    do_expand = optional(msg, "expand", bool)
    stdin = optional(msg, "stdin", str)
    files = files_of(msg)
    try:
        container = agent.containers.check(msg.get("container"))
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if tid in agent.tasks:
        raise BadRequest("task %s is already on this agent" % tid)
    stale = agent.teardowns.active.get("t:" + tid)
    if stale is not None:  # a `kill` of its previous run still sweeping the tag
        agent.teardowns.drop(stale)
    if agent.stopping:
        raise BadRequest("the agent is shutting down")

    port = None
    if port_env is not None:  # the agent picks the port: no round trip before the spawn
        port = agent.free_port(port_key)
        changes = {**changes, port_env: str(port)}
    env = task_env(_base_env(agent, pyenv), changes, tid, agent.ctl, agent.identity)
    if cwd is not None and "PWD" not in changes:
        env["PWD"] = cwd  # as a shell's cd would: the login shell's PWD is wrong here
    if do_expand is not False:
        argv = [expand(a, env) for a in argv]
    pmi = msg.get("pmi")
    rank_end = None  # an MPI rank's end of its PMI socketpair (ranks.py)
    if pmi is not None:  # a rank in a container connects to PMI_PORT instead
        rank_end = agent.ranks.prepare(tid, pmi, env, container is not None)
    feed_r = feed_w = -1
    try:
        try:
            data = None if stdin is None else stdin.encode("utf-8", "surrogateescape")
            if data is not None:
                feed_r, feed_w = os.pipe()
            if files:
                write_files(files)
            run_cwd = cwd
            if container is not None:  # the runtime's argv and environment run it
                argv, env = agent.containers.wrap_spawn(
                    container, tid, argv, env, changes, cwd, data is not None
                )
                # the container's directory is in its argv (-w/--pwd); the client runs in
                # the agent's own folder, where conmon may leave files (an `oom` marker)
                run_cwd = agent.containers.client_cwd(cwd)
            born_ticks = now_ticks()
            # its cgroup and CPUs, inherited (a container's runtime enforces its memory)
            limits = agent.limits.before(tid, agent.containers.limited(tid, changes))
            try:
                pid, out_fd, err_fd = agent.spawner.spawn(
                    argv,
                    env,
                    run_cwd,
                    feed_r if feed_r >= 0 else None,
                    None if rank_end is None else rank_end.fileno(),
                )
            finally:
                agent.limits.after(limits)
        except ValueError as e:  # text the OS cannot take (a lone surrogate, ...)
            raise SpawnError(126, "%s: %s" % (argv[0], e)) from None
        finally:
            if feed_r >= 0:
                os.close(feed_r)
            if rank_end is not None:
                rank_end.close()
    except SpawnError as e:
        agent.containers.task_gone(tid, False)
        if feed_w >= 0:
            os.close(feed_w)
        if pmi is not None:
            agent.ranks.spawn_failed(tid)
        agent.out.emit(
            {
                "ev": "exited",
                "tid": tid,
                "code": e.code,
                "signal": None,
                "t": time.time(),
                "error": e.msg,
            }
        )
        agent.out.emit({"ev": "gone", "tid": tid, "t": time.time(), "killed": 0})
        return
    streams = [
        Stream(agent.loop, agent.out, tid, out_fd, 1),
        Stream(agent.loop, agent.out, tid, err_fd, 2),
    ]
    feeder = None if data is None else Feeder(agent.loop, feed_w, data)
    pipes = set()
    for fd in (out_fd, err_fd):
        try:
            pipes.add(os.fstat(fd).st_ino)
        except OSError:
            pass
    task = Task(tid, pid, streams, feeder, time.monotonic(), born_ticks, pipes)
    task.limits = limits
    agent.add(task, port)
    agent.limits.started(task)


def _base_env(agent: Agent, pyenv: Optional[str]) -> Dict[str, str]:
    """The agent's environment, with the Python environment `pyenv` activated when it
    exists on this host (checked once per agent and environment)."""
    if not pyenv:
        return agent.env
    env = agent.envs.get(pyenv)
    if env is None:
        env = agent.envs[pyenv] = with_python_env(agent.env, pyenv)
    return env
