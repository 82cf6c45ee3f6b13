"""``mnp run`` end to end on the embedded local inventory (issue: the first whole slice)."""

from __future__ import annotations

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
