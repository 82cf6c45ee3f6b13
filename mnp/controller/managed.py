"""Managed compute environments: capacity acquired from a batch system while the
controller runs (issue 15).

``Managed`` runs one pass per environment every ``interval`` seconds and soon after
a job becomes RUNNABLE (``wake``). A pass:

1. polls the provider for the allocations it holds (a subprocess, off the loop);
2. an allocation that started running: its nodes become hosts of the environment,
   reached over the srun transport from outside it (``srun --jobid ALLOC``); one that
   ended (``scancel``, its time limit, preemption) takes its hosts away: what ran
   there is lost (``Host lost: NAME (allocation ALLOC ended: STATE)``) and retried
   elsewhere like on any lost host;
3. asks ``mnp.sched.autoscale.decide`` what to do, with the RUNNABLE work of the
   queues that list this environment (each job counted for the first ENABLED
   managed environment of its queue) and what the controller's jobs hold on each
   allocation's nodes, and does it: ``Submit`` → ``provider.submit``; ``Cancel`` → its
   hosts are taken out of the environment at once (nothing new is placed there),
   then ``provider.cancel``; ``Blocked`` → the job fails (its reason says why).

Time limits (the rule, as ``autoscale``): when ``allocation.time_limit`` is set, a job
placed there must have a ``timeout.attempt_duration`` that fits in it (less
``autoscale.DEFAULT_MARGIN``); one without is refused at submit when no other
environment of its queue can run it, and never gets an allocation. A DISABLED
environment submits nothing and gives back idle allocations above its floor.

``close`` (``mnp controller stop``) cancels every allocation this controller holds:
they were submitted for its jobs, which a stopped controller no longer runs. A new
controller does not adopt allocations an earlier one left (after a crash they end at
their time limit, or ``scancel --name=mnp-CE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mnp.controller.state import Shared
from mnp.errors import MnpError
from mnp.jobs import Job
from mnp.model import HostSpec, Inventory, ManagedSpec
from mnp.provider.slurm import AllocationStatus
from mnp.sched import autoscale
from mnp.sched.autoscale import Allocation, Blocked, Cancel, Need, Submit
from mnp.transport.base import Transport

INTERVAL = 5.0  # seconds between passes (MNP_AUTOSCALE_INTERVAL)
FINISHED_KEPT = 50  # ended allocations listed per environment


def interval_from_env(env: Mapping[str, str] | None = None) -> float:
    """``MNP_AUTOSCALE_INTERVAL`` (seconds, positive) or ``INTERVAL``."""
    try:
        value = float((os.environ if env is None else env).get("MNP_AUTOSCALE_INTERVAL", ""))
    except ValueError:
        return INTERVAL
    return value if value > 0 else INTERVAL


class Provider(Protocol):
    name: str

    async def submit(self, nodes: int, time_limit: float | None, name: str = ...) -> str: ...

    async def poll(self, alloc_ids: Sequence[str]) -> dict[str, AllocationStatus]: ...

    async def cancel(self, alloc_id: str) -> None: ...


@dataclass
class AllocRecord:
    """One allocation as the controller sees it (``mnp ce`` shows these)."""

    alloc_id: str
    ce: str
    nodes_asked: int
    submitted_at: float
    state: str = "PENDING"  # PENDING | RUNNING | ENDED (``phase``)
    slurm_state: str = "PENDING"  # the batch system's own word
    nodes: tuple[str, ...] = ()
    reason: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    ends_at: float | None = None
    idle_since: float | None = None
    cancelling: bool = False

    def view(self) -> dict[str, Any]:
        return {
            "id": self.alloc_id,
            "ce": self.ce,
            "state": self.state,
            "scheduler_state": self.slurm_state,
            "nodes": list(self.nodes),
            "nodes_asked": self.nodes_asked,
            "reason": self.reason,
            "submitted": self.submitted_at,
            "started": self.started_at,
            "ended": self.ended_at,
        }


@dataclass
class _Env:
    name: str
    provider: Provider
    live: dict[str, AllocRecord] = field(default_factory=dict)
    finished: list[AllocRecord] = field(default_factory=list)
    node_vcpus: int | None = None
    blocked: set[str] = field(default_factory=set)


def transport_key(provider: Provider, alloc_id: str) -> str:
    """The transport name of an allocation's hosts: ``srun:ALLOC`` (Slurm, PBS) or
    ``ssh:ALLOC`` (provider "command": SSH with the inventory's ``[ssh]`` settings)."""
    return f"{'ssh' if provider.name == 'command' else 'srun'}:{alloc_id}"


def is_allocation_transport(name: str) -> bool:
    """Whether a host's transport is an allocation's (``transport_key``)."""
    return name.startswith(("srun:", "ssh:"))


def host_name(alloc_id: str, node: str) -> str:
    """A node of an allocation, as a host: the node's name (Slurm gives a node to one
    exclusive allocation at a time)."""
    return node


def need_of(job: Job, node_vcpus: int) -> Need | None:
    """What ``autoscale`` needs to know of a RUNNABLE job (None: nothing to place)."""
    req = job.request
    if req is None:
        return None
    vcpus = max(r.vcpus for r in req.nodes)
    if req.exclusive:
        vcpus = float(node_vcpus)
    return Need(req.key, len(req.nodes), vcpus, job.defn.timeout.attempt_duration)


def owner_ce(inventory: Inventory, queue: str) -> str | None:
    """The managed environment a job of ``queue`` asks capacity of: the first ENABLED
    managed environment in the queue's order; None if none."""
    q = inventory.queues.get(queue)
    if q is None:
        return None
    for name in q.compute_environments:
        ce = inventory.compute_environments.get(name)
        if ce is not None and ce.managed is not None and ce.state == "ENABLED":
            return name
    return None


def could_run_managed(
    inventory: Inventory, queue: str, need: Need, known_vcpus: Mapping[str, int]
) -> bool:
    """Whether an ENABLED managed environment of ``queue`` could ever run ``need``
    (node size unknown yet: it could)."""
    q = inventory.queues.get(queue)
    if q is None:
        return False
    for name in q.compute_environments:
        ce = inventory.compute_environments.get(name)
        if ce is None or ce.managed is None or ce.state != "ENABLED":
            continue
        spec = ce.managed
        vcpus = spec.vcpus_per_node or known_vcpus.get(name)
        if vcpus is None:
            vcpus = max(1, math.ceil(need.vcpus))
            probe = dataclasses.replace(need, vcpus=float(vcpus))
        else:
            probe = need
        if autoscale.never(spec, vcpus, probe, autoscale.DEFAULT_MARGIN) is None:
            return True
    return False


class Managed:
    """The managed environments of one controller (see the module docstring)."""

    def __init__(
        self,
        shared: Shared,
        providers: Callable[[str, ManagedSpec], Provider],
        transport_for: Callable[[Provider, str, Sequence[str]], Transport],
        set_inventory: Callable[[Inventory], None],
        fail_job: Callable[[Job, str], None],
        note: Callable[[dict[str, Any]], None],
        interval: float = INTERVAL,
    ) -> None:
        self.s = shared
        self.providers = providers
        self.transport_for = transport_for
        self.set_inventory = set_inventory
        self.fail_job = fail_job
        self.note = note
        self.interval = interval
        self.envs: dict[str, _Env] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self.errors: dict[str, str] = {}  # environment → the provider's last error

    @property
    def any(self) -> bool:
        return any(ce.managed for ce in self.s.inventory.compute_environments.values())

    def known_vcpus(self) -> dict[str, int]:
        return {n: e.node_vcpus for n, e in self.envs.items() if e.node_vcpus}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while not self.s.closed:
            try:
                await self.run_pass()
            except Exception as e:  # a pass never ends the loop
                self.note({"kind": "managed_error", "error": f"{type(e).__name__}: {e}"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await asyncio.sleep(0.2)  # let a burst of submits land in one pass

    def _env(self, name: str, spec: ManagedSpec) -> _Env:
        env = self.envs.get(name)
        if env is None:
            env = self.envs[name] = _Env(name, self.providers(name, spec), node_vcpus=None)
        if spec.vcpus_per_node:
            env.node_vcpus = spec.vcpus_per_node
        return env

    async def run_pass(self) -> None:
        async with self._lock:
            for name, ce in list(self.s.inventory.compute_environments.items()):
                if ce.managed is not None and not self.s.closed:
                    try:
                        await self._pass(self._env(name, ce.managed), ce.managed)
                        self.errors.pop(name, None)
                    except MnpError as e:
                        if self.errors.get(name) != str(e):
                            self.note({"kind": "provider_error", "ce": name, "error": str(e)})
                        self.errors[name] = str(e)

    async def _pass(self, env: _Env, spec: ManagedSpec) -> None:
        s = self.s
        if env.live:
            polled = await env.provider.poll(list(env.live))
            now = s.clock()
            for alloc_id, status in polled.items():
                rec = env.live.get(alloc_id)
                if rec is not None:
                    self._observe(env, rec, status, now)
        now = s.clock()
        ce = s.inventory.compute_environments.get(env.name)
        if ce is None or ce.managed is None:
            return
        spec = ce.managed
        vcpus = env.node_vcpus
        needs: list[Need] = []
        if ce.state == "ENABLED":
            for job in sorted(s.runnable.values(), key=lambda j: j.seq):
                if owner_ce(s.inventory, job.defn.queue) != env.name:
                    continue
                need = need_of(job, vcpus or 1)
                if need is not None:
                    needs.append(need)
        if vcpus is None:
            if not needs and not env.live and spec.min_vcpus == 0 and spec.desired_vcpus == 0:
                return
            vcpus = max([1, *(math.ceil(n.vcpus) for n in needs)])
        allocations = [self._as_allocation(env, rec, vcpus, now) for rec in env.live.values()]
        actions = autoscale.decide(
            spec, vcpus, needs, [a for a in allocations if a is not None], now
        )
        if ce.state != "ENABLED":
            actions = [a for a in actions if isinstance(a, Cancel)]
        for action in actions:
            if isinstance(action, Blocked):
                target = s.runnable.get(action.key)
                if target is not None and action.key not in env.blocked:
                    env.blocked.add(action.key)
                    self.fail_job(target, f"{env.name}: {action.reason}")
            elif isinstance(action, Cancel):
                await self._cancel(env, action.alloc_id, action.reason)
            elif isinstance(action, Submit):
                await self._submit(env, action)

    def _as_allocation(
        self, env: _Env, rec: AllocRecord, vcpus: int, now: float
    ) -> Allocation | None:
        if rec.cancelling:
            return None
        if rec.state == "PENDING":
            return Allocation(rec.alloc_id, rec.nodes_asked, "PENDING")
        used = []
        for node in rec.nodes:
            cap = self.s.hosts.capacity.get(host_name(rec.alloc_id, node))
            if cap is None:
                used.append(0.0)
            elif cap.exclusive:
                used.append(float(vcpus))
            else:
                used.append(max(0.0, cap.vcpus - cap.free_vcpus) if cap.tasks else 0.0)
        busy = any(used)
        if busy:
            rec.idle_since = None
        elif rec.idle_since is None:
            rec.idle_since = now
        return Allocation(
            rec.alloc_id, len(rec.nodes), "RUNNING", tuple(used), rec.idle_since, rec.ends_at
        )

    async def _submit(self, env: _Env, action: Submit) -> None:
        alloc_id = await env.provider.submit(action.nodes, action.time_limit, f"mnp-{env.name}")
        now = self.s.clock()
        env.live[alloc_id] = AllocRecord(alloc_id, env.name, action.nodes, now)
        self.note(
            {
                "kind": "allocation",
                "ce": env.name,
                "allocation": alloc_id,
                "state": "PENDING",
                "nodes": action.nodes,
                "for": list(action.for_keys),
            }
        )

    async def _cancel(self, env: _Env, alloc_id: str, reason: str) -> None:
        rec = env.live.get(alloc_id)
        if rec is None:
            return
        rec.cancelling = True
        # out of the environment first: nothing new is placed there while it ends
        self._remove_hosts(rec, None)
        rec.reason = reason
        self.note({"kind": "allocation", "ce": env.name, "allocation": alloc_id,
                   "state": "CANCELLING", "reason": reason})  # fmt: skip
        await env.provider.cancel(alloc_id)

    def _observe(self, env: _Env, rec: AllocRecord, status: AllocationStatus, now: float) -> None:
        phase = status.phase
        rec.slurm_state = status.state
        if status.reason and phase == "PENDING":
            rec.reason = status.reason
        if status.time_left is not None and phase == "RUNNING":
            rec.ends_at = now + status.time_left
        if phase == "RUNNING" and rec.state == "PENDING" and not rec.cancelling:
            rec.state = "RUNNING"
            rec.started_at = now
            rec.nodes = status.nodes
            rec.idle_since = now
            self._add_hosts(env, rec)
            self.note({"kind": "allocation", "ce": env.name, "allocation": rec.alloc_id,
                       "state": "RUNNING", "hosts": list(rec.nodes)})  # fmt: skip
        elif phase == "ENDED":
            rec.state = "ENDED"
            rec.ended_at = now
            if not rec.cancelling:
                rec.reason = f"allocation {rec.alloc_id} ended: {status.state}"
            self._remove_hosts(rec, f"allocation {rec.alloc_id} ended: {status.state}")
            del env.live[rec.alloc_id]
            env.finished.append(rec)
            del env.finished[:-FINISHED_KEPT]
            self.note({"kind": "allocation", "ce": env.name, "allocation": rec.alloc_id,
                       "state": "ENDED", "scheduler_state": status.state})  # fmt: skip

    def _add_hosts(self, env: _Env, rec: AllocRecord) -> None:
        s = self.s
        key = transport_key(env.provider, rec.alloc_id)
        s.hosts.transports[key] = self.transport_for(env.provider, rec.alloc_id, rec.nodes)
        addresses: Mapping[str, str] = getattr(env.provider, "addresses", {})
        ce = s.inventory.compute_environments[env.name]
        spec = ce.managed
        assert spec is not None
        names = [host_name(rec.alloc_id, n) for n in rec.nodes]
        new_hosts = [
            HostSpec(
                name=n,
                address=addresses.get(n, n),
                vcpus=spec.vcpus_per_node,
                transport=key,
                ssh=s.inventory.ssh,
            )
            for n in names
        ]
        known = {h.name for h in s.inventory.hosts}
        inv = s.inventory
        ces = dict(inv.compute_environments)
        ces[env.name] = dataclasses.replace(
            ce, hosts=tuple(h for h in ce.hosts if h not in names) + tuple(names)
        )
        self.set_inventory(
            dataclasses.replace(
                inv,
                hosts=tuple(h for h in inv.hosts if h.name not in names) + tuple(new_hosts),
                compute_environments=ces,
            )
        )
        for n in names:
            if n in known:
                s.hosts.drop(n)  # a node of an earlier allocation, now someone else's
            s.hosts.add(n)

    def _remove_hosts(self, rec: AllocRecord, why: str | None) -> None:
        s = self.s
        names = {host_name(rec.alloc_id, n) for n in rec.nodes}
        key = transport_key(self.envs[rec.ce].provider, rec.alloc_id)
        mine = {h.name for h in s.inventory.hosts if h.transport == key and h.name in names}
        if not mine:
            return
        inv = s.inventory
        ces = {
            n: dataclasses.replace(c, hosts=tuple(h for h in c.hosts if h not in mine))
            if c.managed is not None
            else c
            for n, c in inv.compute_environments.items()
        }
        self.set_inventory(
            dataclasses.replace(
                inv,
                hosts=tuple(h for h in inv.hosts if h.name not in mine),
                compute_environments=ces,
            )
        )
        for n in sorted(mine):
            s.hosts.drop(n, why)
        if why is None or not any(h.transport == key for h in s.inventory.hosts):
            gone = s.hosts.transports.pop(key, None)
            if gone is not None:  # its shared resources (SSH connections) go with it
                task = asyncio.get_running_loop().create_task(gone.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def learn(self, host: str) -> None:
        """A host came up: it is marked as its allocation's (a gang stays within one),
        and an environment without ``vcpus_per_node`` learns its node size."""
        cap = self.s.hosts.capacity.get(host)
        if cap is None:
            return
        for env in self.envs.values():
            for rec in env.live.values():
                if rec.state == "RUNNING" and host in rec.nodes:
                    cap.group = rec.alloc_id
                    if env.node_vcpus is None:
                        env.node_vcpus = max(1, int(cap.vcpus))

    def views(self) -> list[dict[str, Any]]:
        """Every managed environment with its allocations (``mnp ce``)."""
        out = []
        for name, ce in self.s.inventory.compute_environments.items():
            if ce.managed is None:
                continue
            spec = ce.managed
            env = self.envs.get(name)
            live = list(env.live.values()) if env else []
            done = list(env.finished) if env else []
            vcpus = env.node_vcpus if env else spec.vcpus_per_node
            out.append(
                {
                    "name": name,
                    "type": "MANAGED",
                    "state": ce.state,
                    "provider": spec.provider,
                    "min_vcpus": spec.min_vcpus,
                    "max_vcpus": spec.max_vcpus,
                    "desired_vcpus": spec.desired_vcpus,
                    "vcpus_per_node": vcpus,
                    "hosts": list(ce.hosts),
                    "allocations": [r.view() for r in live + done],
                    "error": self.errors.get(name),
                }
            )
        return out

    async def close(self) -> None:
        """Cancel every allocation this controller holds (see the module docstring)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for env in self.envs.values():
            for alloc_id in list(env.live):
                with contextlib.suppress(MnpError):
                    await env.provider.cancel(alloc_id)
                self.note({"kind": "allocation", "ce": env.name, "allocation": alloc_id,
                           "state": "CANCELLED", "reason": "controller stopped"})  # fmt: skip
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
