"""The agent's pure parts: expansion, tid parsing, program lookup, options, GPU facts,
output chunking."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace
from typing import Any

import pytest

from mnp.agent.expand import expand
from mnp.agent.facts import gpus_from, load
from mnp.agent.loop import CHUNK, Loop, Output, Stream
from mnp.agent.main import parse
from mnp.agent.proc import Proc, Snapshot, job_part, read_stat
from mnp.agent.spawn import SpawnError, find_program, task_env, with_python_env
from mnp.agent.tasks import Task, Teardown, targets

ENV = {"HOME": "/home/u", "A": "x", "EMPTY": "", "TRICK": "$HOME", "B_1": "b"}


@pytest.mark.parametrize(
    ("arg", "want"),
    [
        ("plain", "plain"),
        ("$HOME", "/home/u"),
        ("${HOME}", "/home/u"),
        ("$HOME/bin", "/home/u/bin"),
        ("${HOME}bin", "/home/ubin"),
        ("$HOMEbin", "$HOMEbin"),  # longest name: HOMEbin, unset
        ("$A$A", "xx"),
        ("$B_1.", "b."),
        ("$NOPE", "$NOPE"),
        ("${NOPE}", "${NOPE}"),
        ("$$", "$"),
        ("$$HOME", "$HOME"),
        ("$$$HOME", "$/home/u"),
        ("a$", "a$"),
        ("$", "$"),
        ("${", "${"),
        ("${HOME", "${HOME"),
        ("${HOME-x}", "${HOME-x}"),
        ("${1}", "${1}"),
        ("$1", "$1"),
        ("$(id)", "$(id)"),
        ("$EMPTY|", "|"),
        ("$TRICK", "$HOME"),  # a value is never expanded again
        ("${TRICK}$TRICK", "$HOME$HOME"),
        ("`id`;*", "`id`;*"),
    ],
)
def test_expand(arg: str, want: str) -> None:
    assert expand(arg, ENV) == want


@pytest.mark.parametrize(
    ("tid", "job"),
    [
        ("42", "42"),
        ("42:7", "42"),
        ("42#3", "42"),
        ("42#3.1", "42"),
        ("42.3", "42"),
        ("a:b#c", "a"),
        ("x#1:2", "x"),
        (":1", ""),
    ],
)
def test_job_part(tid: str, job: str) -> None:
    assert job_part(tid) == job


def test_task_env() -> None:
    env = task_env(
        {"KEEP": "1", "DROP": "2", "MNP_JOB_ID": "old"}, {"DROP": None, "NEW": "3"}, "42#1", "ctl"
    )
    assert env == {"KEEP": "1", "NEW": "3", "MNP_JOB_ID": "42#1", "MNP_CONTROLLER_ID": "ctl"}


def test_with_python_env_activates_a_venv_or_conda_prefix_that_exists(tmp_path: Any) -> None:
    venv, conda = tmp_path / "venv", tmp_path / "conda"
    for prefix in (venv, conda):
        (prefix / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (conda / "conda-meta").mkdir()
    base = {"PATH": f"/usr/bin:{venv}/bin:/bin", "PYTHONHOME": "/opt/py", "HOME": "/h"}
    env = with_python_env(base, str(venv))
    assert env["PATH"] == f"{venv}/bin:/usr/bin:/bin"  # first, and only once
    assert env["VIRTUAL_ENV"] == str(venv) and "PYTHONHOME" not in env
    assert env["HOME"] == "/h" and base["PYTHONHOME"] == "/opt/py"  # base untouched
    env = with_python_env({"HOME": "/h"}, str(conda))
    assert env["CONDA_PREFIX"] == str(conda) and "VIRTUAL_ENV" not in env
    assert env["PATH"].split(":")[0] == f"{conda}/bin"
    # not on this host's file system: the host's environment as it is
    assert with_python_env(base, str(tmp_path / "elsewhere")) == base


def test_find_program(tmp_path: Any) -> None:
    good = tmp_path / "good"
    good.write_text("#!/bin/sh\n")
    good.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_text("")
    plain.chmod(0o644)
    (tmp_path / "adir").mkdir()
    path = f"/nonexistent:{tmp_path}"
    assert find_program("good", path) == str(good)
    assert find_program("./anything", path) == "./anything"
    assert find_program("sh", None).endswith("/sh")
    with pytest.raises(SpawnError) as e:
        find_program("missing", path)
    assert e.value.code == 127
    if os.geteuid() == 0 and os.access(plain, os.X_OK):  # root may execute anything
        return
    with pytest.raises(SpawnError) as e:
        find_program("plain", path)
    assert e.value.code == 126
    with pytest.raises(SpawnError) as e:
        find_program("adir", path)
    assert e.value.code == 126
    assert stat.S_ISDIR(os.stat(tmp_path / "adir").st_mode)


def test_parse_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MNP_AGENT_GRACE", raising=False)
    o = parse(["--ctl", "t", "--grace", "0.5", "--parent-death"])
    assert (o.ctl, o.grace, o.parent_death) == ("t", 0.5, True)
    o = parse(["--ctl=t2"])
    assert (o.ctl, o.grace, o.parent_death) == ("t2", 2.0, False)
    monkeypatch.setenv("MNP_AGENT_GRACE", "7")
    assert parse(["--ctl", "t"]).grace == 7.0
    for bad in (
        [],
        ["--ctl"],
        ["--ctl", "t", "--grace", "-1"],
        ["--ctl", "t", "--grace", "x"],
        ["--ctl", "t", "--what"],
    ):
        with pytest.raises(ValueError):
            parse(bad)


def test_gpus_from_fake_nvml() -> None:
    devices = [("NVIDIA H100", 80 << 30, "GPU-aaa"), (b"NVIDIA A100", 40 << 30, b"GPU-bbb")]
    nvml = SimpleNamespace(
        nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: devices[h][0],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=devices[h][1]),
        nvmlDeviceGetUUID=lambda h: devices[h][2],
    )
    assert gpus_from(nvml) == [
        {"index": 0, "name": "NVIDIA H100", "memory": 80 << 30, "uuid": "GPU-aaa"},
        {"index": 1, "name": "NVIDIA A100", "memory": 40 << 30, "uuid": "GPU-bbb"},
    ]


def test_read_stat_self() -> None:
    me = read_stat(os.getpid())
    assert me is not None
    assert me.ppid == os.getppid() and me.pgrp == os.getpgrp() and me.sid == os.getsid(0)
    assert read_stat(2**22 + 12345) is None


class _Capture(Output):
    def __init__(self) -> None:
        super().__init__(fd=-1)
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def _stream() -> tuple[Loop, _Capture, Stream, int]:
    loop = Loop()
    out = _Capture()
    r, w = os.pipe()
    os.set_blocking(r, False)
    return loop, out, Stream(loop, out, "t", r, 1), w


def test_stream_whole_lines_and_partial_flush() -> None:
    loop, out, stream, w = _stream()
    try:
        os.write(w, b"one\ntw")
        stream.read()
        assert [e["data"] for e in out.events] == ["one\n"]
        os.write(w, b"o\nthr")
        stream.read()
        assert [e["data"] for e in out.events] == ["one\n", "two\n"]
        stream.flush()  # what the timer does after FLUSH_DELAY
        assert out.events[-1]["data"] == "thr"
        os.close(w)
        stream.drain()
        assert stream.fd == -1
    finally:
        stream.close()
        loop.close()


def test_stream_utf8_split_across_chunks() -> None:
    loop, out, stream, w = _stream()
    try:
        euro = "€".encode()
        os.write(w, b"a" + euro[:1])
        stream.read()
        stream.flush()
        os.write(w, euro[1:] + b"\n")
        stream.read()
        os.close(w)
        stream.drain()
        assert "".join(e["data"] for e in out.events) == "a€\n"
        assert all("\ufffd" not in e["data"] for e in out.events)
    finally:
        stream.close()
        loop.close()


def test_stream_chunk_cap() -> None:
    loop, out, stream, w = _stream()
    try:
        payload = (b"x" * 100 + b"\n") * 3000  # ~300 KB, more than a pipe holds: write in parts
        view = memoryview(payload)
        while view:
            n = os.write(w, view[:32768])
            view = view[n:]
            stream.drain()
        os.close(w)
        stream.drain()
        data = "".join(e["data"] for e in out.events)
        assert data.encode() == payload
        assert max(len(e["data"]) for e in out.events) <= CHUNK
    finally:
        stream.close()
        loop.close()


def _snap() -> Snapshot:
    #   pid ppid pgrp sid state   tag
    rows = [
        (100, 1, 100, 100, "S", None),  # the agent
        (200, 100, 200, 200, "S", "7"),  # task 7's main
        (201, 200, 200, 200, "S", "7"),  # its child
        (202, 201, 202, 202, "S", None),  # a grandchild that setsid'd and cleared its env
        (203, 200, 200, 200, "Z", "7"),  # a zombie: nothing to kill
        (300, 100, 300, 300, "S", None),  # an adopted orphan, not traceable
        (400, 1, 400, 400, "S", "7#1"),  # started elsewhere (mpiexec over ssh)
        (401, 1, 401, 401, "S", "7.2"),
        (402, 1, 402, 402, "S", "70"),
        (403, 400, 403, 403, "S", None),  # a child of a tagged process
    ]
    procs = {r[0]: Proc(r[0], r[1], r[2], r[3], 1000 + r[0], r[4]) for r in rows}
    tags = {r[0]: r[5] for r in rows if r[5] is not None}
    return Snapshot(procs, tags, protected={0, 1, 100})


def _task(tid: str, pid: int, reaped: bool = False) -> Task:
    task = Task(tid, pid, [], None)
    task.reaped = reaped
    return task


def test_targets_of_a_task() -> None:
    task = _task("7", 200)
    td = Teardown("t:7", "task", "7", task, 0.0)
    assert sorted(targets(td, _snap(), 100, [task], {"7"})) == [200, 201, 202]


def test_targets_of_a_reaped_task_forget_its_group_once_empty() -> None:
    task = _task("9", 900, reaped=True)  # no process in group 900 and no tag 9
    td = Teardown("t:9", "task", "9", task, 0.0)
    assert targets(td, _snap(), 100, [task], {"9"}) == {}
    assert td.group_gone  # a later group 900 would be someone else's


def test_targets_of_a_tag_and_of_a_sweep() -> None:
    td = Teardown("t:7#1", "tag", "7#1", None, 0.0)
    assert sorted(targets(td, _snap(), 100, [], set())) == [400, 403]
    task = _task("7", 200)
    td = Teardown("s:7", "sweep", "7", None, 0.0)
    assert sorted(targets(td, _snap(), 100, [task], set())) == [200, 201, 202, 400, 401, 403]


def test_targets_of_shutdown() -> None:
    task = _task("7", 200)
    td = Teardown("*", "all", "*", None, 0.0)
    # every child of the agent (the untraceable orphan too), every tag it gave
    assert sorted(targets(td, _snap(), 100, [task], {"7", "70"})) == [200, 201, 202, 300, 402]


def test_agent_identity_is_judged_only_on_its_own_machine_and_pid_namespace() -> None:
    from mnp.agent.proc import Proc, agent_alive, agent_identity

    me = agent_identity()
    here, pid, start = me.split(":")
    assert here.count(".") == 1 and int(pid) > 0 and int(start) > 0
    alive = {int(pid): Proc(int(pid), 1, int(pid), int(pid), int(start), "S")}
    assert agent_alive(me, here, alive) is True
    assert agent_alive(me, here, {}) is False  # gone
    reused = {int(pid): Proc(int(pid), 1, int(pid), int(pid), int(start) + 1, "S")}
    assert agent_alive(me, here, reused) is False  # its pid, another process
    zombie = {int(pid): Proc(int(pid), 1, int(pid), int(pid), int(start), "Z")}
    assert agent_alive(me, here, zombie) is False
    other_ns = here.rsplit(".", 1)[0] + ".1"
    assert agent_alive(f"{other_ns}:{pid}:{start}", here, {}) is None  # cannot tell
    assert agent_alive("", here, {}) is None and agent_alive("x:y", here, {}) is None


def test_load_sample(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    sample = load()
    assert len(sample["load"]) == 3 and all(x >= 0 for x in sample["load"])
    assert isinstance(sample["memory_used"], int) and sample["memory_used"] > 0

    def no_loadavg() -> tuple[float, float, float]:
        raise OSError("not here")

    monkeypatch.setattr(os, "getloadavg", no_loadavg)
    real_open = open
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:  10 kB\nMemAvailable:    250 kB\n")

    def fake_open(path: Any, *args: Any, **kw: Any) -> Any:
        return real_open(meminfo if path == "/proc/meminfo" else path, *args, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    assert load() == {"load": None, "memory_used": 750 * 1024}
