"""What both SSH transports share and neither needs asyncssh for.

``SshError`` and its categories, the remote command line (the bootstrap itself is
``mnp.transport.bootstrap``, shared with srun), and the checks of the inventory's
``config`` and ``identity`` files. ``mnp.transport.openssh``
imports only this, so a CLI whose inventory uses OpenSSH never imports asyncssh.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from mnp.errors import TransportError
from mnp.model import HostSpec
from mnp.transport.base import AgentStream
from mnp.transport.bootstrap import SOURCE_REQUEST, agent_blob, bootstrap

GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
STDERR_TAIL = 4096
CLOSE_WAIT = 5.0  # seconds the agent gets to tear down after its stdin closes
NOISE_LIMIT = 64 * 1024  # bytes of login-shell chatter tolerated before the agent's first line


class SshError(TransportError):
    """A ``TransportError`` that says which step failed (``category``)."""

    def __init__(self, host: str, category: str, detail: str) -> None:
        super().__init__(f"{host}: {category}: {detail}")
        self.host = host
        self.category = category


def agent_command(host: HostSpec, agent_args: list[str]) -> str:
    """The exec request's command line: every word quoted for the remote shell."""
    python = host.ssh.python or "python3"
    return shlex.join(
        [python, "-c", bootstrap(host.ssh.agent_cache), "--parent-death", *agent_args]
    )


def config_files(host: HostSpec) -> list[str]:
    """The inventory's ssh_config files (each must exist), then ~/.ssh/config when readable."""
    files = [os.path.expanduser(c) for c in host.ssh.config]
    for f in files:
        if not os.path.isfile(f):
            raise SshError(host.name, "config", f"ssh config file {f} does not exist")
    user = Path("~/.ssh/config").expanduser()
    if os.path.isfile(user) and os.access(user, os.R_OK):  # never a FIFO: it would block
        files.append(str(user))
    return files


def identity_files(host: HostSpec) -> list[str]:
    """The inventory's identity files, expanded; a missing one is a ``config`` error."""
    keys = [os.path.expanduser(k) for k in host.ssh.identity]
    missing = [k for k in keys if not os.path.isfile(k)]
    if missing:
        raise SshError(host.name, "config", f"identity file {missing[0]} does not exist")
    return keys


class BootstrappedStream(AgentStream):
    """What both SSH clients' agent streams do until the agent's ``ready``: answer the
    bootstrap's source request, step over what a chatty login shell (.bashrc echoing a
    banner) printed first, and say why a session ended early. A client provides
    ``_readline`` (its stdout, errors mapped) and ``_start_failure``; its ``__init__``
    sets ``host``, ``python``, ``shipped``, ``_noise`` and ``_ready``."""

    host: str
    python: str
    shipped: bool
    _noise: bytearray
    _ready: bool

    async def _readline(self) -> bytes:
        raise NotImplementedError

    async def _start_failure(self) -> Exception:
        raise NotImplementedError

    async def readline(self) -> bytes:
        line = await self._readline()
        if self._ready:
            return line
        while True:
            if line == SOURCE_REQUEST:
                await self._send_source()
            elif not line:
                raise await self._start_failure()
            elif line.lstrip().startswith(b"{") or len(self._noise) >= NOISE_LIMIT:
                self._ready = True
                return line
            else:
                self._noise += line
            line = await self._readline()

    async def _send_source(self) -> None:
        try:
            blob = agent_blob()
        except (ImportError, AttributeError) as e:
            raise SshError(
                self.host,
                "agent",
                f"mnp is not importable by {self.python} there and cannot be shipped: {e}",
            ) from None
        self.write(blob)
        await self.drain()
        self.shipped = True
