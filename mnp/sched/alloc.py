"""What each host has free, and whether a node or task fits there (pure)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mnp.model import Grant, Resources


@dataclass
class HostCapacity:
    """A host's totals and what is free now. Mutated only by ``take``/``give``."""

    name: str
    vcpus: float
    memory: int  # bytes; 0 = not accounted
    gpus: tuple[int, ...] = ()  # GPU indices on the host
    up: bool = True
    free_vcpus: float = -1.0
    free_memory: int = -1
    free_gpus: list[int] = field(default_factory=list)
    exclusive: bool = False  # held whole by one multi-node job
    tasks: int = 0
    cpus: tuple[int, ...] = ()  # the CPU ids tasks may be pinned to (the agent's affinity)
    cpu_use: dict[int, int] = field(default_factory=dict)  # CPU id -> grants pinned to it
    drained: str | None = None  # why it takes no new work (``mnp hosts drain``); None = open
    group: str | None = None  # a managed allocation's id: a gang is placed within one

    def __post_init__(self) -> None:
        if self.free_vcpus < 0:
            self.free_vcpus = self.vcpus
        if self.free_memory < 0:
            self.free_memory = self.memory
        if not self.free_gpus and self.tasks == 0:
            self.free_gpus = list(self.gpus)

    @property
    def idle(self) -> bool:
        return self.tasks == 0 and not self.exclusive

    def could_ever_fit(self, res: Resources, exclusive: bool) -> bool:
        """True when the host, empty, would take this node or task."""
        return (
            res.vcpus <= self.vcpus + 1e-9
            and (res.memory == 0 or self.memory == 0 or res.memory <= self.memory)
            and res.gpus <= len(self.gpus)
        )

    def fits(self, res: Resources, exclusive: bool) -> bool:
        if not self.up or self.exclusive or self.drained is not None:
            return False
        if exclusive:
            return self.tasks == 0 and self.could_ever_fit(res, exclusive)
        return (
            res.vcpus <= self.free_vcpus + 1e-9
            and (res.memory == 0 or self.memory == 0 or res.memory <= self.free_memory)
            and res.gpus <= len(self.free_gpus)
        )

    def take(self, res: Resources, exclusive: bool) -> Grant:
        """Allocate; the caller checked ``fits``."""
        gpus = tuple(self.free_gpus[: res.gpus]) if not exclusive else tuple(self.gpus)
        cpus: tuple[int, ...] = ()
        if res.cpu_bind == "cores" and self.cpus:
            cpus = choose_cores(self.cpus, self.cpu_use, math.ceil(res.vcpus - 1e-9))
            for c in cpus:
                self.cpu_use[c] = self.cpu_use.get(c, 0) + 1
        if exclusive:
            self.exclusive = True
            grant = Grant(self.name, self.free_vcpus, self.free_memory, gpus, True, cpus)
            self.free_vcpus, self.free_memory, self.free_gpus = 0.0, 0, []
        else:
            grant = Grant(self.name, res.vcpus, res.memory if self.memory else 0, gpus, False, cpus)
            self.free_vcpus -= res.vcpus
            self.free_memory -= grant.memory
            del self.free_gpus[: res.gpus]
        self.tasks += 1
        return grant

    def give(self, grant: Grant) -> None:
        self.tasks -= 1
        self.free_vcpus += grant.vcpus
        self.free_memory += grant.memory
        self.free_gpus = sorted(set(self.free_gpus) | set(grant.gpus))
        for c in grant.cpus:
            left = self.cpu_use.get(c, 0) - 1
            if left > 0:
                self.cpu_use[c] = left
            else:
                self.cpu_use.pop(c, None)
        if grant.exclusive:
            self.exclusive = False


def choose_cores(cpus: Sequence[int], use: Mapping[int, int], n: int) -> tuple[int, ...]:
    """The ``n`` CPUs (at least one) of ``cpus`` a task is pinned to: the least used
    ones (``use``: CPU id -> running tasks pinned to it), free ones first, so that two
    running tasks share no core while the host has enough; among equals, in the
    order of ``cpus``. All of ``cpus`` when ``n`` is more than there are."""
    n = max(1, n)
    if n >= len(cpus):
        return tuple(cpus)
    order = sorted(range(len(cpus)), key=lambda i: (use.get(cpus[i], 0), i))
    return tuple(sorted(cpus[i] for i in order[:n]))
