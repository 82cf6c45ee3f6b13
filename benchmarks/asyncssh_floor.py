"""The least a Python launcher on asyncssh can do for a cold start, as a reference for
``mnp run``'s cold launch (benchmarks/run.py, phase ``cold``):

    python benchmarks/asyncssh_floor.py INVENTORY.toml

``import asyncssh``, connect to every host of the inventory at once (its ``[ssh]``
user, port, identity, known_hosts), start ``<python> -m mnp.agent`` there, wait for
every agent's ``ready`` line, close its stdin and wait for it to exit. No controller, no
store, no job: what is left of a cold ``mnp run`` when everything mnp adds is taken away.
It reads the inventory with ``tomllib`` only (hosts with ``names`` and ``address``, as
tests/integration/sshd.py writes them), so it imports nothing of mnp.
"""

from __future__ import annotations

import asyncio
import sys
import tomllib
from typing import Any

import asyncssh


async def _agent(address: str, ssh: dict[str, Any]) -> None:
    conn = await asyncssh.connect(
        address,
        port=ssh.get("port", 22),
        username=ssh.get("user"),
        client_keys=[ssh["identity"]],
        known_hosts=ssh["known_hosts"],
    )
    try:
        proc = await conn.create_process(
            f"{ssh['python']} -m mnp.agent --parent-death --ctl floor", encoding=None
        )
        line = await proc.stdout.readline()
        if b'"ready"' not in line:
            raise SystemExit(f"{address}: no ready line: {line!r}")
        proc.stdin.write_eof()
        await proc.wait_closed()
    finally:
        conn.close()
        await conn.wait_closed()


async def main(inv: dict[str, Any]) -> None:
    await asyncio.gather(*(_agent(h["address"], inv["ssh"]) for h in inv["hosts"]))


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        asyncio.run(main(tomllib.load(f)))
