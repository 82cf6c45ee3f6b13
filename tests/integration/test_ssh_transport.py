"""The SSH transport against real OpenSSH servers on loopback (tests/integration/sshd.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mnp.errors import HostKeyError, TransportError
from mnp.model import HostSpec, Inventory
from mnp.transport import transports_for
from mnp.transport.base import AgentConnection, Event, Transport
from mnp.transport.bootstrap import agent_digest
from mnp.transport.sshcommon import SshError
from tests.helpers import procs_with_env
from tests.integration.sshd import SshdCluster

pytestmark = pytest.mark.ssh

AGENT = Path(__file__).resolve().parents[2] / "mnp" / "agent" / "__main__.py"
PWNED = Path("/tmp/mnp-pwned")
HOME = Path("~").expanduser()


@pytest.fixture(scope="module", autouse=True)
def _agent_written() -> None:
    """The agent is written alongside this transport: wait a little for it to appear."""
    deadline = time.monotonic() + 60
    while not AGENT.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{AGENT} does not exist")
        time.sleep(1)


class Agents:
    """Agents opened through one transport, with every event and loss they report."""

    def __init__(self, transport: Transport, token: str) -> None:
        self.transport = transport
        self.token = token
        self.conns: dict[str, AgentConnection] = {}
        self.events: list[tuple[str, Event]] = []
        self.lost: dict[str, str] = {}
        self._changed = asyncio.Event()

    async def open(self, host: HostSpec) -> AgentConnection:
        stream = await self.transport.open(host, ["--ctl", self.token])
        conn = AgentConnection(host.name, stream)
        await conn.handshake(30)
        conn.start(self._on_event, self._on_lost)
        self.conns[host.name] = conn
        return conn

    def _on_event(self, host: str, ev: Event) -> None:
        self.events.append((host, ev))
        self._changed.set()

    def _on_lost(self, host: str, reason: str) -> None:
        self.lost[host] = reason
        self._changed.set()

    async def until(self, check: object, within: float = 10.0) -> None:
        assert callable(check)
        deadline = time.monotonic() + within
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; events: {self.events[-10:]}, lost: {self.lost}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass

    def of(self, host: str, tid: str, ev: str) -> list[Event]:
        return [e for h, e in self.events if h == host and e.get("tid") == tid and e["ev"] == ev]

    async def run(self, host: str, tid: str, argv: list[str], **spawn: object) -> tuple[Event, str]:
        """Spawn a task and wait until it is gone: its ``exited`` event and its stdout."""
        self.conns[host].send({"op": "spawn", "tid": tid, "argv": argv, "env": {}, **spawn})
        await self.conns[host].drain()
        await self.until(lambda: self.of(host, tid, "gone"))
        (exited,) = self.of(host, tid, "exited")
        out = "".join(e["data"] for e in self.of(host, tid, "out") if e["fd"] == 1)
        return exited, out

    async def close(self) -> None:
        for conn in self.conns.values():
            await conn.close()
        await self.transport.close()


@pytest.fixture
def token() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def agents(sshd_hosts: SshdCluster, token: str) -> AsyncIterator[Agents]:
    a = Agents(_transport(sshd_hosts.inventory()), token)
    try:
        yield a
    finally:
        await a.close()


def _transport(inventory: Inventory) -> Any:
    """The inventory's SSH transport (asyncssh or OpenSSH, per its ``[ssh] transport``)."""
    return transports_for(inventory)["ssh"]


def _is_ssh_stream(stream: object) -> bool:
    """One of the SSH transports' streams (they say whether the agent's source was shipped)."""
    return type(stream).__name__ in ("_SshStream", "_OpenSshStream") and hasattr(stream, "shipped")


def procs_with_arg(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(text in a for a in p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def accepted(cluster: SshdCluster, name: str) -> int:
    """How many logins that server has accepted so far."""
    return cluster.host(name).log.read_text().count("Accepted publickey")


async def test_tasks_on_four_hosts(sshd_hosts: SshdCluster, agents: Agents) -> None:
    inv = sshd_hosts.inventory()
    conns = await asyncio.gather(*(agents.open(h) for h in inv.hosts))
    for conn in conns:
        assert conn.facts["cores"] >= 1 and conn.facts["memory"] > 0
        assert _is_ssh_stream(conn.stream) and not conn.stream.shipped
    for i, h in enumerate(inv.hosts):
        exited, out = await agents.run(h.name, f"{i}", ["echo", "hello", h.name])
        assert (exited["code"], out) == (0, f"hello {h.name}\n")
        exited, out = await agents.run(h.name, f"{i}#1", ["sh", "-c", "echo $MNP_JOB_ID"])
        assert (exited["code"], out) == (0, f"{i}#1\n")
        exited, out = await agents.run(h.name, f"{i}#2", ["hostname"])
        assert (exited["code"], out) == (0, socket.gethostname() + "\n")
    assert agents.lost == {}


@pytest.mark.security("metacharacters reach the task literally")
async def test_arguments_reach_the_task_literally(sshd_hosts: SshdCluster, agents: Agents) -> None:
    assert not _exists(PWNED, remove=True)
    h = sshd_hosts.inventory().hosts[0]
    await agents.open(h)
    nasty = "$(touch /tmp/mnp-pwned); rm -rf ~ `touch /tmp/mnp-pwned` 'q' \"d\" *"
    for expand in (False, True):  # `$(` is not a variable: expansion leaves it alone too
        exited, out = await agents.run(h.name, f"{expand}", ["echo", nasty], expand=expand)
        assert (exited["code"], out) == (0, nasty + "\n")
    assert not _exists(PWNED)
    assert _exists(HOME)


@pytest.mark.security("an unknown SSH host key is refused before login")
async def test_unknown_host_key_is_refused_before_login(
    sshd_hosts: SshdCluster, token: str, tmp_path: Path
) -> None:
    kh = sshd_hosts.known_hosts_file(tmp_path / "known_hosts", without=("sshd-2",))
    inv = sshd_hosts.inventory(known_hosts=str(kh))
    before = accepted(sshd_hosts, "sshd-2")
    t = _transport(inv)
    try:
        with pytest.raises(HostKeyError) as err:
            await t.open(inv.host("sshd-2"), ["--ctl", token])
        # the other hosts in that file are fine
        stream = await t.open(inv.host("sshd-1"), ["--ctl", token])
        await AgentConnection("sshd-1", stream).handshake(30)
        await stream.close()
    finally:
        await t.close()
    message = str(err.value)
    assert "sshd-2" in message and sshd_hosts.host("sshd-2").fingerprint in message
    assert "not in" in message and str(kh) in message
    assert accepted(sshd_hosts, "sshd-2") == before  # nothing got as far as a login
    assert procs_with_arg(token) == []


@pytest.mark.security("a changed SSH host key is refused before login")
async def test_changed_host_key_is_refused(
    sshd_hosts: SshdCluster, token: str, tmp_path: Path
) -> None:
    other = sshd_hosts.new_public_key(tmp_path / "other_key")
    kh = sshd_hosts.known_hosts_file(tmp_path / "known_hosts", replace={"sshd-3": other})
    inv = sshd_hosts.inventory(known_hosts=str(kh))
    before = accepted(sshd_hosts, "sshd-3")
    t = _transport(inv)
    try:
        with pytest.raises(HostKeyError, match="CHANGED") as err:
            await t.open(inv.host("sshd-3"), ["--ctl", token])
    finally:
        await t.close()
    assert "sshd-3" in str(err.value)
    assert sshd_hosts.host("sshd-3").fingerprint in str(err.value)
    assert accepted(sshd_hosts, "sshd-3") == before
    assert procs_with_arg(token) == []


async def test_known_hosts_none_skips_checks(sshd_hosts: SshdCluster, token: str) -> None:
    """``known_hosts = "none"`` connects without host key checks (the warning is the CLI's
    and the controller's: test_security.py)."""
    inv = sshd_hosts.inventory(known_hosts="none")
    a = Agents(_transport(inv), token)
    try:
        for h in inv.hosts[:2]:
            await a.open(h)
        assert sorted(a.conns) == sorted(h.name for h in inv.hosts[:2])
    finally:
        await a.close()


# The Debian interpreter, when there is one: mnp and psutil are not installed for it.
SYSTEM_PYTHONS = [p for p in ["/usr/bin/python3"] if os.access(p, os.X_OK)]


@pytest.mark.parametrize("python", ["python-nomnp", *SYSTEM_PYTHONS])
async def test_agent_source_is_shipped_where_mnp_is_not_installed(
    sshd_hosts: SshdCluster, token: str, python: str, tmp_path: Path
) -> None:
    if python == "python-nomnp":
        python = str(sshd_hosts.python_nomnp)
    assert not _imports_mnp(python)
    inv = sshd_hosts.inventory(python=python, agent_cache=str(tmp_path / "cache"))
    a = Agents(_transport(inv), token)
    try:
        conn = await a.open(inv.hosts[0])
        assert _is_ssh_stream(conn.stream) and conn.stream.shipped
        assert conn.facts["ev"] == "ready" and conn.facts["cores"] >= 1
        exited, out = await a.run(inv.hosts[0].name, "7", ["sh", "-c", "echo $MNP_JOB_ID"])
        assert (exited["code"], out) == (0, "7\n")
    finally:
        await a.close()


async def _start_and_run(inv: Inventory, token: str) -> bool:
    """Start the first host's agent, run one task there; whether the source was shipped."""
    a = Agents(_transport(inv), token)
    try:
        conn = await a.open(inv.hosts[0])
        assert _is_ssh_stream(conn.stream)
        exited, out = await a.run(inv.hosts[0].name, "3", ["sh", "-c", "echo $MNP_JOB_ID"])
        assert (exited["code"], out) == (0, "3\n")
        return bool(conn.stream.shipped)
    finally:
        await a.close()


async def test_the_agent_is_shipped_once_per_host_then_started_from_its_cache(
    sshd_hosts: SshdCluster, token: str, tmp_path: Path
) -> None:
    cache = tmp_path / "home" / ".cache" / "mnp"
    inv = sshd_hosts.inventory(python=str(sshd_hosts.python_nomnp), agent_cache=str(cache))
    assert await _start_and_run(inv, token)  # first start: shipped, and kept
    root = cache / f"agent-{agent_digest()}"
    assert (root / "_mnp_agent" / "main.py").read_text() == (AGENT.parent / "main.py").read_text()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert [p.name for p in cache.iterdir()] == [root.name]  # no temporary folder left
    assert not await _start_and_run(inv, token)  # then started from the cache
    assert any((root / "_mnp_agent" / "__pycache__").glob("main.*.pyc"))  # compiled once
    other = sshd_hosts.inventory(python=str(sshd_hosts.python_nomnp), agent_cache="none")
    assert await _start_and_run(other, token) and await _start_and_run(other, token)


async def test_a_cache_others_may_write_to_is_not_used(
    sshd_hosts: SshdCluster, token: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    inv = sshd_hosts.inventory(python=str(sshd_hosts.python_nomnp), agent_cache=str(cache))
    assert await _start_and_run(inv, token)
    root = cache / f"agent-{agent_digest()}"
    (root / "_mnp_agent" / "main.py").write_text("raise SystemExit('not this one')\n")
    root.chmod(0o777)  # anyone could have written that: shipped again, run from memory
    assert await _start_and_run(inv, token) and await _start_and_run(inv, token)
    assert (root / "_mnp_agent" / "main.py").read_text().startswith("raise")
    root.chmod(0o700)  # ours again: that file is what runs, and the start fails
    with pytest.raises(TransportError):
        await _start_and_run(inv, token)
    (root / "_mnp_agent" / "main.py").write_text((AGENT.parent / "main.py").read_text())
    (root / "_mnp_agent" / "spawn.py").unlink()  # a module gone: shipped past, from memory
    assert await _start_and_run(inv, token)


async def test_a_chatty_login_shell_does_not_confuse_the_start(
    sshd_hosts: SshdCluster, token: str, tmp_path: Path
) -> None:
    for name, target in (
        ("chatty-mnp", sshd_hosts.python_mnp),
        ("chatty", sshd_hosts.python_nomnp),
    ):
        _write_script(tmp_path / name, f'echo "Welcome to the cluster"; echo; exec {target} "$@"')
        inv = sshd_hosts.inventory(python=str(tmp_path / name), agent_cache=str(tmp_path / name))
        a = Agents(_transport(inv), token)
        try:
            conn = await a.open(inv.hosts[0])
            assert _is_ssh_stream(conn.stream)
            assert conn.stream.shipped == (name == "chatty")
            exited, out = await a.run(inv.hosts[0].name, "1", ["echo", "fine"])
            assert out == "fine\n"
        finally:
            await a.close()


async def test_closing_the_connection_kills_agent_and_tasks(
    sshd_hosts: SshdCluster, agents: Agents, token: str
) -> None:
    h = sshd_hosts.inventory().hosts[1]
    conn = await agents.open(h)
    conn.send({"op": "spawn", "tid": "9", "argv": ["sleep", "1000"], "env": {}})
    await agents.until(lambda: agents.of(h.name, "9", "started"))
    assert len(procs_with_env("MNP_CONTROLLER_ID", token)) == 1
    t0 = time.monotonic()
    await conn.close()
    assert await eventually(lambda: not procs_with_env("MNP_CONTROLLER_ID", token), 3)
    assert await eventually(lambda: not procs_with_arg(token), 3)
    assert time.monotonic() - t0 < 3
    assert agents.lost == {}  # a close we asked for is not a loss


async def test_killed_ssh_session_kills_agent_and_tasks_and_reconnects(
    sshd_hosts: SshdCluster, agents: Agents, token: str
) -> None:
    h = sshd_hosts.inventory().hosts[2]
    conn = await agents.open(h)
    conn.send({"op": "spawn", "tid": "5", "argv": ["sleep", "1000"], "env": {}})
    await agents.until(lambda: agents.of(h.name, "5", "started"))
    # the OpenSSH transport's local ``ssh`` session client carries the command line too
    (agent,) = [p for p in procs_with_arg(token) if p.name() != "ssh"]
    listener = sshd_hosts.host(h.name).proc
    assert listener is not None
    sessions = [p for p in agent.parents() if p.name() == "sshd" and p.pid != listener.pid]
    assert sessions, agent.parents()
    t0 = time.monotonic()
    for p in sessions:
        p.send_signal(signal.SIGKILL)
    await agents.until(lambda: h.name in agents.lost, 5)
    assert "lost" in agents.lost[h.name] or "closed" in agents.lost[h.name], agents.lost
    assert await eventually(lambda: not procs_with_env("MNP_CONTROLLER_ID", token), 3)
    assert await eventually(lambda: not procs_with_arg(token), 3)
    assert time.monotonic() - t0 < 3.5
    # the transport notices and connects again
    conn2 = await agents.open(h)
    exited, out = await agents.run(h.name, "6", ["echo", "back"])
    assert (exited["code"], out) == (0, "back\n")
    assert conn2.alive


async def test_concurrent_opens_share_one_connection(
    sshd_hosts: SshdCluster, agents: Agents
) -> None:
    h = sshd_hosts.inventory().hosts[0]
    conns = await asyncio.gather(*(agents.transport.connect(h) for _ in range(5)))
    assert all(c is conns[0] for c in conns)
    streams = await asyncio.gather(
        *(agents.transport.open(h, ["--ctl", agents.token]) for _ in range(3))
    )
    for s in streams:
        facts = await AgentConnection(h.name, s).handshake(30)
        assert facts["ev"] == "ready"
        await s.close()
    assert await agents.transport.connect(h) is conns[0]


async def test_asyncssh_encrypts_with_aes_gcm(sshd_hosts: SshdCluster, agents: Agents) -> None:
    """The cipher negotiated with a real OpenSSH server (``ssh.cipher_preference``); the
    ``ssh`` of the OpenSSH client picks its own."""
    h = sshd_hosts.inventory().hosts[0]
    conn = await agents.transport.connect(h)
    if h.ssh.transport == "asyncssh":
        assert conn.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
        assert conn.get_extra_info("recv_cipher") == "aes128-gcm@openssh.com"
    await agents.open(h)
    exited, out = await agents.run(h.name, "gcm", ["echo", "ok"])
    assert (exited["code"], out) == (0, "ok\n")


def _silent_listener() -> tuple[socket.socket, int]:
    """A TCP port that accepts connections and never says anything (no SSH banner)."""
    s = socket.socket()
    s.bind(("127.0.0.98", 0))
    s.listen(8)
    return s, s.getsockname()[1]


@pytest.mark.parametrize("case", ["dns", "refused", "auth", "no-python", "timeout", "config"])
async def test_failures_say_what_failed(
    sshd_hosts: SshdCluster, token: str, tmp_path: Path, case: str
) -> None:
    base = sshd_hosts.inventory().hosts[0]
    opts = sshd_hosts.ssh_options()
    silent = None
    if case == "dns":
        host = HostSpec("no-such-host.invalid", "x", ssh=opts)
    elif case == "refused":
        host = HostSpec("127.0.0.99", "127.0.0.99", ssh=opts)
    elif case == "auth":
        sshd_hosts.new_public_key(tmp_path / "stranger")
        host = HostSpec(
            base.name,
            base.address,
            ssh=sshd_hosts.ssh_options(identity=(str(tmp_path / "stranger"),)),
        )
    elif case == "no-python":
        host = HostSpec(
            base.name, base.address, ssh=sshd_hosts.ssh_options(python="/nonexistent/python3")
        )
    elif case == "timeout":
        silent, port = _silent_listener()
        host = HostSpec(
            "127.0.0.98", "127.0.0.98", ssh=sshd_hosts.ssh_options(port=port, connect_timeout=1.0)
        )
    else:
        host = HostSpec(
            base.name,
            base.address,
            ssh=sshd_hosts.ssh_options(identity=(str(tmp_path / "missing"),)),
        )
    t = _transport(Inventory("test", (host,), {}, {}))
    t0 = time.monotonic()
    try:
        with pytest.raises(TransportError) as err:
            stream = await t.open(host, ["--ctl", token])
            await AgentConnection(host.name, stream).handshake(10)
    finally:
        await t.close()
        if silent is not None:
            silent.close()
    assert isinstance(err.value, SshError), err.value
    assert err.value.category == case, err.value
    assert str(err.value).startswith(f"{host.name}: {case}: ")
    assert time.monotonic() - t0 < 5


async def test_generated_inventory_loads(sshd_hosts: SshdCluster, token: str) -> None:
    from mnp.spec.inventory import load_inventory

    inv = load_inventory(sshd_hosts.inventory_toml)
    assert [h.name for h in inv.hosts] == sshd_hosts.names
    assert [h.address for h in inv.hosts] == [h.address for h in sshd_hosts.hosts]
    assert inv.hosts[0].ssh == sshd_hosts.ssh_options()
    a = Agents(_transport(inv), token)
    try:
        await a.open(inv.hosts[-1])
        exited, out = await a.run(inv.hosts[-1].name, "1", ["echo", "toml"])
        assert out == "toml\n"
    finally:
        await a.close()


async def test_host_stop_and_restart(sshd_hosts: SshdCluster, agents: Agents) -> None:
    h = sshd_hosts.inventory().hosts[3]
    await agents.open(h)
    sshd_hosts.stop(h.name)
    await agents.until(lambda: h.name in agents.lost, 5)
    with pytest.raises(SshError) as err:
        await agents.transport.open(h, ["--ctl", agents.token])
    assert err.value.category == "refused"
    sshd_hosts.start_host(h.name)
    await agents.open(h)
    exited, out = await agents.run(h.name, "2", ["echo", "up"])
    assert out == "up\n"


async def eventually(check: object, within: float) -> bool:
    """Whether ``check()`` becomes true within ``within`` seconds (polled)."""
    assert callable(check)
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _exists(path: Path, remove: bool = False) -> bool:
    if remove:
        path.unlink(missing_ok=True)
    return path.exists()


def _write_script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _imports_mnp(python: str | Path) -> bool:
    probe = subprocess.run([str(python), "-c", "import mnp"], cwd="/", capture_output=True)
    return probe.returncode == 0
