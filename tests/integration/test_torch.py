"""torch DistributedDataParallel as an mnp multi-node job (nodegroups/torch-ddp.toml).

4 nodes x 2 tasks = 8 ranks, each started by mnp with RANK/LOCAL_RANK/WORLD_SIZE
and MASTER_ADDR/MASTER_PORT; gloo on CPU. Every rank prints the checksum of its
final weights and rank 0 checks they agree; the test checks it again.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.helpers import mnp
from tests.integration.sshd import SshdCluster

if os.environ.get("CI"):
    import torch  # noqa: F401 - CI must run these: a missing torch is a failure there
else:
    pytest.importorskip("torch", reason="pip install torch (CPU wheel) to run the DDP tests")

CHECKSUM = re.compile(
    r"^(\d)\.(\d): rank (\d) of 8 \(node (\d), local rank (\d), cpu\): "
    r"loss [\d.]+ checksum (\S+)$",
    re.M,
)


def _check(stdout: str) -> None:
    rows = CHECKSUM.findall(stdout)
    assert sorted(int(r[2]) for r in rows) == list(range(8)), stdout
    for node, task, rank, node_env, local, _sum in rows:
        assert (node_env, local) == (node, task)
        assert int(rank) == 2 * int(node) + int(task)  # tasks fill nodes in order
    assert len({r[5] for r in rows}) == 1, stdout
    assert re.search(r"^0\.0: ddp ok: 8 ranks, 5 steps, identical weights", stdout, re.M)


def test_ddp_on_four_local_nodes() -> None:
    r = mnp("run", "nodegroups/torch-ddp.toml", timeout=110)
    assert r.returncode == 0, r.stderr
    _check(r.stdout)


@pytest.mark.ssh
def test_ddp_on_four_sshd_hosts(sshd_hosts: SshdCluster) -> None:
    r = mnp(
        "run",
        "--inventory",
        str(sshd_hosts.inventory_toml),
        "nodegroups/torch-ddp.toml",
        timeout=110,
    )
    assert r.returncode == 0, r.stderr
    _check(r.stdout)
