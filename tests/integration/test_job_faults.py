"""Faults that come with a job itself (issue 12): its secrets, the bytes of its command
line and output, its working directory. Each class is checked through the CLI on the
local inventory (the daemon and the in-process ``mnp run``), and recorded in the fault
ledger (tests/ledger.py). The controller-level checks drive a ``Controller`` directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import mnp.controller.launch as controller_mod
from mnp import offloop, wiring
from mnp.controller import Controller
from mnp.jobs import Job, TaskRun
from mnp.model import JobState
from mnp.spec import definition_from_command, local_inventory, parse_definition
from mnp.transport.local import LocalTransport
from tests.helpers import ROOT, describe, mnp, submit, wait_until
from tests.ledger import Ledger

pytestmark = pytest.mark.faults

TERMINAL = ("SUCCEEDED", "FAILED")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"MNP_HOME": str(tmp_path / "home")}
    yield env
    mnp("controller", "stop", env=env)


def mnp_bytes(
    *args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """``python -m mnp ARGS`` with its output as bytes (``str`` arguments holding
    surrogate escapes reach it as the bytes they stand for)."""
    return subprocess.run(
        [sys.executable, "-m", "mnp", *args],
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **env},
        check=False,
    )


def wait_end(env: dict[str, str], job: str, timeout: float = 30) -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        f"job {job} ends",
        lambda: (d := describe(env, job))["state"] in TERMINAL and d,
        timeout,
        every=0.2,
    )


def everything_stored(env: dict[str, str]) -> bytes:
    """What a user can read back: describe, events, list, and every file of MNP_HOME."""
    seen = b""
    for args in (["events"], ["list", "--all", "--children"]):
        seen += mnp_bytes(*args, env=env).stdout
    for row in json.loads(mnp("list", "--all", "--json", env=env).stdout or "[]"):
        seen += mnp_bytes("describe", str(row["id"]), "--json", env=env).stdout
    for path in Path(env["MNP_HOME"]).rglob("*"):
        if path.is_file() and not path.is_socket():
            seen += path.read_bytes()
    return seen


# --- 3. a secret's value is in no process's argv ------------------------------------


class ArgvWatch:
    """Reads /proc/*/cmdline of every process, over and over, for any of ``needles``."""

    def __init__(self, needles: list[bytes]) -> None:
        self.needles = needles
        self.found: list[tuple[str, bytes]] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ArgvWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if any(n in cmdline for n in self.needles):
                    self.found.append((pid, cmdline))
            self.scans += 1
            time.sleep(0.005)


# the task checks that its arguments came as written and that the secrets are in its
# environment (it prints their digests, never the values), while the test reads argv
CHECK = (
    "import hashlib, os, sys, time\n"
    "d = chr(36)\n"
    "want = [d + 'FROM_FILE', d + '{FROM_ENV}', 'x' + d + 'FROM_FILE', d + 'FROM_ENV', "
    "'p=' + d + 'FROM_FILE']\n"
    "assert sys.argv[1:] == want, sys.argv\n"
    "time.sleep(1.0)\n"
    "for k in ('FROM_FILE', 'FROM_ENV'):\n"
    "    print(k, hashlib.sha256(os.environ[k].encode()).hexdigest())\n"
)
# the same through sh: sh reads "$FROM_FILE" from its environment (printf is built in),
# the digest comes from stdin; the script text itself names the secret, as written
SH_CHECK = (
    'sleep 1; printf %s "$FROM_FILE" | sha256sum | sed "s/^/FROM_FILE /"; '
    'printf %s "${FROM_ENV}" | sha256sum | sed "s/^/FROM_ENV /"'
)


def _secret_job(tmp_path: Path, command: list[str], name: str) -> Path:
    job = tmp_path / f"{name}.toml"
    job.write_text(
        f"name = {json.dumps(name)}\n"
        f"command = {json.dumps(command)}\n"
        '[parameters]\np = "p=$FROM_FILE"\n'
        "[secrets]\n"
        f'FROM_FILE = {{ file = "{tmp_path / "token"}" }}\n'
        'FROM_ENV = { env = "TEST12_SECRET_SOURCE" }\n'
    )
    return job


@pytest.mark.security("a secret's value is in no process's argv")
def test_no_process_argv_ever_holds_a_secret(
    home: dict[str, str], tmp_path: Path, ledger: Ledger
) -> None:
    """``$SECRET`` / ``${SECRET}`` in a command's arguments stay as written: the program
    (or its shell) reads the value from its environment. /proc/*/cmdline of every
    process on the machine is read throughout; no secret value ever shows up there."""
    file_secret = "file-secret-" + uuid.uuid4().hex
    env_secret = "env-secret-" + uuid.uuid4().hex
    (tmp_path / "token").write_text(file_secret + "\n")
    env = {**home, "TEST12_SECRET_SOURCE": env_secret}
    solo = {**env, "MNP_HOME": str(tmp_path / "solo")}  # no controller there: in-process
    py = _secret_job(
        tmp_path,
        ["python3", "-c", CHECK, "$FROM_FILE", "${FROM_ENV}", "x$FROM_FILE", "$FROM_ENV", "Ref::p"],
        "argv-py",
    )
    sh = _secret_job(tmp_path, ["sh", "-c", SH_CHECK], "argv-sh")
    digests = {
        f"FROM_FILE {hashlib.sha256(file_secret.encode()).hexdigest()}",
        f"FROM_ENV {hashlib.sha256(env_secret.encode()).hexdigest()}",
    }
    outputs = []
    with ArgvWatch([file_secret.encode(), env_secret.encode()]) as watch:
        for job in (py, sh):
            # in-process, as one task and as a 2-node job; then through the daemon
            for nodes in ([], ["--nodes", "2"]):
                r = mnp("run", *nodes, str(job), env=solo)
                assert r.returncode == 0, r.stderr
                outputs.append(r.stdout)
            r = mnp("submit", "--wait", str(job), env=env)
            assert r.returncode == 0, r.stderr
            outputs.append(mnp("logs", r.stdout.strip(), env=home).stdout)
        ledger.fault("secret referenced in a command's arguments", 6)
    assert watch.scans > 10
    assert watch.found == [], watch.found[:3]
    for out in outputs:  # the tasks had the values, in their environment
        lines = {line.split(": ", 1)[-1].replace("  -", "").strip() for line in out.splitlines()}
        assert digests <= lines, out
    assert file_secret.encode() not in everything_stored(home)


# --- 4. and 7. a secret that cannot be used fails its job, and only it --------------


def _job_with_secret(tmp_path: Path, name: str, secret: Path, extra: str = "") -> Path:
    job = tmp_path / f"{name}.toml"
    job.write_text(
        f'name = "{name}"\ncommand = ["sh", "-c", "echo ${{#TOKEN}}"]\n{extra}'
        f'[secrets]\nTOKEN = {{ file = "{secret}" }}\n'
    )
    return job


def test_an_unusable_secret_fails_its_job_and_the_scheduler_goes_on(
    home: dict[str, str], tmp_path: Path, ledger: Ledger
) -> None:
    """A secret file that is not UTF-8, holds a NUL, or is missing fails its job (single,
    array child, multi-node) with a reason naming the secret and the file, never its
    content; what the job held is given back, so a 4-node job behind it runs, and
    terminate/list/submit keep working."""
    content = "TOPSECRET" + uuid.uuid4().hex
    bad = tmp_path / "bad-token"
    bad.write_bytes(b"\xff\xfe" + content.encode() + b"\xc3")
    nul = tmp_path / "nul-token"
    nul.write_bytes(content.encode() + b"\0x")
    missing = tmp_path / "missing-token"
    jobs = {
        "bad": submit(home, str(_job_with_secret(tmp_path, "bad", bad))),
        "nul": submit(home, str(_job_with_secret(tmp_path, "nul", nul))),
        "gone": submit(home, str(_job_with_secret(tmp_path, "gone", missing))),
        "mnbad": submit(home, "--nodes", "2", str(_job_with_secret(tmp_path, "mnbad", bad))),
        "arrbad": submit(home, "--array-size", "3", str(_job_with_secret(tmp_path, "ab", bad))),
    }
    ledger.fault("unusable secret file (not UTF-8, NUL, missing)", len(jobs))
    # a job that needs every one of the 4 local nodes: it runs only if nothing is held
    whole = submit(home, "--nodes", "4", "--", "true")
    assert wait_end(home, whole)["state"] == "SUCCEEDED"
    for name, job in jobs.items():
        d = wait_end(home, job)
        assert d["state"] == "FAILED", (name, d)
        reason = d["reason"] or ""
        if name == "arrbad":
            d = describe(home, f"{job}:0")
            reason = d["reason"] or ""
        path = {"nul": nul, "gone": missing}.get(name, bad)
        assert "secret TOKEN" in reason and str(path) in reason, (name, reason)
    assert "not UTF-8" in describe(home, jobs["bad"])["reason"]
    assert "NUL" in describe(home, jobs["nul"])["reason"]
    r = mnp("terminate", jobs["bad"], "--reason", "again", env=home)
    assert r.returncode == 0, r.stderr
    assert describe(home, jobs["bad"])["state"] == "FAILED"
    # everything was given back: the whole cluster again, at once
    again = submit(home, "--nodes", "4", "--", "true")
    assert wait_end(home, again)["state"] == "SUCCEEDED"
    assert content.encode() not in everything_stored(home)


def test_a_secret_that_would_block_never_freezes_the_controller(
    home: dict[str, str], tmp_path: Path, ledger: Ledger
) -> None:
    """A FIFO (no writer: an open or read would block forever), a device that never
    ends, a directory and a file too big for an environment variable are refused
    without being read: their jobs fail, the controller answers all along."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 200_000)
    cases = {"fifo": (fifo, "FIFO"), "zero": (Path("/dev/zero"), "device")}
    cases.update(folder=(tmp_path, "directory"), big=(big, "larger than"))
    try:
        jobs = {}
        for name, (path, _) in cases.items():
            jobs[name] = submit(home, str(_job_with_secret(tmp_path, name, path)))
            ledger.fault(f"secret file that would block ({name})")
        t0 = time.monotonic()
        r = mnp("submit", "--wait", "--", "true", env=home, timeout=20)
        assert r.returncode == 0, r.stderr
        r = mnp("hosts", "--json", env=home, timeout=20)
        assert r.returncode == 0 and json.loads(r.stdout), r.stderr
        assert time.monotonic() - t0 < 15
        for name, (path, why) in cases.items():
            d = wait_end(home, jobs[name])
            assert d["state"] == "FAILED", (name, d)
            assert f"secret TOKEN: file {path}" in d["reason"] and why in d["reason"], d
    finally:
        # the old behaviour: a controller stuck in open(); a writer that comes and goes
        # lets it go (EOF), so that the fixture can stop it
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


# --- the controller itself: one job's exception stays that job's -----------------------


@pytest.fixture
async def ctl() -> AsyncIterator[Controller]:
    c = Controller(local_inventory(2), {"local": LocalTransport()})
    await c.start()
    try:
        yield c
    finally:
        await c.close()


async def _done(c: Controller, job: Job) -> Job:
    return await asyncio.wait_for(c.wait(job), 30)


def _all_free(c: Controller) -> bool:
    return all(cap.free_vcpus == cap.vcpus and not cap.tasks for cap in c.capacity.values())


async def test_an_exception_launching_one_job_fails_that_job_only(
    ctl: Controller, monkeypatch: pytest.MonkeyPatch, ledger: Ledger
) -> None:
    """Whatever a launch raises (here: a bug injected into the task environment of jobs
    named ``boom``, single and multi-node) fails that job with the error as its reason,
    gives back what it held, and the scheduling pass goes on with the next job."""
    real = wiring.task_environment

    def faulty(defn: Any, *args: Any, **kw: Any) -> dict[str, str]:
        if defn.name.startswith("boom"):
            raise RuntimeError("injected fault")
        return real(defn, *args, **kw)

    monkeypatch.setattr(controller_mod, "task_environment", faulty)
    single = ctl.submit(definition_from_command(["true"], name="boom"))
    multi = ctl.submit(definition_from_command(["true"], name="boom-mn", nodes=2))
    good = ctl.submit(definition_from_command(["true"]))
    whole = ctl.submit(definition_from_command(["true"], nodes=2))
    ledger.fault("exception while launching a job", 2)
    for job in (single, multi):
        await _done(ctl, job)
        assert job.state is JobState.FAILED
        assert job.reason == "Launch failed: RuntimeError: injected fault", job.reason
    for job in (good, whole):
        await _done(ctl, job)
        assert job.state is JobState.SUCCEEDED, job.reason
    assert _all_free(ctl)


async def test_an_exception_handling_a_tasks_event_fails_that_job_only(
    ctl: Controller, ledger: Ledger
) -> None:
    """An exception while handling an agent's event (here: the output handler fails for
    one job) ends that job; the host's connection and its other jobs go on."""

    def on_output(job: Job, task: TaskRun, fd: int, data: str) -> None:
        if job.defn.name == "loud":
            raise UnicodeEncodeError("utf-8", data, 0, 1, "injected fault")

    ctl.on_output = on_output
    loud = ctl.submit(definition_from_command(["sh", "-c", "echo hi; sleep 30"], name="loud"))
    quiet = ctl.submit(definition_from_command(["sh", "-c", "sleep 0.5; echo ok"]))
    ledger.fault("exception while handling an agent's event")
    await _done(ctl, loud)
    assert loud.state is JobState.FAILED
    assert (loud.reason or "").startswith("Controller error: UnicodeEncodeError"), loud.reason
    await _done(ctl, quiet)
    assert quiet.state is JobState.SUCCEEDED
    after = ctl.submit(definition_from_command(["true"], nodes=2))
    await _done(ctl, after)
    assert after.state is JobState.SUCCEEDED and _all_free(ctl)


async def test_a_secret_read_that_hangs_fails_its_job_after_the_bound(
    ctl: Controller, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ledger: Ledger
) -> None:
    """A read that never returns (a hung file system) is waited for off the loop, at
    most SECRET_READ_TIMEOUT: jobs go on meanwhile, then the job fails saying so."""
    release = threading.Event()
    real = offloop.read_regular_file

    def hung(path: str, limit: int) -> bytes:
        if path.endswith("hung"):
            release.wait(30)
        return real(path, limit)

    monkeypatch.setattr(controller_mod, "read_regular_file", hung)
    monkeypatch.setattr(controller_mod, "SECRET_READ_TIMEOUT", 1.5)
    (tmp_path / "hung").write_text("x")
    data = {
        "name": "hung",
        "command": ["true"],
        "secrets": {"TOKEN": {"file": str(tmp_path / "hung")}},
    }
    try:
        job = ctl.submit(parse_definition(data, "<test>"))
        ledger.fault("secret read that hangs")
        t0 = time.monotonic()
        other = ctl.submit(definition_from_command(["true"]))
        await _done(ctl, other)
        assert other.state is JobState.SUCCEEDED and time.monotonic() - t0 < 1.5
        await _done(ctl, job)
        assert job.state is JobState.FAILED
        assert job.reason == f"secret TOKEN: file {tmp_path / 'hung'}: not read within 1.5s"
        assert _all_free(ctl)
    finally:
        release.set()


# --- 5. a secret's source is never stored ------------------------------------------


@pytest.mark.security("a secret's source variable is never stored")
def test_export_never_stores_a_secret_source(
    home: dict[str, str], tmp_path: Path, ledger: Ledger
) -> None:
    """``--export`` forwards the shell's variables except a secret's name and the
    variable a ``{ env = NAME }`` secret is read from; ``--env`` and the definition's
    environments (job and node group) may not set that variable at all."""
    value = "source-value-" + uuid.uuid4().hex
    env = {**home, "TEST12_SRC": value, "TEST12_PLAIN": "plain"}
    job = tmp_path / "src.toml"
    job.write_text(
        'name = "src"\n'
        'command = ["sh", "-c", "printf %s \\"$TOKEN\\" | sha256sum; echo $TEST12_PLAIN"]\n'
        '[secrets]\nTOKEN = { env = "TEST12_SRC" }\n'
    )
    for args in (["submit", "--wait", "--export", str(job)], ["run", "--export", str(job)]):
        r = mnp(*args, env=env)
        assert r.returncode == 0, r.stderr
        ledger.fault("--export with a secret's source set")
    r = mnp("logs", "1", env=home)
    assert hashlib.sha256(value.encode()).hexdigest() in r.stdout and "plain" in r.stdout
    d = describe(home, "1")
    assert d["definition"]["environment"]["TEST12_PLAIN"] == "plain"
    assert value.encode() not in everything_stored(home)
    # the paths that would store it outright are refused, in one line
    group = tmp_path / "group.toml"
    group.write_text(
        'name = "g"\ntype = "multinode"\ncommand = ["true"]\n[multinode]\nnum_nodes = 2\n'
        '[[multinode.groups]]\ntarget_nodes = ":"\nenvironment = { TEST12_SRC = "v" }\n'
        '[secrets]\nTOKEN = { env = "TEST12_SRC" }\n'
    )
    top = tmp_path / "top.toml"
    top.write_text(job.read_text() + '[environment]\nTEST12_SRC = "v"\n')
    for args in (
        ["submit", "--env", f"TEST12_SRC={value}", str(job)],
        ["run", "--env", f"TEST12_SRC={value}", str(job)],
        ["submit", str(top)],
        ["validate", str(group)],
    ):
        with ledger.tried("environment setting a secret's source"):
            r = mnp(*args, env=env)
            assert r.returncode == 2, (args, r.stderr)
            assert r.stderr.count("\n") == 1 and "TEST12_SRC is where secret TOKEN" in r.stderr
    assert value.encode() not in everything_stored(home)


# --- 10. bytes that are not UTF-8 on the command line ------------------------------


def test_bytes_that_are_not_utf8_pass_end_to_end(
    home: dict[str, str], tmp_path: Path, ledger: Ledger
) -> None:
    """Arguments, --env and --param values and the working directory may hold bytes that
    are not UTF-8: they reach the task exactly, through the daemon and in-process, and
    every command that shows the job works (no traceback)."""
    folder = tmp_path / "dir-\udcfd"
    folder.mkdir()
    argv = ["sh", "-c", 'printf "%s|%s|%s|%s" "$1" "$2" "$X" "$PWD"', "sh", "a\udcff", "Ref::p"]
    opts = ["--env", "X=c\udcfc", "--param", "p=b\udcfe", "--cwd", str(folder)]
    want = b"a\xff|b\xfe|c\xfc|" + os.fsencode(folder)
    solo = {"MNP_HOME": str(tmp_path / "solo")}  # no controller there: in-process
    with ledger.tried("non-UTF-8 argv, --env, --param, --cwd"):
        r = mnp_bytes("run", *opts, "--", *argv, env=solo)
        assert (r.returncode, r.stdout) == (0, want), r.stderr
        r = mnp_bytes("submit", "--wait", *opts, "--", *argv, env=home)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
        job = r.stdout.decode().strip()
        assert mnp_bytes("logs", job, env=home).stdout == want
        r = mnp_bytes("run", *opts, "--", *argv, env=home)  # through the daemon
        assert (r.returncode, r.stdout) == (0, want), r.stderr
        for args in (["describe", job], ["describe", job, "--json"], ["list"], ["events"]):
            r = mnp_bytes(*args, env=home)
            assert r.returncode == 0 and b"Traceback" not in r.stderr, (args, r.stderr)
        d = json.loads(mnp_bytes("describe", job, "--json", env=home).stdout)
        assert d["definition"]["environment"]["X"] == "c\udcfc"
        assert d["definition"]["cwd"] == str(folder)
    with ledger.tried("non-UTF-8 program name and reason"):
        r = mnp_bytes("submit", "--wait", "--", "nope-\udcff", env=home)
        assert r.returncode == 127 and b"Traceback" not in r.stderr, r.stderr
        bad = r.stdout.decode().strip()
        assert describe(home, bad)["reason"].startswith("nope-\\xff: ")
        job = submit(home, "--", "sleep", "30")
        r = mnp_bytes("terminate", job, "--reason", "why-\udcfe", env=home)
        assert r.returncode == 0, r.stderr
        assert wait_end(home, job)["reason"] == "why-\\xfe"
        r = mnp_bytes("submit", "--wait", "--", "true", env=home)  # the store still takes jobs
        assert r.returncode == 0, r.stderr
        assert describe(home, r.stdout.decode().strip())["state"] == "SUCCEEDED"
    # a name or id that is not UTF-8 names nothing: one line, never a traceback
    for args, code in (
        (["describe", "4\udcff"], 2),
        (["logs", "4\udcff"], 2),
        (["cancel", "4\udcff", "--reason", "r"], 2),
        (["terminate", "4\udcff", "--reason", "r"], 2),
        (["events", "--job", "4\udcff"], 2),
        (["events", "--job", "4\udcff:1"], 2),
        (["list", "--queue", "q\udcff"], 0),
        (["run", "--queue", "q\udcff", "--", "true"], 2),
    ):
        with ledger.tried("non-UTF-8 job id or queue name"):
            r = mnp_bytes(*args, env=home)
            assert r.returncode == code and b"Traceback" not in r.stderr, (args, r.stderr)
            assert r.stderr.count(b"\n") == (code != 0), (args, r.stderr)


# --- 11. a definition's working directory ------------------------------------------


def test_a_definitions_cwd_is_kept(home: dict[str, str], tmp_path: Path, ledger: Ledger) -> None:
    """The definition's ``cwd`` wins over the caller's directory, ``--cwd`` over both; a
    relative one is relative to the caller's directory (as Slurm's --chdir)."""
    for d in ("own", "flag", "rel"):
        (tmp_path / d).mkdir()
    own = tmp_path / "own.toml"
    own.write_text(f'name = "own"\ncommand = ["pwd"]\ncwd = "{tmp_path / "own"}"\n')
    plain = tmp_path / "plain.toml"
    plain.write_text('name = "plain"\ncommand = ["pwd"]\n')
    rel = tmp_path / "rel.toml"
    rel.write_text('name = "rel"\ncommand = ["pwd"]\ncwd = "rel"\n')
    cases = [
        ([str(own)], ROOT, tmp_path / "own"),
        (["--cwd", str(tmp_path / "flag"), str(own)], ROOT, tmp_path / "flag"),
        ([str(plain)], tmp_path, tmp_path),
        ([str(rel)], tmp_path, tmp_path / "rel"),
        (["--cwd", "flag", str(plain)], tmp_path, tmp_path / "flag"),
        (["--", "pwd"], tmp_path / "own", tmp_path / "own"),
    ]
    for args, where, want in cases:
        with ledger.tried("definition with its own cwd"):
            r = mnp("run", *args, env=home, cwd=where)
            assert (r.returncode, r.stdout) == (0, f"{want}\n"), (args, r.stderr)
            r = mnp("submit", "--wait", *args, env=home, cwd=where)
            assert r.returncode == 0, r.stderr
            job = r.stdout.strip()
            assert mnp("logs", job, env=home).stdout == f"{want}\n", args
            assert describe(home, job)["definition"]["cwd"] == str(want)


# --- 16. task output, byte for byte ------------------------------------------------


def test_task_output_is_kept_byte_for_byte(
    home: dict[str, str], tmp_path: Path, ledger: Ledger
) -> None:
    """Output that is not UTF-8 (random bytes, every byte value, a multi-byte character
    cut at the end, CR) is stored, shown by ``mnp logs`` and streamed by ``mnp run``
    exactly as the task wrote it, on stdout and stderr."""
    payload = (
        os.urandom(4096)
        + bytes(range(256))
        + "é€😀".encode() * 30_000  # several 64 KiB chunks: characters cut between them
        + b"\r\nlast line \xe2\x82"  # no newline, and an unfinished UTF-8 sequence
    )
    data = tmp_path / "payload"
    data.write_bytes(payload)
    out = ["--", "cat", str(data)]
    err = ["--", "sh", "-c", f'cat "{data}" >&2']
    solo = {"MNP_HOME": str(tmp_path / "solo")}
    ledger.fault("task output that is not UTF-8", 6)
    r = mnp_bytes("run", *out, env=solo)  # in-process
    assert r.returncode == 0 and r.stdout == payload, (len(r.stdout), r.stderr[-300:])
    r = mnp_bytes("run", *err, env=solo)
    assert r.returncode == 0 and r.stderr == payload, len(r.stderr)
    r = mnp_bytes("submit", "--wait", *out, env=home)
    assert r.returncode == 0, r.stderr
    job = r.stdout.decode().strip()
    assert (Path(home["MNP_HOME"]) / "logs" / job / f"{job}.out").read_bytes() == payload
    r = mnp_bytes("logs", job, env=home)
    assert r.returncode == 0 and r.stdout == payload, len(r.stdout)
    r = mnp_bytes("submit", "--wait", *err, env=home)
    job = r.stdout.decode().strip()
    assert mnp_bytes("logs", job, "--stderr", env=home).stdout == payload
    r = mnp_bytes("run", *out, env=home)  # streamed through the daemon
    assert r.returncode == 0 and r.stdout == payload, len(r.stdout)
    r = mnp_bytes("run", *err, env=home)
    assert r.returncode == 0 and r.stderr == payload, len(r.stderr)
