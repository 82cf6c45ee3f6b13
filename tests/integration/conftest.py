"""Fixtures for the integration tests: real OpenSSH servers on loopback (see sshd.py), and a
node agent driven over its stdio.

Without ``/usr/sbin/sshd`` the ``ssh`` tests are skipped, except in CI (``CI``
set), where that is a failure: a test CI never runs rots.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.slurm import SlurmCluster, SlurmUnavailable
from tests.integration.sshd import SshdCluster, SshdUnavailable
from tests.integration.test_agent_driver import Agent

SshdFactory = Callable[[int], SshdCluster]
SSH_TRANSPORTS = [
    t for t in ("asyncssh", "openssh") if os.environ.get("MNP_TEST_SSH_TRANSPORT", t) == t
]


@pytest.fixture(scope="session")
def sshd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdFactory]:
    """``factory(n)``: a cluster of ``n`` servers (one per ``n``, kept for the session).

    Each cluster has its own /24 on loopback: the 4-server default is
    127.0.0.2-5, the one of n servers (any other n) 127.0.n.2 and up.
    """
    clusters: dict[int, SshdCluster] = {}

    def factory(n: int) -> SshdCluster:
        if n not in clusters:
            root: Path = tmp_path_factory.mktemp(f"sshd{n}")
            try:
                clusters[n] = SshdCluster.start(root, n, net=0 if n == 4 else n)
            except SshdUnavailable as e:
                if os.environ.get("CI"):
                    pytest.fail(f"CI must run the ssh tests: {e}")
                pytest.skip(str(e))
        return clusters[n]

    try:
        yield factory
    finally:
        for c in clusters.values():
            c.close()


# The SSH test files proper run on both clients; elsewhere (containers, MPI, faults, torch
# on sshd hosts) the hosts are only a place to run jobs, and the default client is enough.
BOTH_CLIENTS = {
    "test_ssh_transport.py",
    "test_ssh_jobs.py",
    "test_hostcheck.py",
    "test_security.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if len(SSH_TRANSPORTS) < 2:
        return  # one client asked for by MNP_TEST_SSH_TRANSPORT: run everything on it
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        other = callspec is not None and callspec.params.get("sshd_hosts") == "openssh"
        (drop if other and item.path.name not in BOTH_CLIENTS else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session", params=SSH_TRANSPORTS)
def sshd_hosts(sshd_factory: SshdFactory, request: pytest.FixtureRequest) -> SshdCluster:
    """Four OpenSSH servers, sshd-1..sshd-4 on 127.0.0.2-5 (see sshd.py), their inventories
    using each SSH transport in turn (``[ssh] transport``): the SSH test files run on both
    (``BOTH_CLIENTS``), the others on the default asyncssh.
    ``MNP_TEST_SSH_TRANSPORT=openssh`` (or ``asyncssh``) runs only that one."""
    return sshd_factory(4).with_transport(request.param)


@pytest.fixture(scope="session")
def sshd_hosts_default(sshd_factory: SshdFactory) -> SshdCluster:
    """The four servers of ``sshd_hosts`` with one client (the default, or the one
    ``MNP_TEST_SSH_TRANSPORT`` names), for fixtures that ask for hosts at run time
    (``request.getfixturevalue``), where a parametrized fixture cannot be had."""
    return sshd_factory(4).with_transport(SSH_TRANSPORTS[0])


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real 4-node Slurm 22.05 (n1..n4, 2 CPUs each) on this machine (see slurm.py).

    Never skipped: tests/run installs slurm-wlm and munge."""
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.fail(f"the Slurm tests need slurm-wlm and munge: {e}")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def agent() -> Iterator[Agent]:
    """A node agent on this machine, driven over its stdio (a 1 s kill grace)."""
    a = Agent("--grace", "1")
    yield a
    a.close()
