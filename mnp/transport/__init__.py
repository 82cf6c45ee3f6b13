"""Byte streams to node agents, one module a transport, registered by name.

``mnp.transport.<name>`` defines ``make(inventory) -> Transport``; an inventory host's
``transport`` names the module (``local``: a subprocess, ``ssh``: asyncssh, ``srun``: a
Slurm job step inside the allocation mnp runs in; ``fake``:
agents answered from memory, for tests and benchmarks, not offered in inventory files). Nothing
above this package knows which transports exist, and a transport's module (asyncssh for
``ssh``) is imported only when an inventory uses it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mnp.transport.base import AgentConnection, AgentStream, Transport

if TYPE_CHECKING:
    from mnp.model import Inventory

NAMES = ("local", "ssh", "srun")


def transports_for(inventory: Inventory) -> dict[str, Transport]:
    """One transport per name the inventory's hosts use."""
    out: dict[str, Transport] = {}
    for name in sorted({h.transport for h in inventory.hosts}):
        module = importlib.import_module(f"mnp.transport.{name}")
        out[name] = module.make(inventory)
    return out


__all__ = ["NAMES", "AgentConnection", "AgentStream", "Transport", "transports_for"]
