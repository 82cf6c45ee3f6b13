"""The control socket: a toy handler served by ``ApiServer``, driven by ``ApiClient``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mnp.api import MAX_LINE, ApiClient, ApiServer, Handler, Responder, socket_path
from mnp.daemon import prepare_home
from mnp.errors import InfraError, JobRefused, MnpError, UsageError
from tests.helpers import ROOT
from tests.ledger import Ledger

T = TypeVar("T")


def make_toy(state: dict[str, Any]) -> Handler:
    async def toy(request: dict[str, Any], r: Responder) -> None:
        op = request["op"]
        if op == "echo":
            await r.end({"value": request.get("value")})
        elif op == "count":
            await r.send({"i": 0})
            await r.send({"i": 1})
            await r.end({"i": 2})
        elif op == "sleep":
            await asyncio.sleep(request["seconds"])
            await r.end({"slept": request["seconds"]})
        elif op == "refuse":
            raise JobRefused("queue 'gpu' is DISABLED")
        elif op == "infra":
            raise InfraError("no host reachable")
        elif op == "boom":
            raise ValueError("bad value")
        elif op == "silent":
            return
        elif op == "big":
            await r.end({"data": "x" * request["n"]})
        elif op == "follow":
            await r.send({"following": True})
            await r.wait_closed()
            state["follow_closed"] = r.closed
            state["noticed"].set()
        else:
            raise UsageError(f"unknown op {op!r}")

    return toy


class ServerThread:
    """An ``ApiServer`` on its own event loop in a thread, so tests use the blocking client."""

    def __init__(self, home: Path, **kw: Any) -> None:
        self.home = home
        self.state: dict[str, Any] = {"noticed": threading.Event()}
        self.loop = asyncio.new_event_loop()
        self.server = ApiServer(home, make_toy(self.state), **kw)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def client(self) -> ApiClient:
        client = ApiClient.connect(self.home)
        assert client is not None
        return client


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return prepare_home(tmp_path / "home")


@pytest.fixture
def server(home: Path) -> Iterator[ServerThread]:
    s = ServerThread(home)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def client(server: ServerThread) -> Iterator[ApiClient]:
    with server.client() as c:
        yield c


def raw_lines(home: Path, payload: bytes, n: int) -> list[dict[str, Any]]:
    """Send raw bytes on a fresh connection; read back ``n`` response lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(socket_path(home))
        s.sendall(payload)
        f = s.makefile("rb")
        out = [json.loads(f.readline()) for _ in range(n)]
        f.close()
        return out


# --------------------------------------------------------------------------- requests


def test_request_returns_the_response(client: ApiClient) -> None:
    msg = client.request("echo", value={"text": "héllo ✓", "n": [1, 2]})
    assert msg == {"ok": True, "value": {"text": "héllo ✓", "n": [1, 2]}, "id": 1, "end": True}
    assert client.request("echo", value=2)["value"] == 2


def test_stream_yields_every_message_until_end(client: ApiClient) -> None:
    msgs = list(client.stream("count"))
    assert [m["i"] for m in msgs] == [0, 1, 2]
    assert [m.get("end", False) for m in msgs] == [False, False, True]
    assert client.request("echo", value="after")["value"] == "after"


def test_request_leaves_the_rest_of_a_stream_unread_and_skips_it(client: ApiClient) -> None:
    assert client.request("count")["i"] == 0
    assert client.request("echo", value=3)["value"] == 3


def test_a_handler_that_returns_without_answering_ends_ok(client: ApiClient) -> None:
    assert client.request("silent") == {"ok": True, "id": 1, "end": True}


@pytest.mark.parametrize(
    ("op", "exc", "code", "text"),
    [
        ("refuse", JobRefused, 2, "queue 'gpu' is DISABLED"),
        ("infra", InfraError, 3, "no host reachable"),
        ("nope", JobRefused, 2, "unknown op 'nope'"),
    ],
)
def test_mnp_errors_come_back_as_their_class(
    client: ApiClient, op: str, exc: type[MnpError], code: int, text: str
) -> None:
    with pytest.raises(exc) as info:
        client.request(op)
    assert type(info.value) is exc
    assert info.value.exit_code == code
    assert str(info.value) == text
    assert client.request("echo", value=1)["value"] == 1  # the connection is kept


def test_an_unexpected_exception_is_an_error_response_and_is_logged(
    client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(MnpError) as info:
        client.request("boom")
    assert type(info.value) is MnpError
    assert info.value.exit_code == 1
    assert "ValueError: bad value" in str(info.value)
    assert "'boom'" in str(info.value)
    assert any(r.name == "mnp" and r.exc_info for r in caplog.records)
    with pytest.raises(MnpError):
        list(client.stream("boom"))
    assert client.request("echo", value="alive")["value"] == "alive"


def test_error_responses_have_the_documented_shape(server: ServerThread) -> None:
    line = b'{"op": "refuse", "id": "a"}\n'
    assert raw_lines(server.home, line, 1) == [
        {"ok": False, "error": "queue 'gpu' is DISABLED", "exit_code": 2, "id": "a", "end": True}
    ]


def test_several_requests_in_flight_on_one_connection(client: ApiClient) -> None:
    slow = client.send("sleep", seconds=0.4)
    fast = client.send("echo", value="fast")
    first = client.receive()
    assert first["id"] == fast and first["value"] == "fast"
    assert client.receive()["id"] == slow

    t0 = time.monotonic()
    ids = {client.send("sleep", seconds=0.3) for _ in range(20)}
    got = {client.receive()["id"] for _ in range(20)}
    assert got == ids
    assert time.monotonic() - t0 < 1.5  # concurrent, not 20 x 0.3 s


def test_a_client_that_reads_nothing_gets_back_pressure_not_buffers(server: ServerThread) -> None:
    """A client pipelines 300 requests with 256 KiB answers and reads none: the server
    buffers about one answer beyond the socket's high-water mark for it, and answers at
    most MAX_IN_FLIGHT requests at once (the next are read when one ends)."""
    from mnp.api import MAX_IN_FLIGHT

    n = 256 << 10
    payload = b"".join(
        json.dumps({"op": "big", "n": n, "id": i}).encode() + b"\n" for i in range(300)
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path(server.home))
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    try:
        time.sleep(1.0)

        async def buffered() -> int:
            conns = server.server._conns
            return sum(c.writer.transport.get_write_buffer_size() for c in conns)

        assert server.call(buffered()) < 3 * n
        assert len(server.server._tasks) <= MAX_IN_FLIGHT
        f = sock.makefile("rb")  # and it all comes once the client reads
        got = [json.loads(f.readline())["id"] for _ in range(300)]
        f.close()
        assert sorted(got) == list(range(300))
    finally:
        sock.close()
        sender.join(5)


def test_a_long_stream_notices_the_client_going_away(server: ServerThread) -> None:
    client = server.client()
    it = client.stream("follow")
    assert next(it)["following"] is True
    client.close()
    assert server.state["noticed"].wait(3)
    assert server.state["follow_closed"] is True


def test_client_timeout(client: ApiClient) -> None:
    client.timeout = 0.1
    with pytest.raises(InfraError, match="did not answer within 0.1s"):
        client.request("sleep", seconds=1)


# --------------------------------------------------------------------------- bad input


@pytest.mark.faults
def test_malformed_lines_are_answered_and_the_connection_kept(
    server: ServerThread, ledger: Ledger
) -> None:
    payload = (
        b"not json\n"
        b"[1, 2]\n"
        b'{"id": 7}\n'
        b'{"op": 3, "id": 8}\n'
        b"\xff\xfe\n"
        b"\n"
        b'{"op": "echo", "id": 9, "value": "ok"}\n'
    )
    out = raw_lines(server.home, payload, 6)
    for msg in out[:5]:
        ledger.input("control socket line", escaped="Traceback" in str(msg))
        assert msg["ok"] is False and msg["exit_code"] == 2 and msg["end"] is True
        assert msg["error"].startswith("malformed request")
    assert "id" not in out[0] and "id" not in out[1] and "id" not in out[4]
    assert out[2]["id"] == 7 and out[3]["id"] == 8
    assert out[5] == {"ok": True, "value": "ok", "id": 9, "end": True}


@pytest.mark.faults
def test_an_oversized_line_is_refused_and_skipped(server: ServerThread, ledger: Ledger) -> None:
    ledger.input("control socket line")
    huge = b'{"op": "echo", "id": 1, "value": "' + b"x" * MAX_LINE + b'"}\n'
    out = raw_lines(server.home, huge + b'{"op": "echo", "id": 2, "value": "next"}\n', 2)
    assert out[0]["ok"] is False and out[0]["exit_code"] == 2
    assert f"longer than {MAX_LINE} bytes" in out[0]["error"]
    assert out[1] == {"ok": True, "value": "next", "id": 2, "end": True}


def test_oversized_lines_across_buffer_boundaries(home: Path) -> None:
    s = ServerThread(home, max_line=100)
    try:
        long_line = b'{"op": "echo", "value": "' + b"y" * 5000 + b'"}\n'
        ok_line = b'{"op": "echo", "id": 3, "value": "short"}\n'
        out = raw_lines(home, long_line + ok_line + long_line + ok_line, 4)
        errors = [m for m in out if not m["ok"]]
        assert [m["exit_code"] for m in errors] == [2, 2]
        assert out[-1] == {"ok": True, "value": "short", "id": 3, "end": True}
        assert sum(m == out[-1] for m in out) == 2
        # a response over the limit is replaced by an error
        with s.client() as c, pytest.raises(MnpError, match="longer than 100 bytes"):
            c.request("big", n=500)
    finally:
        s.close()


def test_the_client_refuses_to_send_an_oversized_request(client: ApiClient) -> None:
    with pytest.raises(MnpError, match="larger than 64 MiB"):
        client.send("echo", value="z" * (MAX_LINE + 1))


# --------------------------------------------------------------------------- socket file


def test_socket_is_0600_and_home_0700(server: ServerThread) -> None:
    assert stat.S_IMODE(os.stat(socket_path(server.home)).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(socket_path(server.home)).st_mode)
    assert stat.S_IMODE(os.stat(server.home).st_mode) == 0o700
    old = os.umask(0o022)
    os.umask(old)
    assert old != 0o177  # start() gave the process its umask back


def test_prepare_home_creates_0700_and_tightens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = prepare_home(tmp_path / "a" / "b" / "home")
    for d in (tmp_path / "a", tmp_path / "a" / "b", home, home / "logs"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    wide = tmp_path / "wide"
    wide.mkdir()
    wide.chmod(0o755)
    assert prepare_home(wide) == wide.resolve()
    assert stat.S_IMODE(wide.stat().st_mode) == 0o700
    assert "tightened the permissions" in caplog.text


def test_a_stale_socket_file_is_replaced(home: Path) -> None:
    path = socket_path(home)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays; nothing answers on it
    assert ApiClient.connect(home) is None
    s = ServerThread(home)
    try:
        with s.client() as c:
            assert c.request("echo", value=1)["value"] == 1
    finally:
        s.close()
    assert not os.path.exists(path)


def test_a_live_socket_is_not_taken_over(server: ServerThread) -> None:
    other = ApiServer(server.home, make_toy({}))
    with pytest.raises(InfraError, match="another controller answers"):
        asyncio.run(other.start())
    with server.client() as c:
        assert c.request("echo", value=1)["value"] == 1


def test_a_file_that_is_not_a_socket_is_left_alone(home: Path) -> None:
    Path(socket_path(home)).write_text("mine")
    with pytest.raises(InfraError, match="not a socket"):
        asyncio.run(ApiServer(home, make_toy({})).start())
    assert Path(socket_path(home)).read_text() == "mine"


def test_no_controller_means_none(tmp_path: Path) -> None:
    assert ApiClient.connect(tmp_path / "nowhere") is None
    assert ApiClient.connect(tmp_path) is None


def test_a_home_longer_than_sun_path_works(tmp_path: Path) -> None:
    home = prepare_home(tmp_path / ("d" * 60) / ("e" * 60))
    assert len(socket_path(home)) > 108
    s = ServerThread(home)
    try:
        with s.client() as c:
            assert c.request("echo", value="deep")["value"] == "deep"
        assert stat.S_IMODE(os.stat(socket_path(home)).st_mode) == 0o600
    finally:
        s.close()
    assert not os.path.exists(socket_path(home))


def test_close_ends_connections_and_removes_the_socket(home: Path) -> None:
    s = ServerThread(home)
    c = s.client()
    try:
        c.send("sleep", seconds=30)
        s.close()
        with pytest.raises(InfraError, match="closed the connection"):
            c.receive()
    finally:
        c.close()
    assert not os.path.exists(socket_path(home))
    assert ApiClient.connect(home) is None


# --------------------------------------------------------------------------- peer uid

NOBODY = 65534


def _connect_as(uid: int, path: str) -> tuple[int, int]:
    """Fork a child that becomes ``uid`` and connects to ``path``; (its pid, a pipe to read)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: system calls only, then _exit
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
            except PermissionError:
                os.write(w, b"EACCES\n")
            else:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                os.write(w, data)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


async def _output_of(child: tuple[int, int]) -> str:
    pid, fd = child
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0):  # noqa: ASYNC222 - WNOHANG never blocks
        assert time.monotonic() < deadline, "the child hung"
        await asyncio.sleep(0.01)  # the server runs on this loop
    with os.fdopen(fd, "rb") as f:
        return f.read().decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root")
@pytest.mark.security("the control socket refuses another uid")
async def test_a_peer_with_another_uid_is_refused() -> None:
    # a home nobody can traverse to, so only the socket's own mode matters
    base = Path(tempfile.mkdtemp(prefix="mnp-uid-", dir="/tmp"))
    try:
        os.chmod(base, 0o711)
        home = prepare_home(base / "home")
        os.chmod(home, 0o711)
        server = ApiServer(home, make_toy({}))
        await server.start()
        try:
            path = socket_path(home)
            # the socket is 0600: connect itself fails
            assert await _output_of(_connect_as(NOBODY, path)) == "EACCES\n"
            # opened up, the connection is made and SO_PEERCRED refuses it
            os.chmod(path, 0o666)
            out = await _output_of(_connect_as(NOBODY, path))
            assert json.loads(out) == {
                "ok": False,
                "error": "permission denied: uid 65534 is not the controller's owner",
                "exit_code": 3,
                "end": True,
            }
            assert server.connections == 0 or await _no_connections(server)
        finally:
            await server.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _no_connections(server: ApiServer) -> bool:
    for _ in range(100):
        if server.connections == 0:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("module", ["mnp.api.client", "mnp.api"])
def test_the_client_module_imports_neither_asyncio_nor_logging(module: str) -> None:
    """What the CLI imports to talk to the controller stays standard library and cheap:
    the server's names come from ``mnp.api`` only when asked for."""
    heavy = {"asyncio", "asyncssh", "logging", "mnp.api.server"}
    code = f"import sys, {module}; print(sorted({heavy!r} & set(sys.modules)))"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "[]"


def test_the_server_names_load_on_first_use() -> None:
    code = (
        "import sys, mnp.api\n"
        "from mnp.api import ApiServer, Responder\n"
        "from mnp.api.server import ApiServer as S, Responder as R\n"
        "assert (ApiServer, Responder) == (S, R) and 'mnp.api.server' in sys.modules\n"
        "try:\n"
        "    mnp.api.nothing\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "module 'mnp.api' has no attribute 'nothing'"
