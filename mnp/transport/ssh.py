"""The SSH transport: one asyncssh connection per host, the agent as an exec request.

What runs on the host is one small bootstrap, whatever the host has installed::

    <python> -c 'exec("import sys\\ntry:\\n import mnp.agent\\n...")' --parent-death --ctl TOKEN

If ``mnp.agent`` imports there, the bootstrap runs it as ``python -m mnp.agent``
would (``runpy``). Otherwise it prints one line, ``mnp-agent: send source``,
and reads a length line and that many zlib-compressed bytes of
``mnp.agent.bundle_source()`` from its stdin with ``os.read`` (exactly that
many, so nothing of the protocol that follows is swallowed), then ``exec``\\ s
it. The stream answers that request inside ``readline`` before the ``ready``
line, so ``AgentConnection.handshake`` never sees it. Why not ``python -m
mnp.agent`` first and ``python -c SOURCE`` after an "No module named mnp": that
costs a second exec and python start on every host without mnp (the usual
case: nodes need nothing but python3), depends on the wording of an error
message, and a 100 KB argument quoted for the remote shell comes close to
Linux's 128 KiB limit on one argv string. Stdin has no size limit and the
bootstrap line contains no single quote, no ``!`` and no newline, so any login
shell (sh, bash, zsh, csh) passes it through unchanged. Lines a chatty login
shell prints before the agent's first JSON line are skipped (up to 64 KiB).

``SshOptions.python`` is one program (a name on the host's PATH or a path),
quoted as a single word: ``python = "/opt/py 3/bin/python3"`` works, options do
not (point it at a wrapper script when a host needs them).

Connection settings: the inventory's explicit ``user``, ``port``, ``identity``,
``known_hosts`` and ``connect_timeout`` win; the rest (HostName, ProxyJump, ...)
comes from the inventory's ``config`` files, then ``~/.ssh/config`` (first
value wins, as in OpenSSH). Keepalives every 30 s declare a silent host lost
after 90 s unless ssh traffic proves it alive.

Ciphers: AES-GCM first, then asyncssh's defaults, unless an ssh_config file
given sets ``Ciphers``. asyncssh encrypts on the controller's one thread, and
its ``chacha20-poly1305@openssh.com`` (OpenSSH's first choice, asyncssh's
too) runs four calls into ``cryptography`` a packet: measured here 14 us a
512-byte packet, against 2.3-2.6 us for ``aes128-gcm@openssh.com`` and
``aes256-gcm@openssh.com`` (one call).

Host keys are checked against ``known_hosts`` (plus ``/etc/ssh/ssh_known_hosts``
when readable, as OpenSSH does). An unknown or changed key is refused during
the key exchange, before authentication, so nothing is sent to that host; the
error names the host and the key's SHA256 fingerprint. ``known_hosts = "none"``
turns checking off, with one warning per transport.

A refused host key raises ``HostKeyError``; every other failure an ``SshError``
(a ``TransportError``) whose ``category`` (``dns``, ``refused``, ``timeout``,
``unreachable``, ``auth``, ``no-python``, ``agent``, ``ssh``, ``config``) says
what failed, for ``mnp hosts --check``. Once the agent is ready, a dropped
connection surfaces as ``ConnectionResetError`` (or end of stream) from
``readline``, which ``AgentConnection`` reports as the host lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import socket

import asyncssh

from mnp.errors import HostKeyError, TransportError
from mnp.model import HostSpec, Inventory, SshOptions
from mnp.transport.base import AgentStream, Transport
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

log = logging.getLogger("mnp")

KEEPALIVE_INTERVAL = 30.0  # seconds; a silent peer is declared lost after 3 of these
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_CIPHERS_LINE = re.compile(r"\s*ciphers\s*[=\s]", re.IGNORECASE)  # `Ciphers x`, `Ciphers=x`


def cipher_preference(config: list[str]) -> list[str] | None:
    """The ciphers to offer, best first: ``FAST_CIPHERS`` then asyncssh's defaults;
    None (asyncssh decides, from the config) when one of the ``config`` files has a
    ``Ciphers`` line."""
    for path in config:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                if any(_CIPHERS_LINE.match(line) for line in f):
                    return None
        except OSError:
            return None  # asyncssh says what is wrong with it
    from asyncssh.encryption import get_default_encryption_algs

    rest = [a.decode() for a in get_default_encryption_algs()]
    return [*FAST_CIPHERS, *(a for a in rest if a not in FAST_CIPHERS)]


class _Client(asyncssh.SSHClient):
    """Remembers the host key it was shown, to name it when it is refused."""

    def __init__(self, transport: SshTransport, name: str) -> None:
        self._transport = transport
        self._name = name
        self.conn: asyncssh.SSHClientConnection | None = None
        self.offered: tuple[str, str, str, int] | None = None  # algorithm, fp, addr, port
        self.ca = False

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self._transport._forget(self._name, self.conn)

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.offered = (key.get_algorithm(), key.get_fingerprint("sha256"), addr, port)
        return False

    def validate_host_ca_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.offered = (key.get_algorithm(), key.get_fingerprint("sha256"), addr, port)
        self.ca = True
        return False


class _SshStream(BootstrappedStream):
    """The agent's stdin/stdout over one SSH channel; serves the source request."""

    def __init__(self, host: str, python: str, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        self.host = host
        self.python = python
        self.proc = proc
        self.shipped = False  # whether the agent's source was sent (mnp not importable there)
        self._noise = bytearray()  # non-protocol lines the login shell printed before the agent
        self._ready = False
        self._closed = False
        self._stderr = bytearray()
        self._stderr_task = asyncio.get_running_loop().create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            while chunk := await self.proc.stderr.read(STDERR_TAIL):
                self._stderr += chunk
                del self._stderr[:-STDERR_TAIL]

    def stderr_tail(self) -> str:
        return self._stderr.decode(errors="replace")

    async def _readline(self) -> bytes:
        try:
            return await self.proc.stdout.readline()
        except (asyncssh.Error, OSError) as e:
            if not self._ready:
                raise SshError(
                    self.host, "ssh", f"connection lost while starting the agent: {e}"
                ) from None
            # AgentConnection's reader treats ConnectionError as "host lost".
            raise ConnectionResetError(f"ssh connection to {self.host} lost: {e}") from None

    async def _start_failure(self) -> SshError:
        """The agent's process ended before ``ready``: say why, from its exit status."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait_closed(), 2)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 1)
        status = self.proc.exit_status
        said = self.stderr_tail().strip() or self._noise.decode(errors="replace").strip()
        tail = " ".join(said.splitlines()[-3:])[-400:]
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
            self.proc.stdin.write(data)
        except (asyncssh.Error, OSError, RuntimeError) as e:
            raise TransportError(f"{self.host}: agent connection is down: {e}") from None

    async def drain(self) -> None:
        try:
            await self.proc.stdin.drain()
        except (asyncssh.Error, OSError) as e:
            raise TransportError(f"{self.host}: agent connection is down: {e}") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(asyncssh.Error, OSError, RuntimeError):
            self.proc.stdin.write_eof()
        # The agent kills its tasks when its stdin closes and then exits; give it
        # that long, then close the channel (sshd then closes its pipes anyway).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait_closed(), CLOSE_WAIT)
        self.proc.close()
        with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
            await asyncio.wait_for(self.proc.wait_closed(), 2)
        self._stderr_task.cancel()


class SshTransport(Transport):
    """Agents over SSH; one connection per host, opened on first use, reopened after a loss."""

    name = "ssh"

    def __init__(self, inventory: Inventory | None = None) -> None:
        self.inventory = inventory
        self._conns: dict[str, asyncssh.SSHClientConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def open(self, host: HostSpec, agent_args: list[str]) -> AgentStream:
        python = host.ssh.python or "python3"
        command = agent_command(host, agent_args)
        for attempt in (1, 2):
            conn = await self.connect(host)
            try:
                proc = await asyncio.wait_for(
                    conn.create_process(command, encoding=None), host.ssh.connect_timeout
                )
            except TimeoutError:
                raise SshError(
                    host.name,
                    "timeout",
                    f"no answer to the exec request within {host.ssh.connect_timeout:g}s",
                ) from None
            except (asyncssh.Error, OSError) as e:
                if _alive(conn, e):
                    # The server said no; the connection (maybe other agents' too) is fine.
                    raise SshError(host.name, "ssh", f"the server refused a session: {e}") from None
                # A cached connection that died unnoticed: reconnect once.
                self._forget(host.name, conn)
                conn.close()
                if attempt == 2:
                    raise SshError(host.name, "ssh", f"cannot start the agent: {e}") from None
                continue
            return _SshStream(host.name, python, proc)
        raise AssertionError("unreachable")

    async def connect(self, host: HostSpec) -> asyncssh.SSHClientConnection:
        """The host's connection, opening it if there is none (safe to call concurrently)."""
        lock = self._locks.setdefault(host.name, asyncio.Lock())
        async with lock:
            conn = self._conns.get(host.name)
            if conn is None or conn.is_closed():
                conn = await self._connect(host)
                self._conns[host.name] = conn
            return conn

    def _forget(self, name: str, conn: asyncssh.SSHClientConnection) -> None:
        if self._conns.get(name) is conn:
            del self._conns[name]

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
                await asyncio.wait_for(conn.wait_closed(), 5)

    # --- connecting ---------------------------------------------------------

    def _known_hosts(self, opts: SshOptions) -> object:
        """asyncssh's ``known_hosts`` argument for these options."""
        kh = opts.known_hosts
        if kh is None:
            return ()  # asyncssh's default: ssh_config's UserKnownHostsFile or ~/.ssh/known_hosts
        if kh.strip().lower() == "none":
            return None  # whoever uses the inventory warns: spec.unverified_warning
        files = [os.path.expanduser(kh)]
        if os.access(GLOBAL_KNOWN_HOSTS, os.R_OK):
            files.append(GLOBAL_KNOWN_HOSTS)
        files = [f for f in files if os.path.isfile(f)]
        # No file at all trusts no key (asyncssh would treat a missing file as an error).
        return files or ([], [], [])

    def _config_files(self, host: HostSpec) -> list[str]:
        """The inventory's ssh_config files, then ~/.ssh/config (first value wins)."""
        return config_files(host)

    def _options(self, host: HostSpec) -> dict[str, object]:
        """asyncssh.connect's keyword arguments: explicit inventory options over ssh_config."""
        opts = host.ssh
        config = self._config_files(host)
        kwargs: dict[str, object] = {
            "config": config,
            "known_hosts": self._known_hosts(opts),
            "connect_timeout": opts.connect_timeout,
            "keepalive_interval": KEEPALIVE_INTERVAL,
            "keepalive_count_max": 3,
        }
        if opts.user:
            kwargs["username"] = opts.user
        if opts.port:
            kwargs["port"] = opts.port
        if opts.identity:
            kwargs["client_keys"] = identity_files(host)
        ciphers = cipher_preference(config)
        if ciphers is not None:
            kwargs["encryption_algs"] = ciphers
        return kwargs

    async def _connect(self, host: HostSpec) -> asyncssh.SSHClientConnection:
        opts = host.ssh
        # stat()s of the inventory's files, off the loop (asyncssh itself reads them in
        # its executor): a slow file system never holds up the controller's other hosts
        kwargs = await asyncio.to_thread(self._options, host)
        client: _Client | None = None

        def factory() -> _Client:
            nonlocal client
            client = _Client(self, host.name)
            return client

        try:
            conn = await asyncssh.connect(host.name, client_factory=factory, **kwargs)
        except asyncssh.HostKeyNotVerifiable as e:
            # reads known_hosts to say whether the key changed: off the loop too
            raise await asyncio.to_thread(
                self._host_key_error, host, client, kwargs["known_hosts"], e
            ) from None
        except socket.gaierror as e:
            raise SshError(
                host.name, "dns", f"cannot resolve the host name: {e.strerror}"
            ) from None
        except ConnectionRefusedError as e:
            raise SshError(host.name, "refused", f"connection refused: {e}") from None
        except TimeoutError:
            raise SshError(
                host.name, "timeout", f"no SSH connection within {opts.connect_timeout:g}s"
            ) from None
        except asyncssh.PermissionDenied as e:
            user = opts.user or "the ssh_config/local user"
            raise SshError(
                host.name,
                "auth",
                f"authentication failed for {user} ({e.reason}); "
                "check the identity and the host's authorized_keys",
            ) from None
        except asyncssh.KeyImportError as e:
            raise SshError(host.name, "config", f"cannot load the identity: {e}") from None
        except asyncssh.ConfigParseError as e:
            raise SshError(host.name, "config", f"ssh config: {e}") from None
        except asyncssh.Error as e:
            raise SshError(host.name, "ssh", f"{type(e).__name__}: {e.reason}") from None
        except OSError as e:
            raise SshError(host.name, "unreachable", str(e)) from None
        return conn

    def _host_key_error(
        self, host: HostSpec, client: _Client | None, known_hosts: object, exc: Exception
    ) -> HostKeyError:
        if client is None or client.offered is None:
            return HostKeyError(f"{host.name}: host-key: {exc}")
        alg, fp, addr, port = client.offered
        target = addr if port == 22 else f"[{addr}]:{port}"
        path = os.path.expanduser(host.ssh.known_hosts or "~/.ssh/known_hosts")
        where = path if os.path.isfile(path) else f"{path} (which does not exist)"
        changed = False
        if isinstance(known_hosts, list) and known_hosts:
            with contextlib.suppress(Exception):  # only refines the message
                trusted = asyncssh.match_known_hosts(known_hosts, addr, addr, port)[0]
                named = asyncssh.match_known_hosts(known_hosts, host.name, addr, port)[0]
                changed = bool(trusted or named)
        what = "CA key" if client.ca else "host key"
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


def _alive(conn: asyncssh.SSHClientConnection, exc: Exception) -> bool:
    """Whether a failed session open left the connection usable (a refusal, not a loss)."""
    return (
        isinstance(exc, asyncssh.ChannelOpenError)
        and not conn.is_closed()
        and exc.reason != "SSH connection closed"
    )


def make(inventory: Inventory) -> SshTransport:
    return SshTransport(inventory)
