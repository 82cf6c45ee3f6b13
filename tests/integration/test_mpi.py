"""Multi-node parallel programs from nodegroups/: MPI across nodes, and a heterogeneous job.

On the embedded local inventory every node is this machine and Hydra forks
its proxies. On the four sshds, Hydra (on the main node) reaches the other
nodes by address through ``ssh`` — the ``hydra_ssh`` wrapper adds the
fixture's keys — and the tests check that each rank really descends from the
sshd of the node it reports (``under_sshd``), not from a local fork.
"""

from __future__ import annotations

import re
import signal
import uuid
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.helpers import mnp, wait_no_procs
from tests.integration.fixtures_jobs import (  # noqa: F401 - a fixture: hydra_ssh
    Background,
    HydraSsh,
    env_of,
    hydra_ssh_fixture,
    under_sshd,
)
from tests.integration.sshd import SshdCluster

pytestmark = pytest.mark.mpi

RANK_LINE = re.compile(r"^0: (?:hello from )?rank (\d+) of (\d+) on node (\d+) \(([^)]*)\)", re.M)


def ranks_by_node(stdout: str) -> dict[int, int]:
    """rank -> node, from the lines every rank prints."""
    found = {int(r): int(n) for r, _size, n, _addr in RANK_LINE.findall(stdout)}
    return found


# --- local default -------------------------------------------------------------


def test_mpi_allreduce_on_local_nodes() -> None:
    r = mnp("run", "nodegroups/mpi-allreduce.toml", timeout=60)
    assert r.returncode == 0, r.stderr
    assert ranks_by_node(r.stdout) == {0: 0, 1: 1, 2: 2, 3: 3}
    ok = re.search(
        r"allreduce ok: 4 ranks on 4 distinct nodes, 100000 doubles, ([\d.]+) ms", r.stdout
    )
    assert ok and float(ok.group(1)) > 0, r.stdout


def test_mpi_pingpong_on_local_nodes() -> None:
    r = mnp("run", "nodegroups/mpi-pingpong.toml", "--param", "max_bytes=65536", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pingpong rank 0 (node 0) <-> rank 1 (node 1), 4 ranks on 4 distinct nodes" in r.stdout
    table = re.findall(r"^0: +(\d+) +(\d+) +([\d.]+) +([\d.]+)$", r.stdout, re.M)
    assert [int(row[0]) for row in table] == [0, 1, 4, 16, 64, 256, 1024, 4096, 16384, 65536]
    assert all(float(row[2]) > 0 for row in table)
    assert r.stdout.rstrip().endswith("0: pingpong ok")


def test_heterogeneous_job_on_local_nodes() -> None:
    r = mnp("run", "nodegroups/hetero.toml", "--param", "rounds=4", timeout=60)
    assert r.returncode == 0, r.stderr
    _check_hetero(r.stdout, 4)


def _check_hetero(stdout: str, rounds: int) -> None:
    # workers are ranks 1-4 (nodes 1 and 2, two tasks each): total = 10 * (1 + ... + rounds)
    total = 10 * rounds * (rounds + 1) // 2
    lines = stdout.splitlines()
    assert "0.0: coordinator: 4 workers (ranks [1, 2, 3, 4]) on nodes " in "\n".join(lines)
    assert f"0.0: coordinator: total {total} after {rounds} rounds; 1 evaluator(s) agree" in lines
    assert f"3.0: evaluator: expected {total}, coordinator has {total}: ok" in lines
    workers = sorted(x for x in lines if ": worker rank " in x)
    assert workers == [
        f"{n}.{t}: worker rank {r} on node {n}: answered {rounds} rounds"
        for n, t, r in [(1, 0, 1), (1, 1, 2), (2, 0, 3), (2, 1, 4)]
    ]


# --- over ssh ------------------------------------------------------------------


@pytest.mark.ssh
@pytest.mark.parametrize(
    ("nodegroup", "done"),
    [
        ("mpi-hello", "allreduce ok: sum of ranks = 6; 4 distinct nodes"),
        ("mpi-allreduce", "allreduce ok: 4 ranks on 4 distinct nodes"),
        ("mpi-pingpong", "pingpong ok"),
    ],
)
def test_mpi_across_four_sshd_hosts(
    sshd_hosts: SshdCluster, hydra_ssh: HydraSsh, tmp_path: Path, nodegroup: str, done: str
) -> None:
    log = tmp_path / "hydra-ssh.log"
    r = mnp(
        "run",
        "--inventory",
        str(sshd_hosts.inventory_toml),
        *hydra_ssh.env(log),
        f"nodegroups/{nodegroup}.toml",
        timeout=90,
    )
    assert r.returncode == 0, r.stderr
    assert done in r.stdout
    nodes = ranks_by_node(r.stdout)
    assert nodes == {0: 0, 1: 1, 2: 2, 3: 3}, r.stdout
    addrs = {a for _r, _s, _n, a in RANK_LINE.findall(r.stdout)}
    assert addrs == {h.address for h in sshd_hosts.hosts}
    # Hydra started one proxy per node through ssh, by address
    proxied = Counter(
        line.split()[1] for line in log.read_text().splitlines() if "hydra_pmi_proxy" in line
    )
    assert proxied == {h.address: 1 for h in sshd_hosts.hosts}, log.read_text()


@pytest.mark.ssh
def test_heterogeneous_job_across_sshd_hosts(sshd_hosts: SshdCluster) -> None:
    r = mnp("run", "--inventory", str(sshd_hosts.inventory_toml), "nodegroups/hetero.toml")
    assert r.returncode == 0, r.stderr
    _check_hetero(r.stdout, 3)


SLEEPING_RANKS = """\
name = "mpi-sleep"
type = "multinode"
[multinode]
num_nodes = 4
[[multinode.groups]]
target_nodes = "0"
command = ["mpiexec", "-f", "$MNP_HOSTFILE", "-n", "$MNP_NUM_NODES",
           "python3", "-c", "import time; from mpi4py import MPI; time.sleep(1000)"]
[[multinode.groups]]
target_nodes = "1:"
"""


def _is_rank(p: psutil.Process) -> bool:
    parent = p.parent()
    return parent is not None and parent.name() == "hydra_pmi_proxy" and "python" in p.name()


@pytest.mark.ssh
def test_killing_mpiexec_on_the_main_node_leaves_no_rank_on_any_host(
    sshd_hosts: SshdCluster, hydra_ssh: HydraSsh, tmp_path: Path
) -> None:
    definition = tmp_path / "mpi-sleep.toml"
    definition.write_text(SLEEPING_RANKS)
    job = Background(
        ["--inventory", str(sshd_hosts.inventory_toml), *hydra_ssh.env(), str(definition)],
        uuid.uuid4().hex,
    )
    try:
        ranks = job.wait_for(4, keep=_is_rank)
        # each rank runs under a Hydra proxy that the sshd of a different host started,
        # and carries the main node's job tags, forwarded by Hydra
        homes = set()
        for rank in ranks:
            homes |= {n for n in sshd_hosts.names if under_sshd(sshd_hosts, n, rank)}
            assert re.fullmatch(r"\d+#0", env_of(rank, "MNP_JOB_ID") or "")
            assert env_of(rank, "MNP_CONTROLLER_ID")
        assert homes == set(sshd_hosts.names)
        (mpiexec,) = job.procs(keep=lambda p: p.name().startswith("mpiexec"))
        mpiexec.send_signal(signal.SIGKILL)
        assert wait_no_procs("TEST_MARK", job.mark, 2) == []
        code, _out, err = job.finish(30)
        assert code == 128 + signal.SIGKILL, err
    finally:
        job.kill_leftovers()
