"""Direct MPI launch through ``mnp run`` (issue 16): the agents start every rank and
serve it PMI; no mpiexec, no SSH between nodes. Real MPICH (the ``mpich`` wheel).

On the local default every node is this machine; on the four sshds each node's
ranks run on the host of that node (its agent, started through that sshd)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mnp.agent.pmi import shm_leftovers
from tests.helpers import mnp
from tests.integration.sshd import SshdCluster

pytestmark = pytest.mark.mpi

HELLO = re.compile(r"^(\d+)\.(\d+): Hello, World! I am process +(\d+) of +(\d+) on ", re.M)
KVS = re.compile(r"^\S+: kvs (\S+)$", re.M)

ABORT_RANK_2 = """\
import os, time
from mpi4py import MPI
w = MPI.COMM_WORLD
print("kvs", os.environ["MNP_MPI_KVSNAME"], flush=True)
if w.Get_rank() == 2:
    w.Abort(7)
time.sleep(60)
"""


def hello_ranks(stdout: str) -> dict[int, tuple[int, int]]:
    """rank -> (node, task) from the helloworld lines, each checked for the world size."""
    out = {}
    for node, task, rank, size in HELLO.findall(stdout):
        assert int(size) == 8, stdout
        out[int(rank)] = (int(node), int(task))
    return out


def no_leftovers(stdout: str, nodes: int) -> None:
    """The segments MPICH's killed ranks leave in /dev/shm were removed at teardown."""
    names = set(KVS.findall(stdout))
    assert len(names) == 1, stdout  # one kvsname per launch, the same on every rank
    kvsname = names.pop()
    left = [p for i in range(nodes) for p in shm_leftovers(kvsname, i) if os.path.exists(p)]
    assert left == []


# --- local default -------------------------------------------------------------


def test_helloworld_8_ranks_on_4_local_nodes() -> None:
    r = mnp(
        "run", "--nodes", "4", "--tasks-per-node", "2", "--mpi", "pmi", "--",
        "python3", "-m", "mpi4py.bench", "helloworld",
        timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # ranks in node order, contiguous on each node; each rank's output prefixed NODE.TASK
    assert hello_ranks(r.stdout) == {rank: (rank // 2, rank % 2) for rank in range(8)}


def test_ringtest_and_pingpong_on_local_nodes() -> None:
    r = mnp(
        "run", "--nodes", "2", "--tasks-per-node", "2", "--mpi", "pmi", "--",
        "python3", "-m", "mpi4py.bench", "ringtest", "-n", "64", "-l", "5",
        timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert re.search(
        r"^0\.0: time for 5 loops = \S+ seconds \(4 processes, 64 bytes\)$", r.stdout, re.M
    ), r.stdout
    r = mnp(
        "run", "--nodes", "2", "--mpi", "pmi", "--",
        "python3", "-m", "mpi4py.bench", "pingpong", "-m", "1", "-n", "4096", "-l", "10",
        timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    sizes = [int(m) for m in re.findall(r"^0: +(\d+) +[\d.]+ \| ", r.stdout, re.M)]
    assert sizes == [2**i for i in range(13)], r.stdout  # 1 B .. 4 KiB, rank 0 on node 0


def test_abort_fails_the_job_with_the_ranks_code(tmp_path: Path) -> None:
    script = tmp_path / "abort.py"
    script.write_text(ABORT_RANK_2)
    r = mnp(
        "run", "--nodes", "2", "--tasks-per-node", "2", "--mpi", "pmi", "--",
        "python3", str(script),
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 7, (r.stdout, r.stderr)
    # rank 2 is the first task of node 1; nobody slept out the minute
    assert re.search(
        r"FAILED: MPI rank 2 \(task \S+#1\.0, node 1\) called MPI_Abort with code 7", r.stderr
    ), r.stderr
    no_leftovers(r.stdout, 2)


def test_a_rank_that_exits_before_init_fails_the_job() -> None:
    code = (
        "import os, sys\n"
        "if os.environ['PMI_RANK'] == '1': sys.exit(3)\n"
        "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()\n"
    )
    r = mnp("run", "--nodes", "2", "--mpi", "pmi", "--", "python3", "-c", code, timeout=60)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "MPI rank 1 (task " in r.stderr and "exited with code 3 before MPI_Init" in r.stderr


def test_a_rank_that_dies_after_init_fails_the_job() -> None:
    code = (
        "import os, time\nfrom mpi4py import MPI\n"
        "if MPI.COMM_WORLD.Get_rank() == 1: os._exit(9)\ntime.sleep(60)\n"
    )
    r = mnp("run", "--nodes", "2", "--mpi", "pmi", "--", "python3", "-c", code, timeout=60)
    assert r.returncode == 9, (r.stdout, r.stderr)
    assert "exited with code 9 before MPI_Finalize" in r.stderr


def test_a_rank_that_never_reaches_init_fails_within_the_bound() -> None:
    r = mnp(
        "run", "--nodes", "2", "--mpi", "pmi", "--", "python3", "-c", "import time; time.sleep(60)",
        env={"MNP_PMI_INIT_TIMEOUT": "2"},
        timeout=40,
    )  # fmt: skip
    assert r.returncode != 0
    assert "did not reach MPI_Init (PMI init) within 2s" in r.stderr, r.stderr


def test_mpmd_two_groups_on_local_nodes() -> None:
    r = mnp("run", "nodegroups/pmi-mpmd.toml", timeout=90)
    assert r.returncode == 0, r.stderr
    lines = set(r.stdout.splitlines())
    assert {
        "0.0: leader rank 0 of 4 app 0 on node 0",
        "0.1: leader rank 1 of 4 app 0 on node 0",
        "1.0: worker rank 2 of 4 app 1 on node 1",
        "2.0: worker rank 3 of 4 app 1 on node 2",
        "0.0: mpmd ok: 4 ranks, apps 0=leader, 1=worker, sum of ranks 6",
    } <= lines, r.stdout


def test_nodegroups_hello_and_allreduce_on_local_nodes() -> None:
    r = mnp("run", "nodegroups/pmi-hello.toml", timeout=90)
    assert r.returncode == 0, r.stderr
    said = re.findall(r"^(\d)\.(\d): hello from rank (\d) of 8 on node (\d) ", r.stdout, re.M)
    assert sorted((int(r), int(n), int(t)) for n, t, r, _ in said) == [
        (rank, rank // 2, rank % 2) for rank in range(8)
    ], r.stdout
    assert "0.0: allreduce ok: sum of ranks = 28; 4 distinct nodes" in r.stdout
    r = mnp("run", "nodegroups/pmi-allreduce.toml", timeout=90)
    assert r.returncode == 0, r.stderr
    assert re.search(
        r"^0: allreduce ok: 4 ranks on 4 distinct nodes, 100000 doubles", r.stdout, re.M
    )


def test_pmix_and_unknown_values_are_refused() -> None:
    r = mnp("run", "--nodes", "2", "--mpi", "pmix", "--", "true")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "PMIx (Open MPI) is not supported" in r.stderr
    r = mnp("run", "--nodes", "2", "--mpi", "ompi", "--", "true")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--mpi" in r.stderr, r.stderr


# --- over ssh ------------------------------------------------------------------


@pytest.mark.ssh
def test_helloworld_across_four_sshd_hosts(sshd_hosts: SshdCluster) -> None:
    r = mnp(
        "run", "--inventory", str(sshd_hosts.inventory_toml),
        "--nodes", "4", "--tasks-per-node", "2", "--mpi", "pmi", "--",
        "python3", "-c",
        "import os; from mpi4py import MPI; w = MPI.COMM_WORLD; "
        "print('rank', w.Get_rank(), 'of', w.Get_size(), 'host', os.environ['MNP_HOST'])",
        timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    found = re.findall(r"^(\d+)\.(\d+): rank (\d+) of 8 host (\S+)$", r.stdout, re.M)
    assert len(found) == 8, r.stdout
    addr_of_node = {}
    for node, task, rank, addr in found:
        assert int(rank) == 2 * int(node) + int(task)
        addr_of_node.setdefault(int(node), set()).add(addr)
    # each node's two ranks on one sshd host, the four nodes on four hosts
    assert sorted(len(a) for a in addr_of_node.values()) == [1, 1, 1, 1]
    assert {a for s in addr_of_node.values() for a in s} == set(sshd_hosts.names)


@pytest.mark.ssh
@pytest.mark.parametrize(
    ("nodegroup", "done"),
    [
        ("pmi-hello", "0.0: allreduce ok: sum of ranks = 28; 4 distinct nodes"),
        ("pmi-allreduce", "0: allreduce ok: 4 ranks on 4 distinct nodes"),
        ("pmi-mpmd", "0.0: mpmd ok: 4 ranks, apps 0=leader, 1=worker, sum of ranks 6"),
    ],
)
def test_nodegroups_across_sshd_hosts(sshd_hosts: SshdCluster, nodegroup: str, done: str) -> None:
    r = mnp(
        "run", "--inventory", str(sshd_hosts.inventory_toml), f"nodegroups/{nodegroup}.toml",
        timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert done in r.stdout, r.stdout


@pytest.mark.ssh
@pytest.mark.parametrize("bench", ["ringtest", "pingpong"])
def test_ringtest_and_pingpong_across_sshd_hosts(sshd_hosts: SshdCluster, bench: str) -> None:
    r = mnp(
        "run", "--inventory", str(sshd_hosts.inventory_toml), "--nodes", "2", "--mpi", "pmi",
        "--", "python3", "-m", "mpi4py.bench", bench, "-n", "256", "-l", "5",
        timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    if bench == "ringtest":
        assert "time for 5 loops" in r.stdout and "(2 processes, 256 bytes)" in r.stdout
    else:
        assert r.stdout.startswith("0: # MPI PingPong Test"), r.stdout


@pytest.mark.ssh
def test_abort_across_sshd_hosts(sshd_hosts: SshdCluster, tmp_path: Path) -> None:
    script = tmp_path / "abort.py"
    script.write_text(ABORT_RANK_2)
    r = mnp(
        "run", "--inventory", str(sshd_hosts.inventory_toml),
        "--nodes", "2", "--tasks-per-node", "2", "--mpi", "pmi", "--", "python3", str(script),
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 7, (r.stdout, r.stderr)
    assert "MPI rank 2 (task " in r.stderr and "called MPI_Abort with code 7" in r.stderr
    no_leftovers(r.stdout, 2)
