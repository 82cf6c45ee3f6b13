"""Byte streams to node agents, one module a transport, registered by name.

``mnp.transport.<name>`` defines ``make(inventory) -> Transport``; an inventory host's
``transport`` names the module (``local``: a subprocess, ``ssh``: SSH, ``srun``: a Slurm job
step inside the allocation mnp runs in; ``fake``: agents answered from memory, for tests and
benchmarks, not offered in inventory files). An SSH host's ``[ssh] transport`` picks the client:
``asyncssh`` (module ``ssh``) or ``openssh`` (module ``openssh``: one ``ssh`` process per host).
Nothing above this package knows which transports exist, and a transport's module (asyncssh for
``ssh``) is imported only when an inventory uses it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mnp.transport.base import AgentConnection, AgentStream, Transport

if TYPE_CHECKING:
    from mnp.model import HostSpec, Inventory

NAMES = ("local", "ssh", "srun")
SSH_MODULES = {"asyncssh": "ssh", "openssh": "openssh"}


def module_name(host: HostSpec) -> str:
    """The module that carries this host's agent stream."""
    if host.transport == "ssh":
        return SSH_MODULES.get(host.ssh.transport, "ssh")
    return host.transport


def transports_for(inventory: Inventory) -> dict[str, Transport]:
    """One transport per name the inventory's hosts use (an SSH one routes each host to its
    client when the inventory mixes both)."""
    made: dict[str, Transport] = {}
    by_name: dict[str, set[str]] = {}
    for h in inventory.hosts:
        by_name.setdefault(h.transport, set()).add(module_name(h))
    for module in sorted(set().union(*by_name.values())):
        made[module] = importlib.import_module(f"mnp.transport.{module}").make(inventory)
    out: dict[str, Transport] = {}
    for name, modules in by_name.items():
        if len(modules) == 1:
            out[name] = made[next(iter(modules))]
        else:
            out[name] = _Routed(name, {m: made[m] for m in modules})
    return out


class _Routed(Transport):
    """Hosts of one transport name carried by different modules (asyncssh and OpenSSH)."""

    def __init__(self, name: str, parts: dict[str, Transport]) -> None:
        self.name = name
        self.parts = parts

    async def open(self, host: HostSpec, agent_args: list[str]) -> AgentStream:
        return await self.parts[module_name(host)].open(host, agent_args)

    async def close(self) -> None:
        for part in self.parts.values():
            await part.close()


__all__ = ["NAMES", "AgentConnection", "AgentStream", "Transport", "transports_for"]
