"""Real OpenSSH servers on loopback addresses, for the integration tests.

``SshdCluster.start(n)`` runs ``/usr/sbin/sshd -D -e -f CFG`` on 127.0.0.2,
127.0.0.3, ... (port 22 when it is free on all of them, else one free high
port), each with its own ed25519 host key, all accepting one generated user
key for root. It writes next to them:

- ``known_hosts``: every server's host key (``[127.0.0.2]:PORT`` form off port 22);
- ``ssh_config``: ``Host sshd-1`` → ``HostName 127.0.0.2`` etc., so the
  inventory's host *names* are what connections go to, as on a real cluster;
- ``inventory.toml``: SPEC §3 for those hosts (``[ssh] config = [ssh_config]``);
- ``agent-cache/``: the hosts' agent cache (``[ssh] agent_cache``), so that tests
  never write to root's ``~/.cache``;
- ``python-mnp`` / ``python-nomnp``: interpreters (wrapper scripts) with and
  without ``mnp`` importable, to exercise both agent start paths.

``stop(name)`` kills one server and every session it serves (host loss),
``start_host(name)`` brings it back with the same key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import mnp
from mnp.model import ComputeEnvironment, HostSpec, Inventory, Queue, SshOptions

SSHD = os.environ.get("MNP_TEST_SSHD", "/usr/sbin/sshd")  # sshd insists on an absolute path
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
FIRST_ADDRESS = 2  # 127.0.0.2; 127.0.0.1 is left to everything else on the machine
HIGH_PORTS = range(22200, 22300)
REPO = Path(mnp.__file__).resolve().parent.parent


class SshdUnavailable(Exception):
    """This machine cannot run the servers (no sshd, no ssh-keygen)."""


@dataclass
class SshdHost:
    name: str
    address: str
    port: int
    config: Path
    log: Path
    host_key: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def public_key(self) -> str:
        """``ssh-ed25519 AAAA...`` (no comment)."""
        return " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])

    @property
    def known_hosts_target(self) -> str:
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def known_hosts_line(self, public_key: str | None = None) -> str:
        return f"{self.known_hosts_target} {public_key or self.public_key}\n"

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` of the host key, as ssh-keygen -l prints it."""
        out = subprocess.run(
            [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(self.host_key.with_suffix(".pub"))],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()[1]


@dataclass
class SshdCluster:
    root: Path
    hosts: list[SshdHost]
    port: int
    identity: Path
    known_hosts: Path
    ssh_config: Path
    inventory_toml: Path
    python_mnp: Path
    python_nomnp: Path
    _extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ssh_transport: str = "asyncssh"  # the inventories' [ssh] transport

    @property
    def agent_cache(self) -> Path:
        """The inventories' ``[ssh] agent_cache``: in the cluster's folder, not root's home."""
        return self.root / "agent-cache"

    def with_transport(self, name: str) -> SshdCluster:
        """The same servers, with inventories (and ``inventory.toml``) that use ``name``."""
        if name == self.ssh_transport:
            return self
        other = dataclasses.replace(
            self, ssh_transport=name, inventory_toml=self.root / f"inventory-{name}.toml"
        )
        other.inventory_toml.write_text(other.toml())
        return other

    # --- building -----------------------------------------------------------

    @classmethod
    def start(cls, root: Path, n: int = 4, net: int = 0) -> SshdCluster:
        """``n`` servers on 127.0.NET.2, 127.0.NET.3, ..."""
        if not os.access(SSHD, os.X_OK):
            raise SshdUnavailable(f"{SSHD} is missing (apt-get install openssh-server)")
        if not os.access(SSH_KEYGEN, os.X_OK):
            raise SshdUnavailable("ssh-keygen is missing (apt-get install openssh-client)")
        if not 1 <= n <= 200 or not 0 <= net <= 255:
            raise ValueError(f"between 1 and 200 servers on 127.0.0-255.x, not {n} on {net}")
        root.mkdir(parents=True, exist_ok=True)
        # sshd refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        addresses = [f"127.0.{net}.{FIRST_ADDRESS + i}" for i in range(n)]
        port = _pick_port(addresses)
        identity = root / "id_ed25519"
        _keygen(identity, "mnp-test-user")
        (root / "authorized_keys").write_text(identity.with_suffix(".pub").read_text())
        hosts = []
        for i, addr in enumerate(addresses, start=1):
            name = f"sshd-{i}"
            hdir = root / name
            hdir.mkdir(exist_ok=True)
            key = hdir / "ssh_host_ed25519_key"
            _keygen(key, name)
            cfg = hdir / "sshd_config"
            cfg.write_text(_sshd_config(addr, port, key, root / "authorized_keys", hdir))
            hosts.append(SshdHost(name, addr, port, cfg, hdir / "sshd.log", key))
        known_hosts = root / "known_hosts"
        known_hosts.write_text("".join(h.known_hosts_line() for h in hosts))
        ssh_config = root / "ssh_config"
        ssh_config.write_text(_ssh_config(hosts, identity, known_hosts))
        cluster = cls(
            root=root,
            hosts=hosts,
            port=port,
            identity=identity,
            known_hosts=known_hosts,
            ssh_config=ssh_config,
            inventory_toml=root / "inventory.toml",
            python_mnp=_wrapper(root / "python-mnp", f"PYTHONPATH={REPO}", sys.executable),
            python_nomnp=_wrapper(root / "python-nomnp", "", sys.executable, "-I", "-S"),
        )
        cluster.inventory_toml.write_text(cluster.toml())
        try:
            for h in hosts:
                cluster._spawn(h)
            cluster.wait_ready()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _spawn(self, h: SshdHost) -> None:
        with open(h.log, "ab") as log:
            h.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(h.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, names: list[str] | None = None, timeout: float = 20.0) -> None:
        """Until every (named) server answers with an SSH banner."""
        deadline = time.monotonic() + timeout
        pending = [self.host(n) for n in names] if names else list(self.hosts)
        while pending:
            h = pending[0]
            assert h.proc is not None
            if h.proc.poll() is not None:
                said = h.log.read_text()[-2000:]
                raise RuntimeError(f"sshd for {h.name} exited with {h.proc.returncode}: {said}")
            if _banner(h.address, h.port):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd for {h.name} not answering on {h.address}:{h.port}")
            time.sleep(0.05)

    # --- what the tests use ---------------------------------------------------

    def host(self, name: str) -> SshdHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def ssh_options(self, **overrides: object) -> SshOptions:
        """What ``inventory.toml``'s ``[ssh]`` table says, with ``overrides``."""
        values: dict[str, object] = {
            "user": "root",
            "port": self.port,
            "known_hosts": str(self.known_hosts),
            "identity": (str(self.identity),),
            "connect_timeout": 10.0,
            "python": str(self.python_mnp),
            "config": (str(self.ssh_config),),
            "transport": self.ssh_transport,
            "agent_cache": str(self.agent_cache),
        }
        values.update(overrides)
        return SshOptions(**values)  # type: ignore[arg-type]

    def inventory(self, names: list[str] | None = None, **ssh: object) -> Inventory:
        """An ``Inventory`` for (some of) these servers, built directly from the model."""
        opts = self.ssh_options(**ssh)
        chosen = [self.host(n) for n in names] if names else self.hosts
        hosts = tuple(HostSpec(name=h.name, address=h.address, ssh=opts) for h in chosen)
        names_ = tuple(h.name for h in hosts)
        return Inventory(
            source=str(self.inventory_toml),
            hosts=hosts,
            compute_environments={"default": ComputeEnvironment("default", names_)},
            queues={"default": Queue("default", 1, ("default",))},
            ssh=opts,
        )

    def toml(self) -> str:
        lines = [
            "# written by tests/integration/sshd.py: OpenSSH servers on loopback",
            "[ssh]",
            'user = "root"',
            f"port = {self.port}",
            f'known_hosts = "{self.known_hosts}"',
            f'identity = "{self.identity}"',
            'connect_timeout = "10s"',
            f'python = "{self.python_mnp}"',
            f'config = ["{self.ssh_config}"]',
            f'transport = "{self.ssh_transport}"',
            f'agent_cache = "{self.agent_cache}"',
        ]
        for h in self.hosts:
            lines += ["", "[[hosts]]", f'names = "{h.name}"', f'address = "{h.address}"']
        return "\n".join(lines) + "\n"

    def known_hosts_file(
        self, path: Path, *, without: tuple[str, ...] = (), replace: dict[str, str] | None = None
    ) -> Path:
        """A known_hosts that lacks the hosts in ``without`` and has other keys for ``replace``."""
        replace = replace or {}
        path.write_text(
            "".join(
                h.known_hosts_line(replace.get(h.name)) for h in self.hosts if h.name not in without
            )
        )
        return path

    def new_public_key(self, path: Path) -> str:
        """A fresh ed25519 public key, ``ssh-ed25519 AAAA...``, e.g. to fake a changed host key."""
        _keygen(path, "other")
        return " ".join(path.with_suffix(".pub").read_text().split()[:2])

    def sessions(self, name: str) -> list[psutil.Process]:
        """The per-connection sshd processes of that server (not what they run)."""
        h = self.host(name)
        if h.proc is None or h.proc.poll() is not None:
            return []
        found = []
        for p in _tree(h.proc.pid):
            with contextlib.suppress(psutil.Error):
                if p.exe() == SSHD or p.name() == "sshd":
                    found.append(p)
        return found

    def agents(self, name: str) -> list[psutil.Process]:
        """What that server's sessions run that is not sshd (agents and their tasks)."""
        h = self.host(name)
        if h.proc is None:
            return []
        sessions = {p.pid for p in self.sessions(name)}
        return [p for p in _tree(h.proc.pid) if p.pid not in sessions]

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        """The host's SSH goes away: its sshd and every session it serves get ``sig``.

        What the sessions ran (agents) sees its stdin close, as on a network cut.
        """
        h = self.host(name)
        if h.proc is None:
            return
        victims = self.sessions(name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(h.proc.pid, sig)
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.proc.wait(5)
        h.proc = None

    def start_host(self, name: str) -> None:
        """Bring a stopped server back (same address, port and host key)."""
        h = self.host(name)
        if h.proc is not None and h.proc.poll() is None:
            return
        self._spawn(h)
        self.wait_ready([name])

    def close(self) -> None:
        """Kill every server and everything still running under them."""
        for h in self.hosts:
            if h.proc is None:
                continue
            tree = _tree(h.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(h.proc.pid, signal.SIGKILL)
            for p in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.proc.wait(5)
            h.proc = None


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _keygen(path: Path, comment: str) -> None:
    for p in (path, path.with_suffix(".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _sshd_config(addr: str, port: int, key: Path, authorized: Path, hdir: Path) -> str:
    return f"""\
ListenAddress {addr}:{port}
HostKey {key}
PidFile {hdir / "sshd.pid"}
AuthorizedKeysFile {authorized}
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
MaxSessions 100
MaxStartups 100:30:200
LoginGraceTime 30
LogLevel INFO
PrintMotd no
Subsystem sftp internal-sftp
"""


def _ssh_config(hosts: list[SshdHost], identity: Path, known_hosts: Path) -> str:
    out = ["# written by tests/integration/sshd.py\n"]
    for h in hosts:
        out.append(
            f"Host {h.name}\n"
            f"    HostName {h.address}\n"
            f"    Port {h.port}\n"
            "    User root\n"
            f"    IdentityFile {identity}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {known_hosts}\n"
            "    StrictHostKeyChecking yes\n\n"
        )
    return "".join(out)


def _wrapper(path: Path, env: str, *argv: str) -> Path:
    words = " ".join(f"'{a}'" for a in argv)
    path.write_text(f'#!/bin/sh\n{env + " " if env else ""}exec {words} "$@"\n')
    path.chmod(0o755)
    return path


def _free(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def _pick_port(addresses: list[str]) -> int:
    """22 when it is free on every address (as on a real cluster), else one free high port."""
    if os.geteuid() == 0 and all(_free(a, 22) for a in addresses):
        return 22
    start = os.getpid() % len(HIGH_PORTS)  # spread concurrent test sessions apart
    for i in range(len(HIGH_PORTS)):
        port = HIGH_PORTS[(start + i) % len(HIGH_PORTS)]
        if all(_free(a, port) for a in addresses):
            return port
    raise RuntimeError(f"no port free on all of {addresses[0]}..{addresses[-1]}")


def _banner(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False
