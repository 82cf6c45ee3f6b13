"""The controller process's lifecycle: state directory, one-per-home lock, start, stop.

No controller logic lives here: ``serve_forever`` serves whatever ``make_handler``
builds. The contract, for ``mnp controller start --foreground``::

    async def make_handler(daemon: Daemon) -> tuple[Ops | Handler, ShutdownFn]:
        controller = await Controller.open(home)        # your setup; the socket is not up yet

        async def submit(request: dict[str, Any], r: Responder) -> None:
            await r.end({"job_id": await controller.submit(request)})

        ops = {"ping": daemon.ping, "shutdown": daemon.shutdown, "submit": submit}
        return ops, controller.shutdown              # awaited once, after a stop

    sys.exit(serve_forever(home, make_handler))

- A protocol's ops are one table (``Ops``: op name → handler), and ``dispatch`` is the
  one way a request reaches its handler: an op the table does not name is an error
  (``unknown request 'NAME'``, exit 2). mnp's own table is
  ``mnp.service.ops.socket_ops``.
- The daemon's own ops, whose handlers ``Daemon`` holds for the table:
  ``ping`` → ``{"ok": true, "pid", "started" (unix time), "uptime" (s), "home"}``
  (a ping answered means ``make_handler`` is done; once stopping, ping is an
  error), and ``shutdown`` → removes the socket file, stops, and answers
  ``{"ok": true, "pid", "stopping": true}``. ``make_handler`` may instead return
  a single handler function: then the daemon dispatches ``ping`` and ``shutdown``
  itself and every other op to that function.
- ``serve_forever`` prepares ``home`` (0700), takes ``controller.lock`` (if another
  process holds it: prints ``mnp: a controller already runs for HOME (pid N)``
  and returns 0), runs an asyncio loop, awaits ``make_handler(daemon)``, then
  serves the ops on ``controller.sock`` until ``daemon.stop()`` (or ``daemon()``)
  is called, or SIGTERM/SIGINT arrives, or a client sends ``{"op": "shutdown"}``.
- ``stop()`` is thread-safe and idempotent; handlers may call it too.
- Stopping: the socket file goes first (new clients see no controller, and a
  new ``start_background`` waits for this one's lock), then the shutdown
  function is awaited while connections stay open (a streaming ``run`` can still
  report how its job ended), then connections close and handlers still running
  are cancelled. A second signal during shutdown cancels the shutdown function.
- Returns 0, or 1 when ``make_handler`` or the shutdown function raised (logged).
  Logs go to stderr with timestamps (``controller.log`` when started in the
  background).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnp.api import ApiClient, ApiServer, Handler, Responder, socket_path
from mnp.errors import InfraError, MnpError, UsageError

if TYPE_CHECKING:
    import asyncio
from mnp.files import open_regular

log = logging.getLogger("mnp")

LOCK_NAME = "controller.lock"
CANNOT_START = "the controller cannot start: "
"""How a controller logs an ``MnpError`` that kept it from starting (one line)."""
PURGE_ROLE = "purge"
"""The lock's role for ``mnp purge`` with no controller: a controller that starts waits."""
PURGE_WAIT = 3600.0
"""How long a starting controller waits for such a purge to end."""
LOG_NAME = "controller.log"
CONTROLLER_COMMAND: tuple[str, ...] = (
    sys.executable,
    "-m",
    "mnp",
    "controller",
    "start",
    "--foreground",
)
"""What ``start_background`` runs, followed by ``--home HOME`` and the extra arguments."""

StopFn = Callable[[], None]
ShutdownFn = Callable[[], Awaitable[None]]
Ops = Mapping[str, Handler]
"""A protocol's op table: op name → handler."""
MakeHandler = Callable[["Daemon"], Awaitable[tuple[Ops | Handler, ShutdownFn]]]


def dispatch(ops: Ops) -> Handler:
    """The handler that answers each request with its op's handler in ``ops``; an op
    that ``ops`` does not name is an error (exit 2)."""

    async def handle(request: dict[str, Any], r: Responder) -> None:
        op = request.get("op")
        fn = ops.get(op) if isinstance(op, str) else None
        if fn is None:
            raise UsageError(f"unknown request {op!r}")
        await fn(request, r)

    return handle


# --------------------------------------------------------------------------- state directory


def prepare_home(home: Path | str) -> Path:
    """Create ``home`` (and missing parents) 0700, tighten it if it is wider; return it resolved.

    Refuses a home owned by another user: its socket and database would be theirs.
    """
    home = Path(home).expanduser().absolute()
    missing: list[Path] = []
    p = home
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
            os.chmod(d, 0o700)  # the umask may have taken bits away that we need
        except FileExistsError:
            pass
        except OSError as e:
            raise InfraError(f"cannot create the state directory {d}: {e.strerror}") from e
    home = home.resolve()
    try:
        st = home.stat()
    except OSError as e:
        raise InfraError(f"cannot use the state directory {home}: {e.strerror}") from e
    if not home.is_dir():
        raise InfraError(f"the state directory {home} is not a directory")
    if st.st_uid != os.geteuid():
        raise InfraError(f"the state directory {home} belongs to uid {st.st_uid}, not to you")
    if st.st_mode & 0o077:
        os.chmod(home, 0o700)
        log.warning("tightened the permissions of %s from %03o to 0700", home, st.st_mode & 0o777)
    # a logs/ that cannot be made (read-only, full) is reported by the job that needs it
    with contextlib.suppress(OSError):
        (home / "logs").mkdir(mode=0o700, exist_ok=True)
    return home


# --------------------------------------------------------------------------- lock


class Lock:
    """An exclusive ``flock`` on ``$home/controller.lock``, holding the owner's pid.

    The kernel drops the lock when its holder dies, even by SIGKILL, so a
    stale pid in the file never blocks a new controller.
    """

    def __init__(self, home: Path | str) -> None:
        self.path = Path(home) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, wait: float = 0.0, role: str | None = None) -> bool:
        """Take the lock without blocking (retrying for ``wait`` seconds); False if taken.

        ``role`` is written after the pid when the holder is not a controller
        (``PURGE_ROLE``: ``mnp purge`` working on the store with none running)."""
        if self._fd is not None:
            return True
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.01)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}{' ' + role if role else ''}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor releases the flock

    def holder(self) -> int | None:
        """The pid of the process holding the lock, ``None`` if it is free.

        0 when it is held but the holder has not written its pid yet. Probing
        takes a shared lock for an instant; ``acquire(wait=...)`` absorbs that.
        """
        found = self.holder_info()
        return None if found is None else found[0]

    def holder_info(self) -> tuple[int, str | None] | None:
        """``(pid, role)`` of the holder (role ``None``: a controller), ``None`` if free."""
        if self._fd is not None:
            return os.getpid(), None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                for _ in range(5):
                    words = os.pread(fd, 64, 0).decode(errors="replace").split()
                    if words and words[0].isdigit():
                        return int(words[0]), (words[1] if len(words) > 1 else None)
                    time.sleep(0.01)
                return 0, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def held_by_controller(self) -> int | None:
        """``holder()``, but ``None`` when the holder is not a controller (``mnp purge``)."""
        found = self.holder_info()
        if found is None or found[1] is not None:
            return None
        return found[0]

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- client side


def _ping(home: Path, timeout: float) -> dict[str, Any] | None:
    client = ApiClient.connect(home, timeout=timeout)
    if client is None:
        return None
    with client:
        client.timeout = timeout
        try:
            return client.request("ping")
        except InfraError:
            return None  # accepted, then closed or silent: not ready (or stopping)


def _log_tail(path: Path, offset: int, lines: int = 20) -> str:
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
            f.seek(offset)
            text = f.read()[-16384:].decode(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join("  " + line for line in tail) if tail else "  (nothing logged)"


def _start_error(path: Path, offset: int) -> str | None:
    """The one-line reason a controller logged for not starting (``CANNOT_START``)."""
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
            f.seek(offset)
            text = f.read()[-65536:].decode(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        at = line.find(CANNOT_START)
        if at >= 0:
            return line[at + len(CANNOT_START) :].strip() or None
        if line.startswith("mnp: "):  # the command line's own one-line error
            return line[len("mnp: ") :].strip() or None
    return None


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    # the child runs the same mnp as this process, installed or not
    root = Path(__file__).resolve().parent.parent
    if root.name not in ("site-packages", "dist-packages"):  # never ahead of the stdlib
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    try:
        fd = open_regular(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as e:
        raise InfraError(f"cannot write the controller's log {log_path}: {e.strerror}") from e
    try:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    except OSError as e:
        raise InfraError(f"cannot start the controller ({cmd[0]}): {e.strerror}") from e
    finally:
        os.close(fd)


def start_background(
    home: Path | str,
    argv_extra: Sequence[str] = (),
    timeout: float = 30.0,
    *,
    command: Sequence[str] = CONTROLLER_COMMAND,
) -> int:
    """Start a detached controller for ``home``; return its pid once it answers a ping.

    Runs ``command --home HOME *argv_extra`` in a new session (stdin /dev/null,
    output appended to ``$home/controller.log``) in this process's working
    directory and environment. If another controller holds the lock (a
    concurrent start), that one's pid is returned once it answers; if one is
    stopping, a new one starts when its lock is free. Raises ``InfraError`` if
    the child exits with an error (quoting its log) or none answers in time.
    """
    home = prepare_home(home)
    log_path = home / LOG_NAME
    cmd = [*command, "--home", str(home), *argv_extra]
    deadline = time.monotonic() + timeout
    offset = log_path.stat().st_size if log_path.exists() else 0
    proc = _spawn(cmd, log_path)
    respawns = 0
    delay = 0.005
    try:
        while True:
            ping = _ping(home, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            if ping is not None:
                return int(ping.get("pid") or proc.pid)
            rc = proc.poll()
            if rc is not None and rc != 0:
                why = _start_error(log_path, offset)
                if why is not None:
                    raise InfraError(f"the controller could not start: {why} (log: {log_path})")
                raise InfraError(
                    f"the controller exited with code {rc} before answering; "
                    f"the end of {log_path}:\n{_log_tail(log_path, offset)}"
                )
            if rc == 0 and Lock(home).holder() is None:
                # it lost the lock to a controller that has since stopped: try again
                respawns += 1
                if respawns > 5:
                    raise InfraError(
                        "the controller keeps exiting without serving; "
                        f"the end of {log_path}:\n{_log_tail(log_path, offset)}"
                    )
                proc = _spawn(cmd, log_path)
            if time.monotonic() >= deadline:
                raise InfraError(
                    f"no controller answered on {socket_path(home)} within {timeout:g}s "
                    f"(pid {proc.pid} may still be starting); "
                    f"the end of {log_path}:\n{_log_tail(log_path, offset)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    finally:
        if proc.poll() is None:
            # reap it if it dies while this process lives (holding the Popen also
            # spares us its "still running" ResourceWarning)
            threading.Thread(target=proc.wait, name="mnp-reaper", daemon=True).start()


def ensure_client(
    home: Path | str,
    argv_extra: Sequence[str] = (),
    *,
    timeout: float = 30.0,
    command: Sequence[str] = CONTROLLER_COMMAND,
) -> ApiClient:
    """A connection to ``home``'s controller, starting one in the background if none runs."""
    client = ApiClient.connect(home)
    if client is not None:
        return client
    start_background(home, argv_extra, timeout, command=command)
    client = ApiClient.connect(home)
    if client is None:
        raise InfraError(f"the controller started, but {socket_path(home)} is gone")
    return client


def stop(home: Path | str, timeout: float = 30.0) -> bool:
    """Stop ``home``'s controller and wait until its lock is free; False if none ran.

    Asks over the socket (``shutdown``); a controller holding the lock without
    answering (starting or stuck) gets SIGTERM. Raises ``InfraError`` if it is
    still alive after ``timeout``.
    """
    home = Path(home).expanduser()
    lock = Lock(home)
    deadline = time.monotonic() + timeout
    pid = lock.held_by_controller()  # never an `mnp purge` working without a controller
    asked = signalled = False
    while True:
        if not asked:
            client = ApiClient.connect(home, timeout=min(5.0, timeout))
            if client is None and pid is None:
                return False  # checked on the first round only: pid is set after it
            if client is not None:
                asked = True
                with client:
                    client.timeout = min(5.0, timeout)
                    with contextlib.suppress(MnpError):  # it may close the connection first
                        pid = int(client.request("shutdown").get("pid") or 0) or pid
            elif pid and not signalled:
                # holds the lock but does not answer (still starting, or stuck)
                signalled = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        holder = lock.held_by_controller()
        if holder is None:
            return True
        pid = pid or holder
        if time.monotonic() >= deadline:
            raise InfraError(
                f"the controller (pid {pid or '?'}) did not stop within {timeout:g}s; "
                f"'kill -9 {pid or 'PID'}' ends it (its tasks die with their agents)"
            )
        time.sleep(0.02)


def status(home: Path | str) -> dict[str, Any]:
    """``{"running", "answering", "pid", "socket", "home"}``, plus ``started`` and
    ``uptime`` (seconds) when the controller answers a ping, ``error`` when
    connecting failed (another user's socket, a hung controller)."""
    home = Path(home).expanduser()
    out: dict[str, Any] = {
        "running": False,
        "answering": False,
        "pid": None,
        "socket": socket_path(home),
        "home": str(home),
    }
    try:
        ping = _ping(home, timeout=2.0)
    except InfraError as e:
        ping = None
        out["error"] = str(e)
    if ping is not None:
        out.update(running=True, answering=True, pid=ping.get("pid"))
        for key in ("started", "uptime"):
            if key in ping:
                out[key] = ping[key]
        return out
    pid = Lock(home).held_by_controller()
    if pid is not None:
        out.update(running=True, pid=pid or None)
    return out


# --------------------------------------------------------------------------- the daemon


def _setup_logging() -> None:
    if any(getattr(h, "_mnp_daemon", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s mnp[%(process)d] %(levelname)s %(message)s")
    )
    handler._mnp_daemon = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def _wait_for_purge(lock: Lock) -> bool:
    """While ``mnp purge`` holds the lock (no controller ran when it began), wait for it
    to end, then take the lock; False if a controller holds it, or the purge outlasts
    ``PURGE_WAIT``."""
    deadline = time.monotonic() + PURGE_WAIT
    said = False
    while time.monotonic() < deadline:
        found = lock.holder_info()
        if found is not None and found[1] != PURGE_ROLE:
            return False
        if found is not None and not said:
            log.info("waiting for mnp purge (pid %d) to finish with the store", found[0])
            said = True
        if lock.acquire(wait=1.0):
            return True
    return False


class Daemon:
    """What ``serve`` gives ``make_handler``: ``stop`` (``daemon()`` too: the ``stop``
    of earlier contracts) and the handlers of the daemon's own ops, ``ping`` and
    ``shutdown``, for the controller's op table."""

    def __init__(self, home: Path, loop: asyncio.AbstractEventLoop) -> None:
        import asyncio

        self.home = home
        self.pid = os.getpid()
        self.started = time.time()
        self.stopping = asyncio.Event()
        self.server: ApiServer | None = None  # set once serving
        self._loop = loop

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self.stopping.set)

    __call__ = stop

    def ops(self) -> dict[str, Handler]:
        return {"ping": self.ping, "shutdown": self.shutdown}

    async def ping(self, request: dict[str, Any], r: Responder) -> None:
        if self.stopping.is_set():
            raise InfraError("the controller is stopping")
        now = time.time()
        await r.end(
            {
                "pid": self.pid,
                "started": self.started,
                "uptime": now - self.started,
                "home": str(self.home),
            }
        )

    async def shutdown(self, request: dict[str, Any], r: Responder) -> None:
        log.info("shutdown requested over the socket")
        self.stopping.set()
        # gone from the socket before the answer, so no later ping finds a stopping controller
        if self.server is not None:
            await self.server.stop_accepting()
        await r.end({"pid": self.pid, "stopping": True})


class _OneHandler(Mapping[str, Handler]):
    """The op table of a controller given as one handler function: the daemon's own
    ops, and that function for every other op (it answers unknown ones itself)."""

    def __init__(self, own: dict[str, Handler], rest: Handler) -> None:
        self.own = own
        self.rest = rest

    def __getitem__(self, op: str) -> Handler:
        return self.own.get(op, self.rest)

    def __iter__(self) -> Iterator[str]:
        return iter(self.own)

    def __len__(self) -> int:
        return len(self.own)


def serve_forever(home: Path | str, make_handler: MakeHandler) -> int:
    """Run the controller for ``home`` until stopped; the contract is in the module docstring."""
    _setup_logging()
    try:
        home = prepare_home(home)
    except MnpError as e:
        print(f"mnp: {e}", file=sys.stderr)
        return e.exit_code
    lock = Lock(home)
    # a short wait absorbs another process's momentary probe (Lock.holder)
    if not lock.acquire(wait=0.2) and not _wait_for_purge(lock):
        pid = lock.holder()
        print(f"mnp: a controller already runs for {home} (pid {pid or '?'})", file=sys.stderr)
        return 0
    try:
        import asyncio

        from mnp.controller import tune_gc

        tune_gc()
        return asyncio.run(serve(home, make_handler))
    finally:
        lock.release()


async def serve(
    home: Path, make_handler: MakeHandler, on_signal: Callable[[str], None] | None = None
) -> int:
    """``serve_forever``'s loop, for a caller that holds ``home``'s lock itself.
    ``on_signal``: what SIGTERM, SIGINT and SIGHUP do instead of stopping (``mnp run``
    hosting its own controller terminates its jobs first)."""
    import asyncio

    loop = asyncio.get_running_loop()
    daemon = Daemon(home, loop)
    stopping = daemon.stopping
    shutdown_task: asyncio.Task[None] | None = None

    def stop_on_signal(signame: str) -> None:
        if stopping.is_set() and shutdown_task is not None and not shutdown_task.done():
            log.warning("%s again: abandoning the shutdown", signame)
            shutdown_task.cancel()
            return
        log.info("%s: stopping", signame)
        stopping.set()

    if on_signal is not None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig.name)
    else:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_on_signal, sig.name)

    pid = daemon.pid
    log.info("controller pid %d starting for %s", pid, home)
    try:
        handler, shutdown = await make_handler(daemon)
    except MnpError as e:  # said in one line: what is wrong and what to do
        log.error("%s%s", CANNOT_START, e)
        return e.exit_code
    except Exception:
        log.exception("the controller failed to start")
        return 1
    if isinstance(handler, Mapping):
        served = dispatch(handler)
    else:  # one function for the controller's ops: the daemon's own are dispatched here
        served = dispatch(_OneHandler(daemon.ops(), handler))

    server = daemon.server = ApiServer(home, served)
    code = 0
    try:
        try:
            if not stopping.is_set():
                await server.start()
                log.info("controller pid %d ready", pid)
                await stopping.wait()
        except MnpError as e:
            log.error("%s", e)
            code = e.exit_code
        await server.stop_accepting()
        shutdown_task = asyncio.ensure_future(shutdown())
        try:
            await shutdown_task
        except asyncio.CancelledError:
            code = code or 1
        except Exception:
            log.exception("the controller's shutdown failed")
            code = code or 1
    finally:
        await server.close()
    log.info("controller pid %d stopped", pid)
    return code


__all__ = [
    "CONTROLLER_COMMAND",
    "Daemon",
    "Lock",
    "MakeHandler",
    "Ops",
    "ShutdownFn",
    "StopFn",
    "dispatch",
    "ensure_client",
    "prepare_home",
    "serve",
    "serve_forever",
    "start_background",
    "status",
    "stop",
]
