"""The OpenSSH transport: one ``ssh`` master per host, each agent a session over its pipes.

The first ``open`` on a host starts a control master::

    ssh -M -N -S DIR/N -o ControlPersist=10 -o BatchMode=yes ... HOST

which connects, authenticates and then puts itself in the background; its
exit status and stderr say whether (and why not) the host could be reached.
Each agent is then one multiplexed session, ``ssh -S DIR/N -o ControlMaster=no
-T HOST COMMAND`` with the agent's stdin, stdout and stderr on this process's
pipes: the session's client hands those pipes to the master, so the SSH
encryption of every host runs in that host's ``ssh``, never on the
controller's thread, and a controller write is a pipe write. The command is
the bootstrap of ``mnp.transport.ssh`` (``sshcommon``), served the same way:
the agent's source is shipped over stdin where mnp is not importable.

Being ``ssh`` itself, it honours everything ``~/.ssh/config`` says
(ProxyJump, certificates, GSSAPI/Kerberos, ControlPath of its own is
overridden). The inventory's explicit ``user``, ``port``, ``identity`` (with
``IdentitiesOnly``), ``known_hosts`` and ``connect_timeout`` are ``-o``
options, which win over any config file; its ``config`` files are read
before ``~/.ssh/config`` through a generated file of ``Include`` lines.
Host keys: ``StrictHostKeyChecking=yes`` against ``known_hosts`` (and
``/etc/ssh/ssh_known_hosts``); ``UpdateHostKeys=no``, so nothing writes to
them; ``known_hosts = "none"`` turns checking off. ``BatchMode`` never
prompts. Secrets travel over the agent's stdin, never in an argv.

The control sockets live in a private directory (``mkdtemp``, mode 0700)
removed by ``close``, which also stops the masters (``-O exit``). If the
controller dies without closing, each session's pipes close, its agent exits
(``--parent-death``), and the master exits ``ControlPersist`` seconds after
its last session. A master that died (host lost, idle) is started again by
the next ``open``. Failures are the ``SshError`` categories of the asyncssh
transport, read from ssh's messages, and a refused host key a
``HostKeyError`` naming the key's SHA256 fingerprint.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile

from mnp.errors import HostKeyError, TransportError
from mnp.model import HostSpec, Inventory
from mnp.transport.base import MAX_LINE, AgentStream, Transport
from mnp.transport.sshcommon import (
    CLOSE_WAIT,
    GLOBAL_KNOWN_HOSTS,
    STDERR_TAIL,
    BootstrappedStream,
    SshError,
    agent_command,
    config_files,
    identity_files,
)

SSH = "ssh"
KEYSCAN = "ssh-keyscan"
KEEPALIVE_INTERVAL = 30  # seconds; a silent peer is declared lost after 3 of these
CONTROL_PERSIST = 10  # seconds a master outlives its last session (a controller that died)
GRACE = 2.0  # seconds beyond connect_timeout allowed for ssh's own start and exit


class _Master:
    """One host's control master: its socket, and the options every session repeats."""

    def __init__(self, socket: str, args: list[str]) -> None:
        self.socket = socket
        self.args = args

    def alive(self) -> bool:
        return os.path.exists(self.socket)


class _OpenSshStream(BootstrappedStream):
    """The agent's stdio as the pipes of one ``ssh`` session; serves the source request."""

    def __init__(self, host: str, python: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.host = host
        self.python = python
        self.proc = proc
        self.shipped = False  # whether the agent's source was sent (mnp not importable there)
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self._noise = bytearray()
        self._ready = False
        self._closed = False
        self._stderr = bytearray()
        self._stderr_task = asyncio.get_running_loop().create_task(self._read_stderr(proc.stderr))

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while chunk := await stream.read(STDERR_TAIL):
                self._stderr += chunk
                del self._stderr[:-STDERR_TAIL]

    def stderr_tail(self) -> str:
        return self._stderr.decode(errors="replace")

    async def _readline(self) -> bytes:
        try:
            return await self._stdout.readline()
        except (OSError, ValueError) as e:
            if not self._ready:
                raise SshError(
                    self.host, "ssh", f"connection lost while starting the agent: {e}"
                ) from None
            raise ConnectionResetError(f"ssh connection to {self.host} lost: {e}") from None

    async def _start_failure(self) -> Exception:
        """The session ended before ``ready``: say why, from its exit status."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 2)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 1)
        status = self.proc.returncode
        said = self.stderr_tail().strip() or self._noise.decode(errors="replace").strip()
        tail = " ".join(said.splitlines()[-3:])[-400:]
        if status == 255:  # ssh's own failure (a session that had to connect by itself)
            return SshError(self.host, "ssh", f"cannot start the agent: {tail or 'no message'}")
        if status in (126, 127):
            return SshError(
                self.host,
                "no-python",
                f"cannot run {self.python!r} on the host (exit {status}): {tail or 'no message'}",
            )
        detail = f": {tail}" if tail else ""
        return SshError(
            self.host, "agent", f"the agent exited with status {status} before it was ready{detail}"
        )

    def write(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as e:
            raise TransportError(f"{self.host}: agent connection is down: {e}") from None

    async def drain(self) -> None:
        try:
            await self._stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise TransportError(f"{self.host}: agent connection is down: {e}") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, RuntimeError):
            self._stdin.close()
        # The agent kills its tasks when its stdin closes and then exits, which ends the
        # session; give it that long, then end the session's client (the master then
        # closes the channel, and sshd the agent's pipes).
        try:
            await asyncio.wait_for(self.proc.wait(), CLOSE_WAIT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 2)
        self._stderr_task.cancel()


class OpenSshTransport(Transport):
    """Agents over OpenSSH; one master per host, started on first use, again after a loss."""

    name = "ssh"

    def __init__(self, inventory: Inventory | None = None, ssh: str = SSH) -> None:
        self.inventory = inventory
        self.ssh = ssh
        self._dir: str | None = None
        self._masters: dict[str, _Master] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._count = 0

    async def open(self, host: HostSpec, agent_args: list[str]) -> AgentStream:
        python = host.ssh.python or "python3"
        command = agent_command(host, agent_args)
        master = await self.connect(host)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.ssh,
                *master.args,
                "-S",
                master.socket,
                "-o",
                "ControlMaster=no",
                "-T",
                "--",
                host.name,
                command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=MAX_LINE,
            )
        except OSError as e:
            raise SshError(host.name, "config", f"cannot run {self.ssh}: {e}") from None
        return _OpenSshStream(host.name, python, proc)

    async def connect(self, host: HostSpec) -> _Master:
        """The host's master, starting it if there is none (safe to call concurrently)."""
        lock = self._locks.setdefault(host.name, asyncio.Lock())
        async with lock:
            master = self._masters.get(host.name)
            if master is None or not master.alive():
                master = await self._connect(host)
                self._masters[host.name] = master
            return master

    async def close(self) -> None:
        masters, self._masters = list(self._masters.items()), {}
        stops = [self._stop(name, m) for name, m in masters if m.alive()]
        if stops:
            await asyncio.gather(*stops)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _stop(self, name: str, master: _Master) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            proc = await asyncio.create_subprocess_exec(
                self.ssh,
                *master.args,
                "-S",
                master.socket,
                "-O",
                "exit",
                "--",
                name,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    # --- connecting ---------------------------------------------------------

    def _socket(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="mnp-ssh-")  # 0700: only this user connects
        self._count += 1
        return os.path.join(self._dir, str(self._count))

    def _args(self, host: HostSpec, socket: str) -> list[str]:
        """ssh's options for this host, shared by its master and its sessions."""
        opts = host.ssh
        args: list[str] = []
        configs = config_files(host)
        if opts.config:
            # -F replaces ~/.ssh/config and /etc/ssh/ssh_config: read them after the
            # inventory's files, first value winning as in ssh itself
            if os.access("/etc/ssh/ssh_config", os.R_OK):
                configs.append("/etc/ssh/ssh_config")
            path = socket + ".config"
            with open(path, "w") as f:
                f.write("".join(f"Include {_quote_option(c)}\n" for c in configs))
            args += ["-F", path]
        args += [
            "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, math.ceil(opts.connect_timeout))}",
            "-o", f"ServerAliveInterval={KEEPALIVE_INTERVAL}",
            "-o", "ServerAliveCountMax=3",
            "-o", "UpdateHostKeys=no",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        kh = opts.known_hosts
        if kh is not None and kh.strip().lower() == "none":
            args += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
            args += ["-o", "GlobalKnownHostsFile=/dev/null"]
        else:
            args += ["-o", "StrictHostKeyChecking=yes"]
            if kh is not None:
                path = os.path.expanduser(kh)
                args += ["-o", f"UserKnownHostsFile={_quote_option(path)}"]
                args += ["-o", f"GlobalKnownHostsFile={GLOBAL_KNOWN_HOSTS}"]
        if opts.user:
            args += ["-l", opts.user]
        if opts.port:
            args += ["-p", str(opts.port)]
        keys = identity_files(host)
        if keys:
            # the inventory's identities replace the config files' IdentityFile lines (as
            # with asyncssh): ssh would add those, so its resolved configuration (-G) less
            # them becomes this host's only config file
            rest = args[2:] if opts.config else args  # without the -F of the Include file
            args = ["-F", self._resolved_config(host, args, socket), *rest]
            args += ["-o", "IdentitiesOnly=yes"]
            for k in keys:
                args += ["-i", k]
        return args

    def _resolved_config(self, host: HostSpec, args: list[str], socket: str) -> str:
        """``ssh -G``'s answer for this host, without IdentityFile lines, as a config file."""
        try:
            out = subprocess.run(
                [self.ssh, *args, "-G", "--", host.name],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SshError(host.name, "config", f"cannot run {self.ssh} -G: {e}") from None
        if out.returncode != 0:
            said = out.stderr.decode(errors="replace").strip().splitlines() or ["ssh -G failed"]
            raise SshError(host.name, "config", f"ssh config: {said[-1]}")
        kept = [
            line
            for line in out.stdout.decode(errors="replace").splitlines()
            if line.split(" ", 1)[0] not in ("identityfile", "certificatefile")
        ]
        path = socket + ".resolved"
        with open(path, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        return path

    async def _connect(self, host: HostSpec) -> _Master:
        socket = self._socket()
        # the config and identity files' stat()s, off the loop
        args = await asyncio.to_thread(self._args, host, socket)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.ssh,
                *args,
                "-M",
                "-N",
                "-S",
                socket,
                "-o",
                f"ControlPersist={CONTROL_PERSIST}",
                "--",
                host.name,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise SshError(host.name, "config", f"cannot run {self.ssh}: {e}") from None
        try:
            _, err = await asyncio.wait_for(proc.communicate(), host.ssh.connect_timeout + GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise SshError(
                host.name, "timeout", f"no SSH connection within {host.ssh.connect_timeout:g}s"
            ) from None
        said = err.decode(errors="replace")
        if proc.returncode != 0 or not _Master(socket, args).alive():
            raise await self._failure(host, args, said)
        return _Master(socket, args)

    async def _failure(self, host: HostSpec, args: list[str], said: str) -> Exception:
        """What ssh's messages say went wrong, as the asyncssh transport would say it."""
        lines = [ln.strip() for ln in said.replace("\r", "").splitlines() if ln.strip()]
        last = lines[-1] if lines else "ssh exited without a message"
        text = "\n".join(lines)
        opts = host.ssh
        if "Host key verification failed" in text or "host key for" in text.lower():
            return await self._host_key_error(host, args, text)
        if "Could not resolve hostname" in text:
            why = last.rsplit(": ", 1)[-1]
            return SshError(host.name, "dns", f"cannot resolve the host name: {why}")
        if "Connection refused" in text:
            return SshError(host.name, "refused", f"connection refused: {last}")
        if "timed out" in text.lower():
            return SshError(
                host.name, "timeout", f"no SSH connection within {opts.connect_timeout:g}s"
            )
        if "Permission denied" in text:
            m = re.search(r"Permission denied \(([^)]*)\)", text)
            user = opts.user or "the ssh_config/local user"
            return SshError(
                host.name,
                "auth",
                f"authentication failed for {user} ({m.group(1) if m else last}); "
                "check the identity and the host's authorized_keys",
            )
        if re.search(r"line \d+:|Bad configuration option|Can't open user config", text):
            return SshError(host.name, "config", f"ssh config: {last}")
        if "No route to host" in text or "Network is unreachable" in text:
            return SshError(host.name, "unreachable", last)
        return SshError(host.name, "ssh", last)

    async def _host_key_error(self, host: HostSpec, args: list[str], text: str) -> HostKeyError:
        """Name the refused key by its fingerprint, as the asyncssh transport does: ssh only
        prints it for a changed key, so an unknown one is read again with ssh-keyscan (the
        key exchange only; nothing logs in)."""
        changed = "HAS CHANGED" in text or "IDENTIFICATION HAS CHANGED" in text
        what = "CA key" if "CA key" in text or "certificate" in text.lower() else "host key"
        addr, port = await self._resolved(host, args)
        target = addr if port == 22 else f"[{addr}]:{port}"
        path, where = await asyncio.to_thread(_known_hosts_where, host)
        m = re.search(r"No (\S+) host key is known", text) or re.search(
            r"for the (\S+) key sent by", text
        )
        kind = m.group(1).lower() if m else ""
        alg, fp = await self._offered(addr, port, kind, host.ssh.connect_timeout)
        fm = re.search(r"(SHA256:[A-Za-z0-9+/=]+)", text)
        if fm:
            fp = fm.group(1)
        if changed:
            return HostKeyError(
                f"{host.name}: host-key: the {what} of {target} has CHANGED: "
                f"it offered {alg} {fp}, which does not match {where}; "
                "if the host was reinstalled, remove the old entry "
                f"(ssh-keygen -R {shlex.quote(target)})"
            )
        return HostKeyError(
            f"{host.name}: host-key: the {what} of {target} is not in {where}: "
            f"it offered {alg} {fp}; after checking that fingerprint, "
            f"add it (ssh-keyscan -p {port} {addr} >> {shlex.quote(path)})"
        )

    async def _resolved(self, host: HostSpec, args: list[str]) -> tuple[str, int]:
        """The address and port ssh connects to (``ssh -G``: the config applied)."""
        addr, port = host.name, host.ssh.port or 22
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            proc = await asyncio.create_subprocess_exec(
                self.ssh,
                *args,
                "-G",
                "--",
                host.name,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 5)
            for line in out.decode(errors="replace").splitlines():
                key, _, value = line.partition(" ")
                if key == "hostname":
                    addr = value.strip()
                elif key == "port":
                    port = int(value)
        return addr, port

    async def _offered(self, addr: str, port: int, kind: str, within: float) -> tuple[str, str]:
        """The algorithm and SHA256 fingerprint of the host key ``addr:port`` offers."""
        if shutil.which(KEYSCAN) is None:
            return kind or "a key", "(fingerprint unknown: no ssh-keyscan)"
        argv = [KEYSCAN, "-T", str(max(1, math.ceil(within))), "-p", str(port)]
        if kind in ("rsa", "ecdsa", "ed25519"):
            argv += ["-t", kind]
        with contextlib.suppress(OSError, TimeoutError):
            proc = await asyncio.create_subprocess_exec(
                *argv,
                addr,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), within + GRACE)
            for line in out.decode(errors="replace").splitlines():
                words = line.split()
                if len(words) >= 3 and not line.startswith("#"):
                    with contextlib.suppress(ValueError):
                        blob = base64.b64decode(words[2])
                        digest = base64.b64encode(hashlib.sha256(blob).digest()).decode()
                        return words[1], "SHA256:" + digest.rstrip("=")
        return kind or "a key", "(fingerprint unknown)"


def _known_hosts_where(host: HostSpec) -> tuple[str, str]:
    """The known_hosts file checked, and how a message names it."""
    path = os.path.expanduser(host.ssh.known_hosts or "~/.ssh/known_hosts")
    return path, path if os.path.isfile(path) else f"{path} (which does not exist)"


def _quote_option(value: str) -> str:
    """A path for an ``-o Key=value`` option: ssh splits values at spaces unless quoted."""
    return f'"{value}"' if " " in value else value


def make(inventory: Inventory) -> OpenSshTransport:
    return OpenSshTransport(inventory)
