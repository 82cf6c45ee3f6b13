"""Jobs in containers (issue 14), with a real podman: single, array and 4-node jobs on the
local default, each task in its group's image, and no container left after success,
failure, terminate, timeout, or a SIGKILLed controller.

The images are built once per session from this host's binaries
(``examples/container_image.py``, ``podman import``: no registry). podman runs with a
``containers.conf`` of the tests' own (``CONTAINERS_CONF``; LAB.md "Podman": runc,
cgroupfs, no default ulimits), never the user's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, describe, mnp, submit, wait_until
from tests.integration.sshd import SshdCluster

pytestmark = pytest.mark.containers

MAIN = "localhost/mnp-hello:main"
WORKER = "localhost/mnp-hello:worker"
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


@pytest.fixture(scope="session", autouse=True)
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """podman configured for this machine (a test-owned containers.conf) and the two
    hello images, built once per session."""
    if shutil.which("podman") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the container tests: apt-get install podman runc")
        pytest.skip("podman is not installed (apt-get install podman runc)")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    old = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(conf)
    try:
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "container_image.py"), MAIN, WORKER],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield
    finally:
        if old is None:
            os.environ.pop("CONTAINERS_CONF", None)
        else:
            os.environ["CONTAINERS_CONF"] = old


def containers(label: str) -> list[str]:
    """Names of the containers (running or not) carrying ``label`` (``K=V``)."""
    r = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return r.stdout.split()


def containers_agent(name: str) -> str:
    """The agent identity (``mnp.agent`` label) of the container ``name``, "" if gone."""
    r = subprocess.run(
        ["podman", "inspect", "--format", '{{index .Config.Labels "mnp.agent"}}', name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return r.stdout.strip()


def none_left(label: str, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while containers(label):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def job_file(tmp_path: Path, command: list[str], extra: str = "") -> tuple[Path, str]:
    """A definition running ``command`` in the main image, its containers labelled with a
    label of this test's own (``mnp.test=UUID``, returned) for ``podman ps`` to find."""
    mark = uuid.uuid4().hex
    path = tmp_path / "job.toml"
    path.write_text(
        f'name = "c"\ncommand = {json.dumps(command)}\n{textwrap.dedent(extra)}\n'
        f'[container]\nimage = "{MAIN}"\nruntime = "podman"\n'
        f'options = ["--label", "mnp.test={mark}"]\n'
    )
    return path, f"mnp.test={mark}"


def test_single_job_runs_in_its_container(tmp_path: Path) -> None:
    script = (
        "test -f /run/.containerenv && echo in-container; cat /etc/mnp-image; "
        'echo "job=$MNP_JOB_ID name=$MNP_JOB_NAME secret=$TOKEN host=$(hostname)"; '
        'echo "aws=$AWS_BATCH_JOB_ID home=${HOME:-unset}"; pwd; echo written > inside.txt'
    )
    path, label = job_file(
        tmp_path,
        ["sh", "-c", script],
        'aws_batch_env = true\n[secrets]\nTOKEN = { env = "G_TEST_SECRET" }\n',
    )
    r = mnp("run", "--cwd", str(tmp_path), str(path), env={"G_TEST_SECRET": "hunter2"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["in-container", MAIN]
    # SPEC §5 inside, the secret too; host networking: the host's own hostname
    assert lines[2] == f"job=1 name=c secret=hunter2 host={os.uname().nodename}"
    # the variables mnp sets, not the host's own (HOME is the image's)
    assert lines[3] == "aws=1 home=/"
    assert lines[4] == str(tmp_path)  # its working directory, mounted at the same path
    assert (tmp_path / "inside.txt").read_text() == "written\n"
    assert containers(label) == []  # --rm: nothing of it is left


def test_memory_limit_is_the_containers(tmp_path: Path) -> None:
    """``--memory`` is enforced by podman on the container (its processes are conmon's,
    outside the agent's cgroup), not on podman's own client: a limit below the client's
    size (some 40 MB) runs a small task, and a task above it is killed."""
    path, label = job_file(
        tmp_path, ["sh", "-c", 'cat /sys/fs/cgroup/memory/memory.limit_in_bytes; echo "$MNP_CPUS"']
    )
    r = mnp("run", "--memory", "24MiB", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(24 << 20)
    hog = 's=xxxxxxxxxxxxxxxx; while :; do s="$s$s"; done'
    path, label = job_file(tmp_path, ["sh", "-c", hog])
    r = mnp("run", "--memory", "24MiB", str(path))
    assert r.returncode == 137, r.stderr  # the kernel's OOM kill (SIGKILL) in the container
    assert none_left(label)


def test_array_job_children_run_in_containers(tmp_path: Path) -> None:
    path, label = job_file(
        tmp_path,
        ["sh", "-c", 'test -f /run/.containerenv && echo "$MNP_ARRAY_INDEX $(cat /etc/mnp-image)"'],
        "[array]\nsize = 3\n",
    )
    r = mnp("run", str(path))
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [f"{i}: {i} {MAIN}" for i in range(3)]
    assert containers(label) == []


def test_container_hello_on_four_local_nodes() -> None:
    """The ready definition: each node in its group's image, MNP_* and the hostfile inside."""
    r = mnp("run", "nodegroups/container-hello.toml", timeout=90)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    assert lines == [
        f"{i}: node {i} of 4: {MAIN if i == 0 else WORKER} in container, rank {i} of 4, 4 hosts"
        for i in range(4)
    ]
    assert none_left("mnp.job=1")


def test_image_and_mount_options(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    r = mnp(
        "run",
        "--image",
        WORKER,
        "--mount",
        f"{data}:/data:ro",
        "--",
        "sh",
        "-c",
        "cat /data/in.txt /etc/mnp-image; echo x > /data/new 2>/dev/null || echo read-only",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["from the host", WORKER, "read-only"]


def test_failure_leaves_no_container(tmp_path: Path) -> None:
    path, label = job_file(tmp_path, ["sh", "-c", "echo failing; exit 3"])
    r = mnp("run", str(path))
    assert r.returncode == 3, r.stderr
    assert r.stdout == "failing\n"
    assert none_left(label)


def test_missing_image_fails_the_job(tmp_path: Path) -> None:
    r = mnp("run", "--image", "localhost/mnp-no-such-image:x", "--", "true")
    assert r.returncode == 125  # the runtime's own failure (podman run: 125)
    assert "localhost/mnp-no-such-image:x" in r.stderr  # its message, on the task's stderr


def test_runtime_missing_on_the_node_fails_the_task(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(  # the runtime is looked up on the task's PATH, which finds none
        'name = "c"\ncommand = ["true"]\n[environment]\nPATH = "/nonexistent"\n'
        f'[container]\nimage = "{MAIN}"\nruntime = "podman"\n'
    )
    r = mnp("run", str(path))
    assert r.returncode == 127, r.stderr
    assert "podman: container runtime not found on PATH" in r.stderr


def test_timeout_leaves_no_container(tmp_path: Path) -> None:
    # 1 s: the SIGTERM comes while the container may still be starting; the runtime's
    # client, signalled then, would hang until SIGKILL (kill_grace): it is not signalled,
    # the container's own processes are
    path, label = job_file(
        tmp_path, ["sleep", "60"], '[timeout]\nattempt_duration = "1s"\nkill_grace = "15s"\n'
    )
    t0 = time.monotonic()
    r = mnp("run", str(path))
    assert r.returncode == 124, r.stderr
    assert "Job attempt duration exceeded timeout" in r.stderr
    assert time.monotonic() - t0 < 12  # well before kill_grace ran out
    assert none_left(label)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"MNP_HOME": str(tmp_path / "home")}
    yield env
    mnp("controller", "stop", env=env)


def test_terminate_leaves_no_container(tmp_path: Path, home: dict[str, str]) -> None:
    secret = uuid.uuid4().hex
    path, label = job_file(
        tmp_path,
        # $$: the shell inside expands it, not the agent (that would put it in argv)
        ["sh", "-c", 'test "$TOKEN" = "$$EXPECTED" && exec sleep 60'],
        f'[environment]\nEXPECTED = "{secret}"\n[secrets]\nTOKEN = {{ env = "G_SECRET" }}\n',
    )
    job = submit({**home, "G_SECRET": secret}, str(path))  # the controller reads it
    wait_until("the container runs", lambda: containers(label), 30)
    wait_until("the task passed its check", lambda: describe(home, job)["state"] == "RUNNING", 30)
    time.sleep(0.5)  # `test` ran (else the task would have ended)
    assert describe(home, job)["state"] == "RUNNING"
    # the secret reached the task inside, and no command line holds it (the runtime's
    # --env NAME reads the value from its environment)
    for p in psutil.process_iter(["cmdline"]):
        assert secret not in " ".join(p.info["cmdline"] or []), p.info["cmdline"]
    # labelled with the job and the agent that started it
    names = containers(f"mnp.job={job}")
    assert set(containers(label)) <= set(names)
    r = mnp("terminate", job, "--reason", "enough", env=home)
    assert r.returncode == 0, r.stderr
    wait_until("the job ends", lambda: describe(home, job)["state"] == "FAILED", 30)
    assert none_left(label)


def test_sigkill_of_mnp_run_leaves_no_container(tmp_path: Path) -> None:
    path, label = job_file(
        tmp_path, ["sleep", "1000"], 'type = "multinode"\n[multinode]\nnum_nodes = 2\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnp", "run", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until("both containers run", lambda: len(containers(label)) == 2, 30)
    finally:
        proc.kill()
        proc.wait()
    assert none_left(label, 20)


def test_stale_sweep_removes_the_containers_of_killed_agents(
    tmp_path: Path, home: dict[str, str]
) -> None:
    """Controller and agents SIGKILLed: nothing tore the containers down. The next
    controller's agents find them (tags, markers) and remove them."""
    path, label = job_file(tmp_path, ["sleep", "1000"])
    job = submit(home, str(path))
    wait_until("the container runs", lambda: containers(label), 30)
    st = json.loads(mnp("controller", "status", "--json", env=home).stdout)
    controller = psutil.Process(int(st["pid"]))
    agents = [p for p in controller.children() if "mnp.agent" in " ".join(p.cmdline())]
    assert agents
    for p in [*agents, controller]:
        p.send_signal(signal.SIGKILL)
    time.sleep(1)
    assert containers(label)  # left running: nobody was there to remove them
    killed = {containers_agent(n) for n in containers(label)} - {""}
    assert killed
    r = mnp("controller", "start", env=home)
    assert r.returncode == 0, r.stderr
    # the new controller runs the job again (its attempt was lost, not failed), in a
    # container of the same name: none of the killed agents' may be left beside it
    wait_until(
        "no container of the killed agents",
        lambda: not killed & {containers_agent(n) for n in containers(label)},
        30,
    )
    assert describe(home, job)["state"] in ("RUNNABLE", "STARTING", "RUNNING", "FAILED")
    mnp("terminate", job, "--reason", "test over", env=home)
    assert none_left(label, 30)


def _containers_inventory(sshd_hosts: SshdCluster, tmp_path: Path) -> Path:
    """The sshd hosts' inventory whose agents' python is a wrapper that sets the tests'
    CONTAINERS_CONF for the hosts' podman (on a real cluster the hosts have their own
    configuration)."""
    python = tmp_path / "python-containers"
    python.write_text(
        f"#!/bin/sh\nCONTAINERS_CONF='{os.environ['CONTAINERS_CONF']}' "
        f"exec '{sshd_hosts.python_mnp}' \"$@\"\n"
    )
    python.chmod(0o755)
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(
        sshd_hosts.toml().replace(f'python = "{sshd_hosts.python_mnp}"', f'python = "{python}"')
    )
    return inventory


@pytest.mark.ssh
def test_container_hello_across_sshd_hosts(sshd_hosts: SshdCluster, tmp_path: Path) -> None:
    """The same definition on four sshd hosts. The hosts' podman reads the tests'
    containers.conf: the agents' python is a wrapper that sets CONTAINERS_CONF (on a
    real cluster the hosts have their own configuration)."""
    inventory = _containers_inventory(sshd_hosts, tmp_path)
    r = mnp("run", "--inventory", str(inventory), "nodegroups/container-hello.toml", timeout=110)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    assert lines == [
        f"{i}: node {i} of 4: {MAIN if i == 0 else WORKER} in container, rank {i} of 4, 4 hosts"
        for i in range(4)
    ]
    assert none_left("mnp.job=1")


def test_mpi_ranks_in_containers_on_two_local_nodes(tmp_path: Path) -> None:
    """Direct MPI launch (issue 16) with ``--image``: each rank runs in a container of its
    own and reaches its node's PMI server over ``PMI_PORT`` (127.0.0.1, host network);
    the image runs this interpreter and venv (MPICH, mpi4py), mounted read-only."""
    venv = sys.prefix
    base = os.path.realpath(sys.base_prefix)
    script = tmp_path / "where.py"
    script.write_text(
        "import os\nfrom mpi4py import MPI\nw = MPI.COMM_WORLD\n"
        "print('rank', w.Get_rank(), 'of', w.Get_size(), 'container',"
        " os.path.exists('/run/.containerenv'), 'pmi_port', 'PMI_PORT' in os.environ)\n"
    )
    mounts = ["/usr:/usr:ro", f"{venv}:{venv}:ro", f"{base}:{base}:ro"]
    opts = [a for m in mounts for a in ("--mount", m)]
    python = os.path.join(venv, "bin", "python")
    before = set(containers("mnp.job"))  # other sessions' containers, perhaps
    common = ["run", "--nodes", "2", "--tasks-per-node", "2", "--mpi", "pmi", "--image", MAIN]
    r = mnp(*common, *opts, "--cwd", str(tmp_path), "--", python, "-m", "mpi4py.bench",
            "helloworld", timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    hello = re.findall(r"^(\d)\.(\d): Hello, World! I am process (\d) of 4 ", r.stdout, re.M)
    assert sorted((int(n), int(t), int(k)) for n, t, k in hello) == [
        (k // 2, k % 2, k) for k in range(4)
    ]
    r = mnp(*common, *opts, "--cwd", str(tmp_path), "--", python, str(script), timeout=120)
    assert r.returncode == 0, r.stderr
    lines = sorted(line.split(": ", 1)[1] for line in r.stdout.splitlines())
    assert lines == [f"rank {k} of 4 container True pmi_port True" for k in range(4)]
    assert set(containers("mnp.job")) <= before


def test_a_container_killed_for_memory_fails_with_the_oom_reason(tmp_path: Path) -> None:
    """podman's own ``--memory`` kill is reported as a bare task's is: the job FAILED
    with ``OutOfMemoryError: Container killed due to memory usage`` (from the kernel's
    OOM report naming the container's cgroup); a container SIGKILLed otherwise exits
    137 too, without that reason."""
    venv, base = sys.prefix, os.path.realpath(sys.base_prefix)
    mounts = ["/usr:/usr:ro", f"{venv}:{venv}:ro", f"{base}:{base}:ro"]
    hog = "x = bytearray(300 << 20)\nx[::4096] = b'a' * len(x[::4096])\n"
    path, label = job_file(tmp_path, [os.path.join(venv, "bin", "python"), "-c", hog])
    opts = [a for m in mounts for a in ("--mount", m)]
    r = mnp("run", "--memory", "64MiB", *opts, str(path), timeout=120)
    assert r.returncode == 137, r.stderr
    reason = (
        "OutOfMemoryError: Container killed due to memory usage (used 64.0 MiB of its 64.0 MiB)"
    )
    assert re.search(r"job \d+ FAILED: " + re.escape(reason), r.stderr), r.stderr
    assert none_left(label)
    path, label = job_file(tmp_path, ["sh", "-c", "kill -9 $$$$"])  # mnp expands $$ to $
    r = mnp("run", "--memory", "64MiB", str(path), timeout=120)
    assert r.returncode == 137, r.stderr
    assert "OutOfMemoryError" not in r.stderr, r.stderr
    assert none_left(label)


@pytest.mark.ssh
def test_mpi_ranks_in_containers_across_sshd_hosts(sshd_hosts: SshdCluster, tmp_path: Path) -> None:
    """The same on two sshd hosts: each node's two ranks in containers of that host's
    agent, over that agent's PMI_PORT."""
    inventory = _containers_inventory(sshd_hosts, tmp_path)
    venv, base = sys.prefix, os.path.realpath(sys.base_prefix)
    mounts = ["/usr:/usr:ro", f"{venv}:{venv}:ro", f"{base}:{base}:ro"]
    before = set(containers("mnp.job"))
    code = (
        "import os; from mpi4py import MPI; w = MPI.COMM_WORLD; "
        "print('rank', w.Get_rank(), 'of', w.Get_size(), 'host', os.environ['MNP_HOST'],"
        " os.path.exists('/run/.containerenv'))"
    )
    r = mnp(
        "run", "--inventory", str(inventory), "--nodes", "2", "--tasks-per-node", "2",
        "--mpi", "pmi", "--image", MAIN, *[a for m in mounts for a in ("--mount", m)],
        "--cwd", str(tmp_path), "--", os.path.join(venv, "bin", "python"), "-c", code,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    found = re.findall(r"^(\d)\.(\d): rank (\d) of 4 host (\S+) True$", r.stdout, re.M)
    assert sorted((int(n), int(t), int(k)) for n, t, k, _ in found) == [
        (k // 2, k % 2, k) for k in range(4)
    ], r.stdout
    hosts = {int(n): h for n, _, _, h in found}
    assert len(set(hosts.values())) == 2  # the two nodes on two sshd hosts
    assert {h for n, t, k, h in found} <= set(sshd_hosts.names)
    assert set(containers("mnp.job")) <= before


def test_a_containerized_rank_that_exits_before_connecting_fails_the_job(tmp_path: Path) -> None:
    """A rank that never connects to PMI_PORT is reported at its exit, as a bare rank that
    closes its PMI_FD, not after the init bound."""
    venv, base = sys.prefix, os.path.realpath(sys.base_prefix)
    mounts = ["/usr:/usr:ro", f"{venv}:{venv}:ro", f"{base}:{base}:ro"]
    code = (
        "import os, sys\n"
        "if os.environ['PMI_RANK'] == '1': sys.exit(3)\n"
        "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()\n"
    )
    before = set(containers("mnp.job"))
    start = time.monotonic()
    r = mnp(
        "run", "--nodes", "2", "--mpi", "pmi", "--image", MAIN,
        *[a for m in mounts for a in ("--mount", m)], "--cwd", str(tmp_path),
        "--", os.path.join(venv, "bin", "python"), "-c", code, timeout=60,
    )  # fmt: skip
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "MPI rank 1 (task " in r.stderr and "exited with code 3 before MPI_Init" in r.stderr
    assert time.monotonic() - start < 30  # not the 60 s init bound
    # rank 0's container, its client killed while it was still being created, is
    # removed all the same
    wait_until("no container left", lambda: set(containers("mnp.job")) <= before, 15)
