"""Fixtures and helpers for running whole jobs through ``mnp run`` on the test sshds.

Import the fixtures into a test module (pytest finds them there)::

    from tests.integration.fixtures_jobs import hydra_ssh_fixture  # noqa: F401

``hydra_ssh`` makes MPICH's Hydra reach the loopback sshds the way it reaches
real nodes: Hydra runs ``ssh ADDRESS hydra_pmi_proxy ...`` for every host of the
hostfile, and ``HYDRA_LAUNCHER_EXEC`` (MPICH's environment variable for
``-launcher-exec``) points it at a wrapper that adds the fixture's ssh options.
The job definitions stay as users write them; only ``--env`` differs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, procs_with_env
from tests.integration.sshd import SshdCluster


@dataclass(frozen=True)
class HydraSsh:
    """Hydra's ssh launcher for the test sshds."""

    wrapper: Path  # ssh with the fixture's config; logs each call to $TEST_HYDRA_LOG
    config: Path

    def env(self, log: Path | None = None) -> list[str]:
        """``mnp run`` arguments that hand the launcher to the job's main node."""
        args = ["--env", f"HYDRA_LAUNCHER_EXEC={self.wrapper}"]
        if log is not None:
            args += ["--env", f"TEST_HYDRA_LOG={log}"]
        return args


def write_hydra_ssh(cluster: SshdCluster) -> HydraSsh:
    """An ssh_config for the servers' *addresses* (what hostfiles hold) and the wrapper."""
    config = cluster.root / "hydra_ssh_config"
    blocks = [f"# Hydra reaches nodes by address; written by {__name__}\n"]
    for h in cluster.hosts:
        blocks.append(
            f"Host {h.address}\n"
            f"    Port {h.port}\n"
            "    User root\n"
            f"    IdentityFile {cluster.identity}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {cluster.known_hosts}\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n\n"
        )
    blocks.append(f"Include {cluster.ssh_config}\n")  # the sshd-N names too
    config.write_text("".join(blocks))
    wrapper = cluster.root / "hydra-ssh"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# Hydra's launcher for the test sshds: ssh with the fixture's keys and known_hosts\n"
        'if [ -n "${TEST_HYDRA_LOG:-}" ]; then printf \'%s\\n\' "$*" >> "$TEST_HYDRA_LOG"; fi\n'
        f'exec ssh -F {config} -o BatchMode=yes "$@"\n'
    )
    wrapper.chmod(0o755)
    return HydraSsh(wrapper, config)


@pytest.fixture(name="hydra_ssh", scope="session")
def hydra_ssh_fixture(sshd_hosts: SshdCluster) -> HydraSsh:
    """``HydraSsh`` for the four sshds of ``sshd_hosts``."""
    return write_hydra_ssh(sshd_hosts)


def inventory_with_known_hosts(cluster: SshdCluster, path: Path, known_hosts: Path) -> Path:
    """The fixture's inventory, verified against another known_hosts file."""
    text = cluster.toml().replace(
        f'known_hosts = "{cluster.known_hosts}"', f'known_hosts = "{known_hosts}"'
    )
    assert str(known_hosts) in text
    path.write_text(text)
    return path


def cores() -> int:
    return len(os.sched_getaffinity(0))


class Background:
    """``mnp run ARGS`` in the background, with the job's processes found by a mark."""

    def __init__(self, args: Sequence[str], mark: str) -> None:
        self.mark = mark
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mnp", "run", "--env", f"TEST_MARK={mark}", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def procs(self, keep: Callable[[psutil.Process], bool] | None = None) -> list[psutil.Process]:
        out = []
        for p in procs_with_env("TEST_MARK", self.mark):
            try:
                if keep is None or keep(p):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def wait_for(
        self,
        count: int,
        keep: Callable[[psutil.Process], bool] | None = None,
        timeout: float = 30,
    ) -> list[psutil.Process]:
        """Until at least ``count`` marked processes (that ``keep`` accepts) run."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.procs(keep)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                done = self.proc.poll() is not None
                out, err = self.proc.communicate(timeout=30) if done else ("", "")
                pytest.fail(
                    f"{len(found)} of {count} job processes after {timeout}s "
                    f"(mnp run exit {self.proc.poll()}): {out[-2000:]} {err[-2000:]}"
                )
            time.sleep(0.05)

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill_leftovers(self) -> None:
        """Clean up after a test that failed or orphaned processes on purpose."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)
        for p in procs_with_env("TEST_MARK", self.mark):
            try:
                p.kill()
            except psutil.Error:
                continue


def env_of(p: psutil.Process, key: str) -> str | None:
    try:
        return p.environ().get(key)
    except psutil.Error:
        return None


def under_sshd(cluster: SshdCluster, name: str, p: psutil.Process) -> bool:
    """Whether ``p`` descends from the sshd serving ``name`` (it was started over ssh there)."""
    h = cluster.host(name)
    if h.proc is None:
        return False
    try:
        return any(a.pid == h.proc.pid for a in p.parents())
    except psutil.Error:
        return False
