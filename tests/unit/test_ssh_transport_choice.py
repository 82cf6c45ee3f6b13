"""``[ssh] transport``: which module carries each host, and what the CLI then imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mnp.model import HostSpec, SshOptions
from mnp.spec import load_inventory
from mnp.transport import module_name, transports_for

INVENTORY = """\
[ssh]
transport = "OpenSSH"

[[hosts]]
names = "a[1-2]"

[[hosts]]
names = "b1"
ssh = { transport = "asyncssh" }

[[hosts]]
names = "c1"
transport = "local"
"""


def test_each_host_gets_the_client_its_table_names(tmp_path: Path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(INVENTORY)
    inv = load_inventory(path)
    assert [(h.name, h.transport, h.ssh.transport) for h in inv.hosts] == [
        ("a1", "ssh", "openssh"),
        ("a2", "ssh", "openssh"),
        ("b1", "ssh", "asyncssh"),
        ("c1", "local", "openssh"),
    ]
    assert [module_name(h) for h in inv.hosts] == ["openssh", "openssh", "ssh", "local"]
    assert SshOptions().transport == "asyncssh"
    assert module_name(HostSpec("x", "x")) == "ssh"


def test_a_mixed_inventory_routes_each_host(tmp_path: Path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(INVENTORY)
    transports = transports_for(load_inventory(path))
    assert sorted(transports) == ["local", "ssh"]
    routed = transports["ssh"]
    parts = getattr(routed, "parts", {})
    assert sorted(type(t).__name__ for t in parts.values()) == ["OpenSshTransport", "SshTransport"]


def test_openssh_inventories_never_import_asyncssh(tmp_path: Path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text('[ssh]\ntransport = "openssh"\n\n[[hosts]]\nnames = "n[1-4]"\n')
    probe = (
        "import sys\n"
        "from mnp.spec import load_inventory\n"
        "from mnp.transport import transports_for\n"
        f"t = transports_for(load_inventory({str(path)!r}))\n"
        "import mnp.cli\n"
        "print(type(t['ssh']).__name__, 'asyncssh' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["OpenSshTransport", "False"]


def test_agent_cache_is_a_folder_or_none(tmp_path: Path) -> None:
    path = tmp_path / "inv.toml"
    path.write_text(
        '[ssh]\nagent_cache = "/scratch/mnp-cache"\n[[hosts]]\nnames = "a"\n'
        '[[hosts]]\nnames = "b"\nssh = { agent_cache = "NONE" }\n'
    )
    a, b = load_inventory(path).hosts
    assert (a.ssh.agent_cache, b.ssh.agent_cache, SshOptions().agent_cache) == (
        "/scratch/mnp-cache", "none", "",
    )  # fmt: skip


def test_asyncssh_offers_aes_gcm_first_unless_a_config_sets_ciphers(tmp_path: Path) -> None:
    from asyncssh.encryption import get_default_encryption_algs

    from mnp.transport.ssh import FAST_CIPHERS, cipher_preference

    plain = tmp_path / "plain"
    plain.write_text("Host *\n  ServerAliveInterval 10\n  # Ciphers in a comment\n")
    offered = cipher_preference([str(plain)])
    assert offered is not None and tuple(offered[:2]) == FAST_CIPHERS
    # nothing asyncssh offers by default is dropped, nothing is offered twice
    assert sorted(offered) == sorted(a.decode() for a in get_default_encryption_algs())
    assert cipher_preference([]) == offered
    for line in ("Ciphers aes256-ctr", "  ciphers=aes256-ctr", "CIPHERS +aes128-ctr"):
        config = tmp_path / "with-ciphers"
        config.write_text(f"Host a1\n{line}\n")
        assert cipher_preference([str(plain), str(config)]) is None, line
