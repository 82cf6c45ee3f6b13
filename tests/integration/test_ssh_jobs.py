"""Jobs over SSH through the CLI: ``mnp run --inventory <4 real sshds>`` (issue: SSH inventories).

Every "host" is this machine behind its own sshd (tests/integration/sshd.py),
so a job's processes are found with psutil by a unique ``TEST_MARK`` in their
environment, and ``under_sshd`` tells which server started them. The batch
system inventories (Slurm, PBS) are checked without connecting to anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, mnp, wait_no_procs
from tests.integration.fixtures_jobs import (
    Background,
    cores,
    env_of,
    inventory_with_known_hosts,
    under_sshd,
)
from tests.integration.sshd import SshdCluster

TIMINGS = re.compile(r"^mnp: job \S+ attempt (\d+): (\{.*\})$", re.M)


def inv(cluster: SshdCluster) -> str:
    return str(cluster.inventory_toml)


# --- jobs ---------------------------------------------------------------------


@pytest.mark.ssh
def test_single_job_runs_on_an_ssh_host_in_the_submit_directory(sshd_hosts: SshdCluster) -> None:
    r = mnp("run", "--inventory", inv(sshd_hosts), "--", "sh", "-c", "echo $MNP_HOST; pwd")
    assert r.returncode == 0, r.stderr
    host, cwd = r.stdout.split()
    assert host in sshd_hosts.names
    assert cwd == str(ROOT)


@pytest.mark.ssh
def test_tasks_on_ssh_hosts_find_the_submitters_virtual_environment(
    sshd_hosts: SshdCluster, tmp_path: Path
) -> None:
    # a venv that is not the system's nor the one the tests run in, on the file system
    # the hosts share (every sshd host is this machine)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    show = ["--", "sh", "-c", 'command -v python3; echo "VIRTUAL_ENV=$VIRTUAL_ENV"']
    activated = {"VIRTUAL_ENV": str(venv), "PATH": f"{venv}/bin:{os.environ['PATH']}"}
    r = mnp("run", "--inventory", inv(sshd_hosts), *show, env=activated)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{venv}/bin/python3", f"VIRTUAL_ENV={venv}"]
    r = mnp("submit", "--home", str(tmp_path / "home"), "--inventory", inv(sshd_hosts),
            "--wait", *show, env=activated)  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = json.loads(mnp("describe", "--home", str(tmp_path / "home"), "--json", "1").stdout)
    assert job["definition"]["python_env"] == str(venv)  # stored: a restart keeps it
    mnp("controller", "stop", "--home", str(tmp_path / "home"))
    # named explicitly, from a shell where nothing is activated
    r = mnp("run", "--inventory", inv(sshd_hosts), "--python-env", str(venv), *show)
    assert r.stdout.splitlines()[0] == f"{venv}/bin/python3", r.stderr
    # turned off: the host's own login PATH
    r = mnp("run", "--inventory", inv(sshd_hosts), "--python-env", "none", *show, env=activated)
    assert r.returncode == 0, r.stderr
    assert not r.stdout.splitlines()[0].startswith(str(venv))
    assert r.stdout.splitlines()[1] == "VIRTUAL_ENV="


@pytest.mark.ssh
def test_array_of_8_children_spreads_over_the_hosts(sshd_hosts: SshdCluster) -> None:
    # two children fit on a host: first-fit packing must then use all four
    r = mnp(
        "run",
        "--inventory",
        inv(sshd_hosts),
        "--array-size",
        "8",
        "--vcpus",
        f"{cores() / 2:g}",
        "--",
        "sh",
        "-c",
        "echo $MNP_ARRAY_INDEX $MNP_ARRAY_SIZE $MNP_HOST",
    )
    assert r.returncode == 0, r.stderr
    rows = sorted(line.split() for line in r.stdout.splitlines())
    assert [row[:3] for row in rows] == [[f"{i}:", str(i), "8"] for i in range(8)]
    assert Counter(row[3] for row in rows) == {name: 2 for name in sshd_hosts.names}


def all_nodes_then(barrier: Path, command: str) -> str:
    """``sh -c`` text: run ``command`` on every node; the main node then waits until
    every node has (all hosts share this file system), since its exit ends the job."""
    return (
        f"{command}; touch {barrier}/$MNP_NODE_INDEX; "
        "if [ $MNP_NODE_INDEX = $MNP_MAIN_NODE_INDEX ]; then "
        f"for i in $(seq 300); do [ $(ls {barrier} | wc -l) -ge $MNP_NUM_NODES ] && break; "
        "sleep 0.05; done; fi"
    )


@pytest.mark.ssh
def test_four_nodes_on_four_hosts_with_attempt_timings(
    sshd_hosts: SshdCluster, tmp_path: Path
) -> None:
    r = mnp(
        "run",
        "--verbose",
        "--inventory",
        inv(sshd_hosts),
        "--nodes",
        "4",
        "--",
        "sh",
        "-c",
        all_nodes_then(tmp_path, "echo $MNP_NODE_INDEX $MNP_HOST $MNP_NUM_NODES $MASTER_ADDR"),
    )
    assert r.returncode == 0, r.stderr
    rows = sorted(line.split() for line in r.stdout.splitlines())
    assert [row[0] for row in rows] == ["0:", "1:", "2:", "3:"]
    assert [row[1] for row in rows] == ["0", "1", "2", "3"]
    assert sorted(row[2] for row in rows) == sorted(sshd_hosts.names)
    main_host = next(row[2] for row in rows if row[1] == "0")
    assert {(row[3], row[4]) for row in rows} == {("4", sshd_hosts.host(main_host).address)}
    timings = TIMINGS.findall(r.stderr)
    assert [n for n, _ in timings] == ["1"], r.stderr
    t = json.loads(timings[0][1])
    for key in ("placement_to_running", "main_exit_to_reaped"):
        assert isinstance(t[key], int | float) and 0 <= t[key] < 30, t


@pytest.mark.ssh
@pytest.mark.security("metacharacters reach the task literally")
def test_shell_metacharacters_arrive_literally(sshd_hosts: SshdCluster, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker}); rm -rf ~ `touch {marker}` * | && 'q' \"dq\" \\ ;"
    r = mnp("run", "--inventory", inv(sshd_hosts), "--", "echo", evil)
    assert r.returncode == 0, r.stderr
    assert r.stdout == evil + "\n"
    assert not marker.exists()
    assert Path("~").expanduser().is_dir()


@pytest.mark.ssh
def test_sigkill_of_mnp_run_leaves_no_process_on_any_host(sshd_hosts: SshdCluster) -> None:
    job = Background(
        ["--inventory", inv(sshd_hosts), "--nodes", "4", "--", "sleep", "1000"],
        uuid.uuid4().hex,
    )
    try:
        sleeps = job.wait_for(4)
        hosts = {env_of(p, "MNP_HOST") for p in sleeps}
        assert hosts == set(sshd_hosts.names)
        for p in sleeps:  # really started by that host's sshd, not forked here
            assert under_sshd(sshd_hosts, str(env_of(p, "MNP_HOST")), p)
        job.proc.send_signal(signal.SIGKILL)
        job.proc.communicate(timeout=10)
        assert wait_no_procs("TEST_MARK", job.mark, 3) == []
    finally:
        job.kill_leftovers()


# --- host keys ------------------------------------------------------------------


@pytest.fixture(scope="module")
def inventory_without_sshd3(
    sshd_hosts: SshdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    d = tmp_path_factory.mktemp("hostkeys")
    kh = sshd_hosts.known_hosts_file(d / "known_hosts", without=("sshd-3",))
    return inventory_with_known_hosts(sshd_hosts, d / "inventory.toml", kh)


@pytest.mark.ssh
@pytest.mark.security("an unknown SSH host key is refused before login")
def test_unknown_host_key_is_refused_and_jobs_run_on_the_others(
    sshd_hosts: SshdCluster, inventory_without_sshd3: Path
) -> None:
    sshd3_log = sshd_hosts.host("sshd-3").log
    logins_before = sshd3_log.read_text().count("Accepted publickey")
    r = mnp(
        "run",
        "--verbose",
        "--inventory",
        str(inventory_without_sshd3),
        "--array-size",
        "6",
        "--vcpus",
        f"{cores() / 2:g}",
        "--",
        "sh",
        "-c",
        "echo $MNP_HOST",
    )
    assert r.returncode == 0, r.stderr
    used = Counter(line.split()[1] for line in r.stdout.splitlines())
    assert used == {"sshd-1": 2, "sshd-2": 2, "sshd-4": 2}
    refused = [line for line in r.stderr.splitlines() if "sshd-3" in line]
    assert refused, r.stderr
    addr = sshd_hosts.host("sshd-3").address
    assert "host-key" in refused[0] and addr in refused[0] and "not in" in refused[0]
    assert sshd_hosts.host("sshd-3").fingerprint in refused[0]
    # refused during the key exchange: nobody even logged in there
    assert sshd3_log.read_text().count("Accepted publickey") == logins_before


@pytest.mark.ssh
def test_job_needing_a_refused_host_exits_3_naming_it(
    sshd_hosts: SshdCluster, inventory_without_sshd3: Path
) -> None:
    r = mnp("run", "--inventory", str(inventory_without_sshd3), "--nodes", "4", "--", "true")
    assert r.returncode == 3, r.stderr
    assert "sshd-3" in r.stderr


@pytest.mark.ssh
def test_no_usable_host_exits_3_naming_every_host(sshd_hosts: SshdCluster, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    inventory = inventory_with_known_hosts(sshd_hosts, tmp_path / "inventory.toml", empty)
    marker = tmp_path / "ran"
    r = mnp("run", "--inventory", str(inventory), "--", "touch", str(marker))
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("mnp: no host reachable")
    for name in sshd_hosts.names:
        assert f"{name}: host-key" in r.stderr
    assert not marker.exists()


# --- host loss ------------------------------------------------------------------


HOST_LOST_SCRIPT = (
    "echo attempt $MNP_JOB_ATTEMPT node ${MNP_NODE_INDEX:-x} on $MNP_HOST; "
    "if [ $MNP_JOB_ATTEMPT = 1 ]; then exec sleep 1000; fi"
)


def _lose_host_while_running(
    cluster: SshdCluster, job: Background, node: str | None, within: float = 60
) -> tuple[str, int, str, str]:
    """Wait for the job's ``sleep`` (of ``node``), then take its host away; return the
    lost host's name and ``mnp run``'s exit code, stdout and stderr."""
    tasks = job.wait_for(1 if node is None else 2, keep=lambda p: p.name() == "sleep")
    (task,) = [t for t in tasks if node is None or env_of(t, "MNP_NODE_INDEX") == node]
    lost = env_of(task, "MNP_HOST")
    assert lost in cluster.names
    agent = task.parent()
    try:
        cluster.stop(lost)  # the host's SSH vanishes ...
        if agent is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                agent.kill()  # ... and its agent with it: no one there reports anything
        code, out, err = job.finish(within)
    finally:
        cluster.start_host(lost)
    return lost, code, out, err


def _retried_after_host_lost(err: str, lost: str) -> None:
    events = [json.loads(x[5:]) for x in err.splitlines() if x.startswith("mnp: {")]
    retried = [
        e
        for e in events
        if e["status"] == "RUNNABLE" and e["attempt"] == 1 and "node_index" not in e
    ]
    assert [e["reason"] for e in retried] == [f"Host lost: {lost}"], err
    assert events[-1]["status"] == "SUCCEEDED" and events[-1]["attempt"] == 2, err


@pytest.mark.ssh
def test_host_lost_fails_a_single_job_and_the_retry_runs_elsewhere(
    sshd_hosts: SshdCluster,
) -> None:
    job = Background(
        ["--verbose", "--inventory", inv(sshd_hosts), "--attempts", "2"]
        + ["--", "sh", "-c", HOST_LOST_SCRIPT],
        uuid.uuid4().hex,
    )
    try:
        lost, code, out, err = _lose_host_while_running(sshd_hosts, job, None, within=5)
        assert code == 0, err
        first, second = out.splitlines()
        assert first == f"attempt 1 node x on {lost}"
        assert re.fullmatch(r"attempt 2 node x on sshd-\d", second) and lost not in second
        _retried_after_host_lost(err, lost)
    finally:
        job.kill_leftovers()


@pytest.mark.ssh
def test_host_lost_fails_a_multinode_attempt_and_the_retry_avoids_it(
    sshd_hosts: SshdCluster,
) -> None:
    job = Background(
        ["--verbose", "--inventory", inv(sshd_hosts), "--attempts", "2", "--nodes", "2"]
        + ["--", "sh", "-c", HOST_LOST_SCRIPT],
        uuid.uuid4().hex,
    )
    try:
        lost, code, out, err = _lose_host_while_running(sshd_hosts, job, "1")
        assert code == 0, err
        assert f"1: attempt 1 node 1 on {lost}" in out.splitlines()
        again = [x for x in out.splitlines() if x.startswith("0: attempt 2 node 0 on ")]
        assert len(again) == 1 and lost not in again[0], out
        _retried_after_host_lost(err, lost)
    finally:
        job.kill_leftovers()


# --- batch-system inventories (no connection) ----------------------------------


def test_slurm_allocation_lists_hosts_without_connecting() -> None:
    r = mnp(
        "hosts",
        "--inventory",
        "slurm",
        "--json",
        env={
            "SLURM_JOB_NODELIST": "gpu-a[01-03],gpu-b07",
            "SLURM_JOB_CPUS_PER_NODE": "36(x2),72,8",
        },
        timeout=20,
    )
    assert r.returncode == 0, r.stderr
    hosts = json.loads(r.stdout)
    assert [(h["name"], h["vcpus"], h["transport"]) for h in hosts] == [
        ("gpu-a01", 36, "ssh"),
        ("gpu-a02", 36, "ssh"),
        ("gpu-a03", 72, "ssh"),
        ("gpu-b07", 8, "ssh"),
    ]


def test_pbs_nodefile_lists_hosts_without_connecting(tmp_path: Path) -> None:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("cn001\n" * 4 + "cn002\n" * 4 + "cn017\n" * 2)
    env = {"PBS_NODEFILE": str(nodefile), "SLURM_JOB_NODELIST": "", "SLURM_NODELIST": ""}
    r = mnp("hosts", "--inventory", "auto", "--json", env=env, timeout=20)
    assert r.returncode == 0, r.stderr
    hosts = json.loads(r.stdout)
    assert [(h["name"], h["vcpus"]) for h in hosts] == [("cn001", 4), ("cn002", 4), ("cn017", 2)]


@pytest.mark.parametrize("script", ["examples/slurm/submit.sbatch", "examples/pbs/submit.pbs"])
def test_submission_scripts_run_mpi_hello_through_auto(script: str) -> None:
    path = ROOT / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "mnp run --inventory auto nodegroups/mpi-hello.toml" in text
    prefix = "#SBATCH" if script.endswith(".sbatch") else "#PBS"
    assert sum(line.startswith(prefix + " ") for line in text.splitlines()) >= 4


# --- the daemon on SSH hosts ----------------------------------------------------


@pytest.mark.ssh
def test_the_daemon_serves_an_ssh_inventory(sshd_hosts: SshdCluster, tmp_path: Path) -> None:
    env = {"MNP_HOME": str(tmp_path / "home")}
    try:
        first = mnp("submit", "--inventory", inv(sshd_hosts), "--", "sh", "-c", "exit 1", env=env)
        assert first.returncode == 0, first.stderr
        job = first.stdout.strip()
        r = mnp("submit", "--wait", "--depends-on", job, "--", "true", env=env)
        assert r.returncode == 1
        assert f"Dependent job {job} failed" in r.stderr
        r = mnp("submit", "--wait", "--nodes", "4", "--", "sh", "-c", "echo $MNP_HOST", env=env)
        assert r.returncode == 0, r.stderr
        nodes = json.loads(mnp("describe", r.stdout.strip(), "--json", env=env).stdout)["nodes"]
        assert sorted(n["host"] for n in nodes) == sorted(sshd_hosts.names)
        hosts = json.loads(mnp("hosts", "--json", env=env).stdout)
        assert [h["state"] for h in hosts] == ["up"] * 4
    finally:
        mnp("controller", "stop", env=env)


@pytest.mark.ssh
def test_hosts_check_lists_four_usable_hosts_with_their_facts(sshd_hosts: SshdCluster) -> None:
    r = mnp("hosts", "--inventory", inv(sshd_hosts), "--check", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == sshd_hosts.names
    for row in rows:
        assert row["ok"] and row["cores"] >= 1 and row["memory"] > 0
        assert row["python"] and row["agent_s"] is not None
    table = mnp("hosts", "--inventory", inv(sshd_hosts), "--check")
    assert table.returncode == 0 and "4 of 4 hosts usable" in table.stdout


@pytest.mark.ssh
def test_hosts_check_exits_3_and_says_why_a_host_is_unusable(
    sshd_hosts: SshdCluster, inventory_without_sshd3: Path
) -> None:
    r = mnp("hosts", "--inventory", str(inventory_without_sshd3), "--check")
    assert r.returncode == 3
    line = next(x for x in r.stdout.splitlines() if x.startswith("sshd-3"))
    assert "host" in line.lower() and "key" in line.lower()
