"""The node agent against real processes: spawning, output, environment, bad input,
shipping its source, and its speed."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from mnp.agent import bundle_source
from tests.integration.test_agent_driver import (
    CTL,
    DAEMONIZE,
    PY,
    REPO,
    Agent,
    agent_env,
    tagged,
    zombie_children,
)
from tests.ledger import Ledger

# ---------------------------------------------------------------- basics


def test_ready(agent: Agent) -> None:
    r = agent.ready
    assert r["version"] == 1
    assert r["pid"] == agent.proc.pid
    assert r["hostname"] == os.uname().nodename
    assert r["python"] == ".".join(map(str, sys.version_info[:3]))
    assert r["cores"] == len(os.sched_getaffinity(0))
    assert 0 < r["memory"] <= psutil.virtual_memory().total
    assert isinstance(r["gpus"], list) and isinstance(r["nvml"], bool)
    assert r["psutil"] is True
    assert abs(r["started"] - time.time()) < 60
    agent.send(op="facts")
    facts = agent.expect("facts")
    assert {k: v for k, v in facts.items() if k != "ev"} == {
        k: v for k, v in r.items() if k != "ev"
    }
    agent.send(op="ping", id="p1")
    assert agent.expect("pong")["id"] == "p1"


def test_load(agent: Agent) -> None:
    assert "load" in agent.ready["ops"] and agent.ready["ops"] == sorted(agent.ready["ops"])
    agent.send(op="load", id="l1")
    ev = agent.expect("load")
    assert ev["id"] == "l1" and abs(ev["t"] - time.time()) < 60
    assert len(ev["load"]) == 3 and all(isinstance(x, int | float) for x in ev["load"])
    assert abs(ev["load"][0] - os.getloadavg()[0]) < 5
    assert 0 < ev["memory_used"] <= psutil.virtual_memory().total


def test_port(agent: Agent) -> None:
    ports = []
    for i in range(5):
        agent.send(op="port", id=f"r{i}")
        ports.append(agent.expect("port", id=f"r{i}")["port"])
    assert len(set(ports)) == 5 and all(0 < p < 65536 for p in ports)
    with socket.socket() as s:
        s.bind(("", ports[0]))  # it is free


def test_spawn_port_env_picks_a_free_port_once_per_key(agent: Agent) -> None:
    """A main node's tasks: the agent picks MASTER_PORT at the spawn (no `port` round
    trip first), the same for every spawn with the same `port_key`, and says it in
    `started`; the variable is set like the spawn's own `env`, and `$MASTER_PORT` in
    argv is expanded from it."""
    assert "port_env" in agent.ready["features"]
    argv = ["sh", "-c", "echo $MASTER_PORT", "x"]
    ports = []
    for tid, key in (("a", "7.1"), ("b", "7.1"), ("c", "8.1")):
        agent.send(op="spawn", tid=tid, argv=argv, port_env="MASTER_PORT", port_key=key)
        ports.append(agent.expect("started", tid)["port"])
        agent.expect("gone", tid)
        assert agent.output(tid, 1) == f"{ports[-1]}\n"
    assert ports[0] == ports[1] != ports[2] and all(0 < p < 65536 for p in ports)
    agent.send(op="port", id="r")
    assert agent.expect("port", id="r")["port"] not in ports  # not handed out again
    agent.send(op="spawn", tid="d", argv=["true"])
    assert "port" not in agent.expect("started", "d")
    agent.send(op="spawn", tid="e", argv=["true"], port_env="A=B")
    assert "port_env" in agent.expect("error", "e")["msg"]


def test_output_and_exit_codes(agent: Agent) -> None:
    agent.send(op="spawn", tid="1", argv=["sh", "-c", "echo out; echo err >&2; exit 3"])
    started = agent.expect("started", "1")
    assert started["pid"] > 0
    exited, gone = agent.expect("exited", "1"), agent.expect("gone", "1")
    assert (exited["code"], exited["signal"]) == (3, None)
    assert "error" not in exited
    assert gone["killed"] == 0
    assert agent.output("1", 1) == "out\n"
    assert agent.output("1", 2) == "err\n"
    # all output comes before `exited`
    exited, _ = agent.run("2", ["sh", "-c", "seq 1 20000"])
    assert agent.output("2") == "".join(f"{i}\n" for i in range(1, 20001))


def test_signal_exit(agent: Agent) -> None:
    exited, _ = agent.run("s", ["sh", "-c", "kill -9 $$$$"])  # `$$` reaches sh as `$$`
    assert (exited["code"], exited["signal"]) == (None, 9)


def test_signal_op(agent: Agent) -> None:
    agent.send(op="spawn", tid="s", argv=["sleep", "100"])
    agent.expect("started", "s")
    agent.send(op="signal", tid="s", sig=signal.SIGUSR1)
    assert agent.expect("exited", "s")["signal"] == signal.SIGUSR1
    agent.expect("gone", "s")
    agent.send(op="signal", tid="nope", sig=15)
    assert agent.expect("error", "nope")


def test_spawn_failures(agent: Agent, tmp_path: Path) -> None:
    exited, gone = agent.run("m", ["no-such-program-xyz", "a"])
    assert exited["code"] == 127 and exited["signal"] is None
    assert "no-such-program-xyz" in exited["error"]
    assert gone["killed"] == 0
    exited, _ = agent.run("m2", ["/no/such/file"])
    assert exited["code"] == 127 and "No such file" in exited["error"]
    exited, _ = agent.run("c", ["true"], cwd=str(tmp_path / "nope"))
    assert exited["code"] == 126
    assert exited["error"] == "cwd %s: No such file or directory" % (tmp_path / "nope")
    exe = tmp_path / "noexec"
    exe.write_text("#!/bin/sh\necho hi\n")
    exe.chmod(0o644)
    exited, _ = agent.run("x", [str(exe)])
    assert exited["code"] == 126 and "Permission denied" in exited["error"]
    assert not agent.backlog or all(e["ev"] != "started" for e in agent.backlog)
    assert zombie_children(agent.proc.pid) == []


def test_env_cwd_stdin(agent: Agent, tmp_path: Path) -> None:
    os.environ["MNP_TEST_AGENT_ONLY"] = "inherited"  # not the agent's: set after it started
    try:
        script = (
            "import os; e = os.environ; print(os.getcwd()); "
            "print(e['MNP_JOB_ID'], e['MNP_CONTROLLER_ID'], e.get('MY'), 'HOME' in e, "
            "e.get('MNP_TEST_AGENT_ONLY')); print(os.getsid(0) == os.getpid())"
        )
        agent.run("42#0", [PY, "-c", script], env={"MY": "v", "HOME": None}, cwd=str(tmp_path))
        lines = agent.output("42#0").splitlines()
        assert lines == [str(tmp_path), "42#0 testtok v False None", "True"]
    finally:
        del os.environ["MNP_TEST_AGENT_ONLY"]
    agent.run("in", ["cat"], stdin="line 1\nline 2\n")
    assert agent.output("in") == "line 1\nline 2\n"
    agent.run("in0", ["cat"])  # default stdin: /dev/null
    assert agent.output("in0") == ""
    big = "x" * 300_000 + "\n"
    agent.run("in2", ["wc", "-c"], stdin=big)
    assert agent.output("in2").strip() == str(len(big))
    # the relative program lookup happens in the task's directory
    (tmp_path / "prog").write_text("#!/bin/sh\necho local prog\n")
    (tmp_path / "prog").chmod(0o755)
    agent.run("rel", ["./prog"], cwd=str(tmp_path))
    assert agent.output("rel") == "local prog\n"


def test_files_are_written_before_the_task_starts(agent: Agent) -> None:
    rundir = agent.ready["rundir"]
    st = os.stat(rundir)
    assert rundir.endswith(f"/mnp-{os.getuid()}/{CTL}") and st.st_mode & 0o777 == 0o700
    path = f"{rundir}/42.1/hostfile"
    files = [{"path": path, "data": "node1:2\nnode2:2\n"}, {"path": path + ".ompi", "data": ""}]
    agent.run("f", ["cat", "$MNP_HOSTFILE"], env={"MNP_HOSTFILE": path}, files=files)
    assert agent.output("f") == "node1:2\nnode2:2\n"
    assert os.path.exists(path + ".ompi")
    exited, _ = agent.run("f2", ["true"], files=[{"path": "/proc/nope/x", "data": "x"}])
    assert exited["code"] == 126 and exited["error"].startswith("file /proc/nope/x: ")
    for bad in ([{"path": "relative", "data": ""}], [{"path": "/x"}], {"path": "/x"}, ["/x"]):
        agent.send(op="spawn", tid="f3", argv=["true"], files=bad)
        assert "files" in agent.expect("error", "f3")["msg"]


def test_tasks_get_no_other_descriptors() -> None:
    r, w = os.pipe()
    os.set_inheritable(w, True)
    a = Agent(pass_fds=(w,))  # a descriptor the agent inherits, as from sshd or a shell
    os.close(w)
    try:
        a.run("fds", [PY, "-c", "import os; print(sorted(os.listdir('/proc/self/fd')))"])
        assert a.output("fds") == "['0', '1', '2', '3']\n"  # 3: listdir's own
    finally:
        a.close()
        os.close(r)


def test_expansion(agent: Agent) -> None:
    argv = ["echo", "$MNP_JOB_ID", "${V}x", "$$V", "$NOPE", "${V", "$1", "$W"]
    agent.run("e1", argv, env={"V": "val", "W": "$V"})
    assert agent.output("e1") == "e1 valx $V $NOPE ${V $1 $V\n"
    agent.run("e2", argv, env={"V": "val"}, expand=False)
    assert agent.output("e2") == " ".join(argv[1:]) + "\n"
    agent.run("e3", ["$BIN", "ok"], env={"BIN": "echo"})  # argv[0] too, before the lookup
    assert agent.output("e3") == "ok\n"


def test_partial_line_is_flushed(agent: Agent) -> None:
    agent.send(op="spawn", tid="p", argv=["sh", "-c", "printf abc; sleep 2; echo def"])
    t0 = time.monotonic()
    out = agent.expect("out", "p")
    assert out["data"] == "abc" and time.monotonic() - t0 < 1.5
    agent.expect("exited", "p")
    assert agent.output("p") == "abcdef\n"


def test_binary_and_large_output(agent: Agent) -> None:
    script = (
        "import sys; sys.stdout.buffer.write(b'\\xff\\xfe bad\\n' + "
        "'é'.encode() * 200000 + b'\\nend')"
    )
    agent.run("b", [PY, "-c", script])
    text = agent.output("b")
    chunks = [e["data"] for e in agent.history if e["ev"] == "out" and e["tid"] == "b"]
    # bytes that are not UTF-8 arrive as surrogate escapes: the exact bytes come back
    assert text == "\udcff\udcfe bad\n" + "é" * 200000 + "\nend"
    assert (
        text.encode("utf-8", "surrogateescape")
        == b"\xff\xfe bad\n" + "é".encode() * 200000 + b"\nend"
    )
    assert len(chunks) > 5
    assert max(len(c) for c in chunks) <= 65536  # 64 KiB of the task's bytes at most


def test_duplicate_tid_and_bad_requests(agent: Agent) -> None:
    agent.send(op="spawn", tid="d", argv=["sleep", "30"])
    agent.expect("started", "d")
    agent.send(op="spawn", tid="d", argv=["true"])
    assert "already" in agent.expect("error", "d")["msg"]
    agent.send(op="kill", tid="d", grace=0)
    agent.expect("gone", "d")


# ---------------------------------------------------------------- garbage in


@pytest.mark.faults
def test_garbage_is_reported_and_ignored(agent: Agent, tmp_path: Path, ledger: Ledger) -> None:
    marker = tmp_path / "ran"
    touch = ["touch", str(marker)]
    bad_lines = [
        b"garbage",
        b'{"op": "spawn", "tid": "g", "argv": ["touch"',  # truncated
        b"[1, 2]",
        b'"spawn"',
        b"{}",
        b'{"op": "launch", "tid": "g"}',
        b'{"op": 7}',
        b"\xff\xfe{}",
        json.dumps({"op": "spawn", "tid": 5, "argv": touch}).encode(),
        json.dumps({"op": "spawn", "tid": "", "argv": touch}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": "touch x"}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": []}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": ["touch", 1]}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": touch, "env": ["A=1"]}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": touch, "env": {"A": 1}}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": touch, "env": {"A=B": "1"}}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": touch, "cwd": 3}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": touch, "expand": "yes"}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": touch, "stdin": 1}).encode(),
        json.dumps({"op": "spawn", "tid": "g", "argv": ["touch", "a\0b"]}).encode(),
        json.dumps({"op": "kill", "tid": "g", "grace": "1"}).encode(),
        json.dumps({"op": "kill", "tid": "g", "grace": -1}).encode(),
        json.dumps({"op": "kill", "tid": "g", "grace": True}).encode(),
        json.dumps({"op": "signal", "tid": "g", "sig": "TERM"}).encode(),
        json.dumps({"op": "sweep", "job": ""}).encode(),
        json.dumps({"op": "shutdown", "grace": []}).encode(),
    ]
    agent.send_raw(b"\n".join(bad_lines) + b"\n\n   \n")
    errors = [agent.expect("error") for _ in bad_lines]
    for _ in bad_lines:
        ledger.input("agent protocol line")
    assert all(isinstance(e["msg"], str) and e["msg"] for e in errors)
    agent.send(op="ping", id=1)
    agent.expect("pong")
    assert [e for e in agent.backlog if e["ev"] != "error"] == []
    assert not marker.exists()
    # the agent still works
    agent.run("ok", ["echo", "fine"])
    assert agent.output("ok") == "fine\n"


def test_text_the_os_cannot_take_fails_the_spawn(agent: Agent) -> None:
    bad = "\ud800"  # valid JSON, but no OS string can hold a lone surrogate
    fields: list[dict[str, Any]] = [
        {"argv": ["echo", bad]},
        {"argv": ["cat"], "stdin": bad},
        {"argv": ["true"], "env": {"A": bad}},
        {"argv": ["true"], "cwd": "/" + bad},
        {"argv": ["true"], "files": [{"path": "/tmp/mnp-test-" + bad, "data": ""}]},
    ]
    for i, f in enumerate(fields):
        exited, gone = agent.run(f"u{i}", **f)
        assert exited["code"] == 126 and "surrogate" in exited["error"]
    assert not any(e["ev"] == "started" for e in agent.history)


@pytest.mark.faults
def test_overlong_line_is_refused(ledger: Ledger) -> None:
    a = Agent()
    ledger.input("agent protocol line")
    try:
        huge = b'{"op":"spawn","tid":"h","argv":["echo","' + b"y" * (16 << 20) + b'"]}\n'
        writer = threading.Thread(target=a.send_raw, args=(huge,))
        writer.start()
        assert "longer" in a.expect("error", timeout=30)["msg"]
        writer.join(30)
        a.send(op="ping", id=2)
        a.expect("pong")
        assert [e for e in a.backlog if e["ev"] in ("started", "exited")] == []
    finally:
        assert a.close() == 0


@pytest.mark.faults
def test_incomplete_last_line_is_not_run(tmp_path: Path, ledger: Ledger) -> None:
    a = Agent()
    ledger.input("agent protocol line")
    marker = tmp_path / "ran"
    a.send_raw(json.dumps({"op": "spawn", "tid": "i", "argv": ["touch", str(marker)]}).encode())
    assert a.proc.stdin is not None
    a.proc.stdin.close()
    assert "incomplete" in a.expect("error")["msg"]
    assert a.close() == 0
    assert not marker.exists()


@pytest.mark.faults
def test_truncated_and_random_lines_never_run_anything(
    agent: Agent, tmp_path: Path, ledger: Ledger
) -> None:
    """Every proper prefix of a valid spawn (a line cut short), and 300 lines of random
    bytes: each is answered with one error, nothing starts, and the agent still works."""
    import random

    marker = tmp_path / "ran"
    valid = json.dumps({"op": "spawn", "tid": "f", "argv": ["touch", str(marker)]}).encode()
    rng = random.Random(7)
    lines = [valid[:n] for n in range(1, len(valid))]
    for _ in range(300):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        lines.append(raw.replace(b"\n", b" ").strip() or b"x")
    for chunk in range(0, len(lines), 50):  # in bursts, as a flaky channel would deliver
        agent.send_raw(b"\n".join(lines[chunk : chunk + 50]) + b"\n")
    errors = [agent.expect("error") for _ in lines]
    for e in errors:
        ledger.input("agent protocol line (truncated, random)", escaped=not e.get("msg"))
    agent.send(op="ping", id=3)
    agent.expect("pong")
    assert [e for e in agent.history if e["ev"] in ("started", "exited", "gone")] == []
    assert not marker.exists()
    agent.run("ok", ["echo", "still here"])
    assert agent.output("ok") == "still here\n"


# ---------------------------------------------------------------- shipping and speed


def _interpreters() -> list[str]:
    found = [PY]
    for pattern in (
        "/usr/bin/python3",
        "/usr/bin/python3.[89]",
        "/usr/local/bin/python3.[89]",
        os.path.expanduser("~/.pyenv/versions/3.[89].*/bin/python3.[89]"),
    ):
        found.extend(sorted(glob.glob(pattern)))
    which = shutil.which("python3")
    if which:
        found.append(which)
    return list(dict.fromkeys(found))


@pytest.mark.parametrize("python", _interpreters())
def test_bundle_runs_with_python_c(python: str, tmp_path: Path) -> None:
    src = bundle_source()
    assert len(src.encode()) < 100_000  # one argv string may be at most 128 KiB
    # an empty directory as cwd and -I: nothing of mnp can be imported from anywhere
    a = Agent(cmd=[python, "-I", "-c", src, "--ctl", CTL, "--grace", "0.5"], cwd=tmp_path)
    try:
        assert a.ready["version"] == 1
        a.run("b1", ["sh", "-c", "echo $MNP_JOB_ID ${MNP_CONTROLLER_ID}"])
        assert a.output("b1") == f"b1 {CTL}\n"
        a.send(op="spawn", tid="b2", argv=[PY, "-c", DAEMONIZE])
        a.expect("gone", "b2")
        assert tagged(lambda t: t == "b2") == []
    finally:
        assert a.close() == 0


def _old_interpreters() -> list[str]:
    pattern = os.path.expanduser("~/.pyenv/versions/*/bin/python[23].[0-7]")
    return sorted(glob.glob("/usr/bin/python3.[0-7]") + glob.glob(pattern))[:2]


@pytest.mark.parametrize("python", _old_interpreters())
def test_bundle_on_too_old_python_says_so(python: str) -> None:
    r = subprocess.run(
        [python, "-c", bundle_source(), "--ctl", CTL], input=b"", capture_output=True, timeout=30
    )
    assert r.returncode == 1 and r.stdout == b""
    assert b"mnp agent: needs python >= 3.8, this is " in r.stderr


def test_bundle_readable_form_runs(tmp_path: Path) -> None:
    # from a file: the readable form outgrew the 128 KiB one argument may hold
    script = tmp_path / "agent_bundle.py"
    script.write_text(bundle_source(compress=False))
    a = Agent(cmd=[PY, "-I", str(script), "--ctl", CTL], cwd=tmp_path)
    try:
        a.run("r", ["true"])
    finally:
        assert a.close() == 0


def test_start_time() -> None:
    """How long `python -m mnp.agent` takes to say `ready`, next to a bare interpreter."""

    def best(cmd: list[str]) -> float:
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            subprocess.run(
                cmd, input=b"", capture_output=True, env=agent_env(), check=True, cwd=REPO
            )
            times.append(time.monotonic() - t0)
        return min(times)

    bare = best([PY, "-c", "pass"])
    samples = []
    for _ in range(5):
        a = Agent()
        samples.append(a.ready_after)
        a.close()
    ready = min(samples)
    print(f"\nagent ready after {ready * 1000:.1f} ms (bare python3 -c pass: {bare * 1000:.1f} ms)")
    assert ready < bare + 1.0  # generous: this is a report, not a benchmark gate


def test_throughput_1000_true() -> None:
    a = Agent()
    try:
        n = 1000
        batch = b"".join(
            json.dumps({"op": "spawn", "tid": f"t{i}", "argv": ["true"]}).encode() + b"\n"
            for i in range(n)
        )
        t0 = time.monotonic()
        a.send_raw(batch)
        codes = {}
        gone = 0
        while gone < n:
            e = a.next(30)
            if e["ev"] == "exited":
                codes[e["tid"]] = e["code"]
            elif e["ev"] == "gone":
                gone += 1
                assert e["killed"] == 0
            else:
                assert e["ev"] == "started", e
        elapsed = time.monotonic() - t0
        print(
            f"\n{n} `true` tasks spawned and reaped in {elapsed:.2f} s: {n / elapsed:.0f} tasks/s"
            f" on {len(os.sched_getaffinity(0))} cores"
        )
        assert codes == {f"t{i}": 0 for i in range(n)}
        assert zombie_children(a.proc.pid) == []
    finally:
        a.close()
