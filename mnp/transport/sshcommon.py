"""What both SSH transports share and neither needs asyncssh for.

The bootstrap the host runs (see ``mnp.transport.ssh``), the agent's source as
it is shipped, ``SshError`` and its categories, and the checks of the
inventory's ``config`` and ``identity`` files. ``mnp.transport.openssh``
imports only this, so a CLI whose inventory uses OpenSSH never imports asyncssh.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import zlib
from pathlib import Path

from mnp.errors import TransportError
from mnp.model import HostSpec

GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
STDERR_TAIL = 4096
CLOSE_WAIT = 5.0  # seconds the agent gets to tear down after its stdin closes
SOURCE_REQUEST = b"mnp-agent: send source\n"
NOISE_LIMIT = 64 * 1024  # bytes of login-shell chatter tolerated before the agent's first line

_BOOTSTRAP = """\
import sys
try:
    import mnp.agent
except ImportError:
    import os, zlib
    os.write(1, b"mnp-agent: send source\\n")
    _h = b""
    while _h[-1:] != b"\\n":
        _c = os.read(0, 1)
        if not _c:
            sys.exit(3)
        _h += _c
    _n = int(_h)
    _b = b""
    while len(_b) < _n:
        _c = os.read(0, _n - len(_b))
        if not _c:
            sys.exit(3)
        _b += _c
    _src = zlib.decompress(_b)
    del _h, _c, _n, _b
    exec(compile(_src, "<mnp.agent>", "exec"))
else:
    import runpy
    runpy.run_module("mnp.agent", run_name="__main__", alter_sys=True)
"""
# One line without single quotes: json.dumps writes a valid Python string literal.
BOOTSTRAP = "exec(" + json.dumps(_BOOTSTRAP) + ")"


class SshError(TransportError):
    """A ``TransportError`` that says which step failed (``category``)."""

    def __init__(self, host: str, category: str, detail: str) -> None:
        super().__init__(f"{host}: {category}: {detail}")
        self.host = host
        self.category = category


def agent_command(python: str, agent_args: list[str]) -> str:
    """The exec request's command line: every word quoted for the remote shell."""
    return shlex.join([python, "-c", BOOTSTRAP, "--parent-death", *agent_args])


@functools.cache
def _agent_blob() -> bytes:
    """``bundle_source()``, compressed, with its length line: what the bootstrap reads."""
    from mnp.agent import bundle_source  # the agent package is imported only when shipped

    data = zlib.compress(bundle_source().encode(), 9)
    return b"%d\n" % len(data) + data


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
