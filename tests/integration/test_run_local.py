"""``mnp run`` end to end on the embedded local inventory (issue: the first whole slice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from tests.helpers import ROOT, mnp, procs_with_env, wait_no_procs


def test_exit_code_is_the_jobs() -> None:
    r = mnp("run", "--", "sh", "-c", "exit 7")
    assert r.returncode == 7, r.stderr


def test_success_prints_output_without_prefix() -> None:
    r = mnp("run", "--", "echo", "hello world")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello world\n"


def test_array_prints_every_index_prefixed() -> None:
    r = mnp("run", "--array-size", "5", "--", "sh", "-c", "echo $MNP_ARRAY_INDEX")
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    assert lines == [f"{i}: {i}" for i in range(5)]


def test_array_parallelism_caps_running_children(tmp_path: Path) -> None:
    log = tmp_path / "log"
    script = f"echo start $(date +%s.%N) >> {log}; sleep 0.3; echo stop $(date +%s.%N) >> {log}"
    r = mnp("run", "--array-size", "4", "--array-parallelism", "1", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    events = [line.split() for line in log.read_text().splitlines()]
    running = peak = 0
    for kind, _t in sorted(events, key=lambda e: float(e[1])):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 1


def test_array_fails_when_a_child_fails() -> None:
    r = mnp("run", "--array-size", "3", "--", "sh", "-c", 'test "$MNP_ARRAY_INDEX" != 1 || exit 5')
    assert r.returncode == 5
    assert "FAILED" in r.stderr


def test_timeout_exits_124_quickly() -> None:
    t0 = time.monotonic()
    r = mnp("run", "--timeout", "1s", "--", "sleep", "30")
    elapsed = time.monotonic() - t0
    assert r.returncode == 124, r.stderr
    assert "Job attempt duration exceeded timeout" in r.stderr
    assert elapsed < 10  # ~1.4 s idle: 1 s limit + start-up and teardown


def test_retries_then_fails_with_the_last_exit_code(tmp_path: Path) -> None:
    count = tmp_path / "count"
    r = mnp("run", "--attempts", "3", "--", "sh", "-c", f"echo x >> {count}; exit 3")
    assert r.returncode == 3
    assert count.read_text().count("x") == 3


def test_missing_program_exits_127() -> None:
    r = mnp("run", "--", "/nonexistent/program")
    assert r.returncode == 127
    assert "nonexistent" in r.stderr


def test_arguments_are_never_shell_interpreted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker}); rm -rf ~ `touch {marker}` *"
    r = mnp("run", "--", "echo", evil)
    assert r.returncode == 0
    assert r.stdout == evil + "\n"
    assert not marker.exists()


def test_task_environment_on_local_nodes() -> None:
    r = mnp(
        "run",
        "--nodes",
        "3",
        "--",
        "sh",
        "-c",
        # the main node's exit ends the job (AWS Batch): it waits for the others' lines
        "echo $MNP_NODE_INDEX $MNP_NUM_NODES $RANK $WORLD_SIZE $MASTER_ADDR $MNP_JOB_ID;"
        ' [ "$MNP_NODE_INDEX" != 0 ] || sleep 1',
    )
    assert r.returncode == 0, r.stderr
    rows = sorted(r.stdout.splitlines())
    assert [row.split(": ", 1)[0] for row in rows] == ["0", "1", "2"]
    for row in rows:
        label, rest = row.split(": ", 1)
        node, num, rank, world, addr, jid = rest.split()
        assert (node, num, rank, world, addr) == (label, "3", label, "3", "localhost")
        assert jid.endswith(f"#{label}")


def _teardown_definition(tmp_path: Path) -> Path:
    child = (
        "sleep 1000 & "
        "python3 -c 'import os,time; "
        "os.fork() and os._exit(0); os.setsid(); os.fork() and os._exit(0); time.sleep(1000)' ; "
        "wait"
    )
    path = tmp_path / "teardown.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name = "teardown"
            type = "multinode"
            [multinode]
            num_nodes = 4
            main_node = 0
            [[multinode.groups]]
            target_nodes = "0"
            command = ["sleep", "0.5"]
            [[multinode.groups]]
            target_nodes = "1:"
            command = ["sh", "-c", "{child}"]
            """
        )
    )
    return path


def test_main_exit_tears_down_every_node_including_daemons(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    t0 = time.monotonic()
    r = mnp("run", "--env", f"TEST_MARK={mark}", str(_teardown_definition(tmp_path)))
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    # the children's sleep 1000 (and daemons) were not waited for: torn down at once.
    # (~0.8 s on an idle 2-core machine; the bound leaves room for a loaded CI host)
    assert elapsed < 10, elapsed
    assert procs_with_env("TEST_MARK", mark) == []


def test_ctrl_c_terminates_and_exits_130(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mnp",
            "run",
            "--env",
            f"TEST_MARK={mark}",
            "--nodes",
            "2",
            "--",
            "sleep",
            "1000",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while len(procs_with_env("TEST_MARK", mark)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(procs_with_env("TEST_MARK", mark)) == 2
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert wait_no_procs("TEST_MARK", mark, 1) == []


def test_sigkill_of_mnp_run_leaves_nothing(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mnp",
            "run",
            "--env",
            f"TEST_MARK={mark}",
            "--nodes",
            "4",
            "--",
            "sleep",
            "1000",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while len(procs_with_env("TEST_MARK", mark)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(procs_with_env("TEST_MARK", mark)) == 4
    proc.kill()
    proc.wait()
    assert wait_no_procs("TEST_MARK", mark, 3) == []


def test_on_child_failure_terminate_ends_the_job(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        textwrap.dedent(
            """\
            name = "childfail"
            type = "multinode"
            [multinode]
            num_nodes = 2
            on_child_failure = "terminate"
            [[multinode.groups]]
            target_nodes = "0"
            command = ["sleep", "30"]
            [[multinode.groups]]
            target_nodes = "1"
            command = ["sh", "-c", "exit 9"]
            """
        )
    )
    t0 = time.monotonic()
    r = mnp("run", str(path))
    assert time.monotonic() - t0 < 10
    assert r.returncode == 9
    assert "Child node 1 exited with code 9" in r.stderr


def test_child_failure_is_ignored_by_default(tmp_path: Path) -> None:
    path = tmp_path / "i.toml"
    path.write_text(
        textwrap.dedent(
            """\
            name = "childignore"
            type = "multinode"
            [multinode]
            num_nodes = 2
            [[multinode.groups]]
            target_nodes = "0"
            command = ["sleep", "0.5"]
            [[multinode.groups]]
            target_nodes = "1"
            command = ["sh", "-c", "exit 9"]
            """
        )
    )
    r = mnp("run", str(path))
    assert r.returncode == 0, r.stderr


def test_mpi_hello_runs_on_four_local_nodes() -> None:
    r = mnp("run", "nodegroups/mpi-hello.toml", timeout=120)
    assert r.returncode == 0, r.stderr
    hellos = [line for line in r.stdout.splitlines() if "hello from rank" in line]
    assert len(hellos) == 4
    assert {line.split(" on node ")[1].split()[0] for line in hellos} == {"0", "1", "2", "3"}
    assert "allreduce ok" in r.stdout


def test_bad_definition_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\ncommand = ["true"]\n[array]\nsize = 1\n')
    r = mnp("run", str(path))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"mnp: {path}:array.size: ")
    assert "Traceback" not in r.stderr


def test_a_closed_stdout_ends_mnp_run_and_its_job_like_a_unix_filter(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    for through_controller in (False, True):
        if through_controller:
            assert mnp("controller", "start", "--home", home).returncode == 0
        mark = uuid.uuid4().hex
        r = subprocess.run(
            ["bash", "-c", _into_head(mark)], env={**os.environ, "MNP_HOME": home},
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.stdout == "line\nmnp=141\n", (through_controller, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "Broken pipe" not in r.stderr, r.stderr
        assert wait_no_procs("TEST_MARK", mark, 5) == []
    jobs = mnp("list", "--home", home).stdout
    assert "Standard output of mnp run closed" in jobs
    mnp("controller", "stop", "--home", home)


def _into_head(mark: str) -> str:
    """``mnp run -- <endless output> | head -1`` in bash; PIPESTATUS says how mnp ended."""
    return (
        f'"{sys.executable}" -m mnp run --env TEST_MARK={mark} -- '
        "sh -c 'while :; do echo line; done' | head -1; echo \"mnp=${PIPESTATUS[0]}\""
    )


def test_a_second_signal_ends_mnp_run_at_once(tmp_path: Path) -> None:
    """The first SIGINT terminates the job, whose task ignores SIGTERM (teardown waits its
    kill_grace, 10 s); a second signal makes mnp run stop waiting and kill it now."""
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnp", "run", "--env", f"TEST_MARK={mark}", "--",
         "sh", "-c", "trap '' TERM INT; echo ready; while :; do sleep 0.1; done"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # still tearing down: the task ignores SIGTERM
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 5, err
    assert proc.returncode == 130, err
    assert wait_no_procs("TEST_MARK", mark, 5) == []


def test_mnp_run_without_a_controller_records_its_job_like_any_other(tmp_path: Path) -> None:
    home = {"MNP_HOME": str(tmp_path / "home")}
    r = mnp("run", "--name", "first", "--", "sh", "-c", "echo out; echo err >&2; exit 3", env=home)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    # nothing keeps running after it: no controller answers for the home
    assert mnp("controller", "status", env=home).returncode == 3
    d = json.loads(mnp("describe", "1", "--json", env=home).stdout)
    assert (d["name"], d["state"], d["exit_code"]) == ("first", "FAILED", 3)
    assert len(d["attempts"]) == 1
    assert mnp("logs", "1", env=home).stdout == "out\n"
    assert mnp("logs", "1", "--stderr", env=home).stdout == "err\n"
    states = [json.loads(line)["status"] for line in mnp("events", env=home).stdout.splitlines()]
    assert states == ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "FAILED"]
    events_file = Path(home["MNP_HOME"], "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in events_file] == states
    # ids go on, in-process and through a daemon alike
    assert mnp("run", "--nodes", "2", "--", "true", env=home).returncode == 0
    assert mnp("submit", "--wait", "--", "true", env=home).stdout == "3\n"
    mnp("controller", "stop", env=home)
    assert mnp("run", "--", "true", env=home).returncode == 0
    listed = mnp("list", "--json", env=home).stdout
    assert [j["id"] for j in json.loads(listed)] == ["1", "2", "3", "4"]


def test_concurrent_mnp_runs_and_a_submit_share_the_first_runs_controller(
    tmp_path: Path,
) -> None:
    """A submission script's ``mnp run a & mnp run b & wait``: the first run is the home's
    controller, the second goes through it, and the first stays until both have ended."""
    home = {**os.environ, "MNP_HOME": str(tmp_path / "home")}
    first = subprocess.Popen(
        [sys.executable, "-m", "mnp", "run", "--", "sh", "-c", "echo a; sleep 2; exit 4"],
        cwd=ROOT, env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert first.stdout is not None and first.stdout.readline() == "a\n"
    second = mnp("run", "--", "sh", "-c", "sleep 3; echo b", env=home)
    assert (second.returncode, second.stdout) == (0, "b\n"), second.stderr
    out, err = first.communicate(timeout=30)
    assert first.returncode == 4, err
    jobs = {j["id"]: j for j in json.loads(mnp("list", "--json", env=home).stdout)}
    assert {k: v["state"] for k, v in jobs.items()} == {"1": "FAILED", "2": "SUCCEEDED"}


def test_param_fills_a_ref_the_file_does_not_declare(tmp_path: Path) -> None:
    job = tmp_path / "py.toml"
    job.write_text('command = ["Ref::python", "-c", "print(\'from\', \'Ref::who\')"]\n')
    r = mnp("run", str(job), "--param", f"python={sys.executable}", "--param", "who=param")
    assert (r.returncode, r.stdout) == (0, "from param\n"), r.stderr
    r = mnp("run", str(job), "--param", f"python={sys.executable}")  # Ref::who has no value
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{job}:command[2]: Ref::who names no parameter" in r.stderr
    r = mnp("run", str(job), "--param", "who=x", "--param", "pyhton=x", "--param", "python=y")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("mnp: <command line>:--param: pyhton: no Ref::pyhton"), r.stderr
