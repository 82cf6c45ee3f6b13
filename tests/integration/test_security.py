"""Security checks through the CLI against real sshd hosts (issue: reliability and
security). Recorded in the fault ledger (tests/ledger.py)."""

from __future__ import annotations

import json
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import mnp
from tests.integration.fixtures_jobs import inventory_with_known_hosts
from tests.integration.sshd import SshdCluster

pytestmark = [pytest.mark.faults, pytest.mark.ssh]

EVIL = "$(touch {m}); `touch {m}` * ; | && 'q' \"dq\" \\ ${{HOME}} $HOME ~ > {m} < /dev/null #"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {"MNP_HOME": str(tmp_path / "home")}
    yield env
    mnp("controller", "stop", env=env)


def _warned(stderr: str, inventory: Path) -> int:
    return sum(
        1
        for line in stderr.splitlines()
        if line.startswith(f'mnp: warning: {inventory}: known_hosts = "none"')
        and "NOT verified" in line
    )


@pytest.mark.security('known_hosts = "none" warns on every use')
def test_known_hosts_none_warns_on_every_use(
    sshd_hosts: SshdCluster, tmp_path: Path, home: dict[str, str]
) -> None:
    inv = inventory_with_known_hosts(sshd_hosts, tmp_path / "inv.toml", Path("none"))
    for _ in range(2):  # in-process mnp run, twice: a warning each time
        r = mnp("run", "--inventory", str(inv), "--", "true", env=home)
        assert r.returncode == 0, r.stderr
        assert _warned(r.stderr, inv) == 1, r.stderr
    r = mnp("hosts", "--inventory", str(inv), "--check", env=home)
    assert r.returncode == 0, r.stderr
    assert _warned(r.stderr, inv) == 1, r.stderr
    r = mnp("controller", "start", "--inventory", str(inv), env=home)
    assert r.returncode == 0, r.stderr
    assert _warned(r.stderr, inv) == 1, r.stderr
    for _ in range(2):  # through the running controller: submit and run
        r = mnp("submit", "--inventory", str(inv), "--", "true", env=home)
        assert r.returncode == 0, r.stderr
        assert _warned(r.stderr, inv) == 1, r.stderr
        r = mnp("run", "--inventory", str(inv), "--", "true", env=home)
        assert r.returncode == 0, r.stderr
        assert _warned(r.stderr, inv) == 1, r.stderr
    # a verified inventory says nothing of the kind
    r = mnp("run", "--inventory", str(sshd_hosts.inventory_toml), "--", "true")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


@pytest.mark.security("metacharacters reach the task literally")
def test_metacharacters_in_parameters_environment_and_names_arrive_literally(
    sshd_hosts: SshdCluster, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = EVIL.format(m=marker)
    inv = str(sshd_hosts.inventory_toml)
    # a parameter substituted into the command (Ref::x), an environment value, the
    # command itself, over SSH, as one node and as a multi-node job
    job = tmp_path / "job.toml"
    # (through sh's "$@", which passes them on untouched; the sleep keeps node 0, whose
    # exit ends a multi-node job, alive until node 1 has printed)
    job.write_text(
        'name = "meta-chars_1"\n'
        'command = ["sh", "-c", "printf \'%s|%s|%s|%s\\\\n\' \\"$@\\"; sleep 0.5", "sh", '
        '"Ref::x", "$EVIL", "' + "{c}" + '", "$MNP_JOB_NAME"]\n[parameters]\nx = "plain"\n'
    )
    # the command's own third argument: the evil text, TOML-escaped, less the $VAR
    # forms (a command's $VAR is expanded from the task's environment, once, by design)
    literal = evil.replace("${HOME} $HOME ", "")
    job.write_text(job.read_text().replace("{c}", json.dumps(literal)[1:-1]))
    for nodes in ([], ["--nodes", "2"]):
        r = mnp(
            "run", "--inventory", inv, *nodes, "--param", f"x={evil}",
            "--env", f"EVIL={evil}", str(job),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        want = f"{evil}|{evil}|{literal}|meta-chars_1"
        lines = [x.split(": ", 1)[-1] if nodes else x for x in r.stdout.splitlines()]
        assert lines == [want] * (2 if nodes else 1), r.stdout
    assert not marker.exists()
    # a job name is an identifier: metacharacters are refused, in one line, exit 2
    r = mnp("run", "--inventory", inv, "--name", f"x$(touch {marker})", "--", "true")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("mnp: ") and "--name" in r.stderr, r.stderr
    assert not marker.exists()
    assert Path("~").expanduser().is_dir()


@pytest.mark.security("MNP_HOME is 0700 and the control socket 0600")
def test_state_directory_and_socket_are_private(home: dict[str, str]) -> None:
    r = mnp("submit", "--", "true", env=home)
    assert r.returncode == 0, r.stderr
    state = Path(home["MNP_HOME"])
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    socks = [p for p in state.rglob("*") if p.is_socket()]
    assert socks and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in socks)
    # another user reads nothing in it: not the store, the events, or the logs
    files = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.name == "events.jsonl" for p in files)
    for p in files:
        r2 = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(p)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r2.returncode != 0 and "Permission denied" in r2.stderr, (p, r2)


@pytest.mark.security("secrets appear in no error, reason or log")
def test_secrets_stay_out_of_errors(home: dict[str, str], tmp_path: Path) -> None:
    """A secret in a job that fails, and in a definition refused for another reason,
    appears in no error message, reason or log."""
    secret = "s3cr3t-" + uuid.uuid4().hex
    (tmp_path / "token").write_text(secret)
    job = tmp_path / "job.toml"
    job.write_text(
        'name = "fails"\ncommand = ["sh", "-c", "test -n \\"$TOKEN\\"; exit 3"]\n'
        f'[secrets]\nTOKEN = {{ file = "{tmp_path / "token"}" }}\n'
    )
    bad = tmp_path / "bad.toml"
    bad.write_text(job.read_text().replace('name = "fails"', 'name = "fails"\nattempts = 0'))
    r = mnp("submit", "--wait", str(job), env=home)
    assert r.returncode == 3, r.stderr
    seen = r.stdout + r.stderr
    r = mnp("validate", str(bad), env=home)
    assert r.returncode == 2
    seen += r.stdout + r.stderr
    seen += mnp("describe", "1", "--json", env=home).stdout
    seen += mnp("events", env=home).stdout + mnp("list", env=home).stdout
    for path in Path(home["MNP_HOME"]).rglob("*"):
        if path.is_file():
            seen += path.read_bytes().decode("utf-8", "replace")
    assert secret not in seen
