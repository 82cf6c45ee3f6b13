"""The controller's core: the public API, composing the rooms that do the work.

``Controller`` holds what the service and ``mnp run`` call (submit, cancel,
terminate, wait, resolve, restore, close) and makes the rooms, which share one
``state.Shared`` (jobs, run queue, tasks, hooks, recorder, clock, host pool) and
never import this module:

- ``admission``: ``Admission`` -- ids, dependencies, array children, restore, and a
  job's end (``finish``): what ``mnp.sched.lifecycle`` decides before a job runs;
- ``starting``: ``Starter`` -- the scheduling pass (``mnp.sched.decide``), each
  placed attempt's spawns (the ``Launcher``'s messages), the multi-node start order;
- ``attempts``: ``Attempts`` -- the agents' events about running tasks, timeouts,
  teardown, retry or finish (``mnp.sched.lifecycle``), one job's failure kept its own;
- ``launch``: ``Launcher`` -- a placement into each task's argv, environment, files;
- ``hosts``: ``HostPool`` -- the agents, reached by host; it knows no jobs;
- ``managed``: ``Managed`` -- managed compute environments: allocations submitted to
  and given back to a batch system, their nodes added to and removed from the pool.

The inventory may change while it runs (``set_inventory``): ``mnp hosts drain|resume``,
``mnp ce update``, ``mnp queues update``, ``mnp controller reload`` and the managed
environments' allocations; each change is noted in ``changes`` (and ``on_change``).

Decisions come from the pure modules (``mnp.sched.decide``: where; ``lifecycle``:
what next); the rooms read the clock where something happens (``Shared.clock``) and
pass ``now`` on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets as pysecrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mnp.controller.admission import LOST_REASON, Admission, Restored
from mnp.controller.attempts import TEARDOWN_SLACK, Attempts
from mnp.controller.hosts import LOAD_WITHIN, HostPool
from mnp.controller.launch import Launcher
from mnp.controller.managed import Managed, Provider, interval_from_env, is_allocation_transport
from mnp.controller.starting import Starter
from mnp.controller.state import (
    EventSink,
    OutputHandler,
    Recorder,
    Shared,
    TaskEndHandler,
    TaskStartHandler,
)
from mnp.errors import JobRefused, UsageError
from mnp.jobs import Job
from mnp.model import TERMINAL, Inventory, JobDefinition, JobState, ManagedSpec
from mnp.transport.base import Event, Transport

CHANGES_KEPT = 1000  # cluster changes kept in memory (``Controller.changes``)

__all__ = [
    "LOST_REASON",
    "TEARDOWN_SLACK",
    "Controller",
    "EventSink",
    "OutputHandler",
    "Recorder",
    "Restored",
    "TaskEndHandler",
    "TaskStartHandler",
]


class Controller:
    def __init__(
        self,
        inventory: Inventory,
        transports: Mapping[str, Transport],
        *,
        token: str | None = None,
        on_output: OutputHandler | None = None,
        on_task_start: TaskStartHandler | None = None,
        on_task_end: TaskEndHandler | None = None,
        on_event: EventSink | None = None,
        agent_grace: float = 2.0,
        connect_fanout: int = 64,
        recorder: Recorder | None = None,
        heartbeat: tuple[float, float] | None = None,
        providers: Callable[[str, ManagedSpec], Provider] | None = None,
        managed_transport: Callable[[Provider, str, Sequence[str]], Transport] | None = None,
        managed_interval: float | None = None,
        on_change: EventSink | None = None,
    ) -> None:
        self.inventory = inventory
        self.changes: list[dict[str, Any]] = []
        self.on_change = on_change
        self._change_seq = 0
        self._removing: dict[str, str] = {}  # host removed by reload → drained until idle
        self.token = token or pysecrets.token_hex(8)
        self.on_event = on_event
        self.agent_grace = agent_grace
        self.recorder = recorder
        self.hosts = HostPool(
            inventory,
            transports,
            self.token,
            on_event=lambda host, msg: self.attempts.on_event_guarded(host, msg),
            on_lost=lambda host, why: self.attempts.on_host_lost(host, why),
            on_up=self._host_up,
            stale=self._stale_sweep,
            heartbeat=heartbeat,
            connect_fanout=connect_fanout,
        )
        # the pool's, under the names the service and the tests read
        self.agents = self.hosts.agents
        self.capacity = self.hosts.capacity
        self.host_errors = self.hosts.host_errors
        self.shared = Shared(
            inventory,
            self.hosts,
            recorder,
            self._emit,
            on_output=on_output,
            on_task_start=on_task_start,
            on_task_end=on_task_end,
        )
        self.jobs: dict[str, Job] = self.shared.jobs
        self.events: list[dict[str, Any]] = []
        self._event_seq = 0
        self.launcher = Launcher(inventory, self.hosts)
        self.admission = Admission(self.shared)
        self.attempts = Attempts(self.shared, self.admission)
        self.starter = Starter(self.shared, self.launcher, self.attempts)
        self.attempts.main_running = self.starter.main_running
        self.shared.schedule_pass = self._schedule_pass
        self.managed = Managed(
            self.shared,
            providers or default_provider,
            managed_transport or default_managed_transport,
            self.set_inventory,
            lambda job, why: self.admission.cancel(job.parent or job, why, self.shared.clock()),
            self.note_change,
            interval=interval_from_env() if managed_interval is None else managed_interval,
        )
        self.admission.managed_vcpus = self.managed.known_vcpus

    def _schedule_pass(self) -> None:
        self.starter.schedule_pass()
        if self.shared.runnable and self.managed.any:
            self.managed.wake()
        self._finish_removals()

    def _host_up(self, host: str) -> None:
        self.managed.learn(host)
        self.shared.request_schedule()

    # the hooks and the teardown bound live in the rooms; set them here at any time

    @property
    def on_output(self) -> OutputHandler | None:
        return self.shared.on_output

    @on_output.setter
    def on_output(self, handler: OutputHandler | None) -> None:
        self.shared.on_output = handler

    @property
    def on_task_start(self) -> TaskStartHandler | None:
        return self.shared.on_task_start

    @on_task_start.setter
    def on_task_start(self, handler: TaskStartHandler | None) -> None:
        self.shared.on_task_start = handler

    @property
    def on_task_end(self) -> TaskEndHandler | None:
        return self.shared.on_task_end

    @on_task_end.setter
    def on_task_end(self, handler: TaskEndHandler | None) -> None:
        self.shared.on_task_end = handler

    @property
    def teardown_slack(self) -> float:
        """Seconds after ``kill_grace`` that an ending attempt's hosts have to confirm
        its teardown (``attempts.TEARDOWN_SLACK``)."""
        return self.attempts.teardown_slack

    @teardown_slack.setter
    def teardown_slack(self, seconds: float) -> None:
        self.attempts.teardown_slack = seconds

    # --- hosts ------------------------------------------------------------

    async def start(self, restored: Sequence[Restored] = ()) -> None:
        """Connect to every host at once (bounded); unreachable ones are retried later.

        ``restored``: the unfinished jobs a previous controller left (``restore``). They
        are taken back once the hosts are connected and before any agent gets its
        ``stale`` sweep, so that no sweep judges their retries (same job ids) left over."""
        try:
            if self.inventory.hosts or not self.managed.any:
                await self.hosts.connect_all()
            else:
                self.hosts._holding_stale = False  # only managed capacity: none yet
            if restored:
                self.restore(restored, self.shared.clock())
        finally:
            # before this returns, and so before any scheduling pass can send a spawn
            self.hosts.release_stale()
            if self.managed.any:
                self.managed.start()

    def _stale_sweep(self) -> Event:
        """What a new agent kills before it runs anything: processes of this controller
        left on its host by jobs that are over, or by an agent that died (SIGKILL, host
        lost) -- their jobs, if still running, were given up on that host and retried.

        Only jobs that were ever placed can have processes: those unfinished are listed
        as live, and ``below`` stops at the oldest unfinished job never placed (it may be
        placed while the agent looks), so the message stays the size of what runs, not
        of the queue."""
        recorder = self.recorder
        below = recorder.ids_below() if recorder is not None else self.admission.next_id
        placed = []
        for job in self.jobs.values():
            if job.parent is not None or job.state in TERMINAL:
                continue
            if job.attempts or job.admitted:
                placed.append(job.id)
            elif job.id.isdigit():
                below = min(below, int(job.id))
        live = sorted(j for j in placed if not (j.isdigit() and int(j) >= below))
        return {"op": "stale", "live": live, "below": below, "grace": self.agent_grace}

    async def host_loads(self, within: float = LOAD_WITHIN) -> dict[str, Event]:
        """Each connected host's load now (``HostPool.host_loads``)."""
        return await self.hosts.host_loads(within)

    # --- jobs -------------------------------------------------------------

    def submit(self, defn: JobDefinition) -> Job:
        """Accept a job (``Admission.submit``): it is PENDING, or already released."""
        return self.admission.submit(defn)

    def continue_numbering(self, last_seq: int) -> None:
        """Go on after the highest ``seq`` a previous controller gave out (FIFO order
        and the store's unique key both rely on it)."""
        self.admission.seq = max(self.admission.seq, last_seq)

    def restore(self, items: Sequence[Restored], now: float) -> None:
        """Take back the unfinished jobs a previous controller accepted
        (``Admission.restore``)."""
        self.admission.restore(items, now)

    def state_of(self, job_id: str) -> JobState | None:
        """A job's state, or None when no such job exists (held, or stored by the
        recorder: a job that ended before a restart)."""
        return self.admission.state_of(job_id)

    def resolve(self, ref: str) -> str | None:
        """The id of the job ``ref`` refers to, or None (``Admission.resolve``)."""
        return self.admission.resolve(ref)

    def _find(self, job_id: str) -> Job:
        job = self.jobs.get(self.resolve(job_id) or job_id)
        if job is None:
            raise JobRefused(f"job {job_id} does not exist")
        return job

    def cancel(self, job_id: str, reason: str) -> Job:
        """SUBMITTED/PENDING/RUNNABLE → FAILED; what already runs goes on (AWS Batch).
        ``job_id`` may be a name (:meth:`resolve`)."""
        job = self._find(job_id)
        self.admission.cancel(job, reason, self.shared.clock())
        return job

    def terminate(self, job_id: str, reason: str) -> Job:
        """Like cancel, and STARTING/RUNNING ones are ended. ``job_id`` may be a name."""
        job = self._find(job_id)
        self.attempts.terminate(job, reason, self.shared.clock())
        return job

    def note(self, job: Job, text: str) -> None:
        """Add ``text`` to the job's final reason (after the reason itself, if any): for
        what went wrong beside the job, such as its output lost. The first note is kept."""
        if job.note is None:
            job.note = text

    def withdraw(self, job: Job) -> None:
        """Forget a job that was just submitted, as if it never had been
        (``Admission.withdraw``)."""
        self.admission.withdraw(job)

    def forget(self, job_ids: Sequence[str]) -> None:
        """Drop finished top-level jobs purged from the store (``Admission.forget``)."""
        self.admission.forget(job_ids)

    # --- waiting and closing ----------------------------------------------

    async def wait(self, job: Job) -> Job:
        if job.done:
            return job
        fut: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self.shared.waiters.setdefault(job.id, []).append(fut)
        return await fut

    def _emit(self, event: dict[str, Any]) -> None:
        if self.recorder is not None:
            event = {"seq": self.recorder.event(event), **event}
        else:
            self._event_seq += 1
            event = {"seq": self._event_seq, **event}
            self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    async def close(self) -> None:
        """Stop: the agents kill what runs, and nothing of that is recorded. A job that was
        STARTING or RUNNING keeps that state, as after a crash, and the next controller
        retries it without counting the attempt (``restore``): a graceful stop or restart
        never fails a job nor uses up one of its attempts. An attempt whose end was already
        decided (terminated, timed out, its main process exited) ends as decided: the
        agents' closing is its teardown."""
        self.shared.closed = True
        self.attempts.close(self.shared.clock())
        self.launcher.close()
        await self.hosts.close()
        await self.managed.close()
        for task in list(self.shared.bg):
            task.cancel()

    # --- changes while it runs --------------------------------------------

    def note_change(self, change: dict[str, Any]) -> None:
        """One change of the cluster (a host drained, an allocation started...): kept in
        ``changes`` with a ``seq`` and a ``time``, and given to ``on_change``."""
        self._change_seq += 1
        event = {"seq": self._change_seq, "time": time.time(), **change}
        self.changes.append(event)
        del self.changes[:-CHANGES_KEPT]
        if self.on_change is not None:
            self.on_change(event)

    def set_inventory(self, inventory: Inventory) -> None:
        """Every room reads the inventory from here on; then a scheduling pass."""
        self.inventory = inventory
        self.shared.inventory = inventory
        self.hosts.inventory = inventory
        self.launcher.inventory = inventory
        if not self.shared.closed:
            self.shared.request_schedule()

    def _host_names(self, names: Sequence[str]) -> list[str]:
        known = {h.name for h in self.inventory.hosts}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(
                f"no such host: {', '.join(unknown)}; hosts: {', '.join(sorted(known)) or 'none'}"
            )
        return list(names)

    def drain(self, names: Sequence[str], reason: str) -> list[str]:
        """The hosts take no new work; what runs there goes on."""
        for name in self._host_names(names):
            self.hosts.drain(name, reason or "drained")
            self.note_change({"kind": "host", "host": name, "state": "DRAINED", "reason": reason})
        return list(names)

    def resume(self, names: Sequence[str]) -> list[str]:
        for name in self._host_names(names):
            if name in self._removing:
                raise UsageError(f"host {name} is being removed (reload); it cannot resume")
            self.hosts.resume(name)
            self.note_change({"kind": "host", "host": name, "state": "RESUMED"})
        self.shared.request_schedule()
        return list(names)

    def update_ce(
        self,
        name: str,
        state: str | None = None,
        min_vcpus: int | None = None,
        max_vcpus: int | None = None,
        desired_vcpus: int | None = None,
    ) -> dict[str, Any]:
        ce = self.inventory.compute_environments.get(name)
        if ce is None:
            known = ", ".join(sorted(self.inventory.compute_environments))
            raise UsageError(f"no such compute environment: {name}; there are: {known}")
        if state is not None and state not in ("ENABLED", "DISABLED"):
            raise UsageError(f"ce update: state {state!r}; allowed ENABLED or DISABLED")
        managed = ce.managed
        sizes = {"min_vcpus": min_vcpus, "max_vcpus": max_vcpus, "desired_vcpus": desired_vcpus}
        given = {k: v for k, v in sizes.items() if v is not None}
        if given:
            if managed is None:
                raise UsageError(
                    f"ce update: {name} is UNMANAGED (its hosts are listed); "
                    f"{', '.join(given)} only apply to a MANAGED environment"
                )
            if any(not 0 <= v <= 10_000_000 for v in given.values() if v is not None):
                raise UsageError(f"ce update: {given}; allowed 0..10000000 vCPUs")
            managed = dataclasses.replace(managed, **given)  # type: ignore[arg-type]
            if not 0 <= managed.min_vcpus <= managed.desired_vcpus <= managed.max_vcpus:
                raise UsageError(
                    f"ce update: min_vcpus {managed.min_vcpus}, desired_vcpus "
                    f"{managed.desired_vcpus}, max_vcpus {managed.max_vcpus}; allowed "
                    "0 <= min <= desired <= max"
                )
        new = dataclasses.replace(ce, state=state or ce.state, managed=managed)
        ces = dict(self.inventory.compute_environments)
        ces[name] = new
        self.set_inventory(dataclasses.replace(self.inventory, compute_environments=ces))
        change = {"kind": "ce", "ce": name, "state": new.state, **given}
        self.note_change(change)
        self.managed.wake()
        return change

    def update_queue(
        self, name: str, priority: int | None = None, state: str | None = None
    ) -> dict[str, Any]:
        q = self.inventory.queues.get(name)
        if q is None:
            raise UsageError(
                f"no such queue: {name}; queues: {', '.join(sorted(self.inventory.queues))}"
            )
        if state is not None and state not in ("ENABLED", "DISABLED"):
            raise UsageError(f"queues update: state {state!r}; allowed ENABLED or DISABLED")
        if priority is not None and not 0 <= priority <= 1000:
            raise UsageError(f"queues update: priority {priority}; allowed 0..1000")
        new = dataclasses.replace(
            q, priority=q.priority if priority is None else priority, state=state or q.state
        )
        queues = dict(self.inventory.queues)
        queues[name] = new
        self.set_inventory(dataclasses.replace(self.inventory, queues=queues))
        change = {"kind": "queue", "queue": name, "priority": new.priority, "state": new.state}
        self.note_change(change)
        return change

    def reload(self, new: Inventory) -> dict[str, list[str]]:
        """Take ``new`` (the inventory file read again): hosts, compute environments and
        queues added, removed or changed. Running jobs are untouched: a removed host is
        drained and leaves once nothing runs there; a managed environment keeps the
        nodes of its allocations."""
        old = self.inventory
        dynamic = {h.name: h for h in old.hosts if is_allocation_transport(h.transport)}
        old_static = {h.name: h for h in old.hosts if h.name not in dynamic}
        new_hosts = {h.name: h for h in new.hosts}
        added = [n for n in new_hosts if n not in old_static]
        removed = [n for n in old_static if n not in new_hosts]
        changed = [n for n in new_hosts if n in old_static and new_hosts[n] != old_static[n]]
        ces = dict(new.compute_environments)
        for cname, ce in ces.items():
            prev = old.compute_environments.get(cname)
            if ce.managed is not None and prev is not None and prev.managed is not None:
                ces[cname] = dataclasses.replace(ce, hosts=prev.hosts)
        hosts = list(new.hosts)
        for n in removed:  # kept (drained, in no environment) until idle
            hosts.append(old_static[n])
        hosts += [h for n, h in dynamic.items() if n not in new_hosts]
        self.set_inventory(dataclasses.replace(new, hosts=tuple(hosts), compute_environments=ces))
        for n in removed:
            self._removing[n] = "removed from the inventory"
            self.hosts.drain(n, "removed from the inventory (reload)")
        for n in added:
            self.hosts.add(n)
        for n in changed:  # reconnected with the new settings once idle
            self._removing[n] = "changed in the inventory"
            self.hosts.drain(n, "changed in the inventory (reload)")
        summary = {
            "hosts_added": added,
            "hosts_removed": removed,
            "hosts_changed": changed,
            "ces": sorted(set(new.compute_environments) ^ set(old.compute_environments))
            + sorted(
                n
                for n in new.compute_environments
                if n in old.compute_environments
                and new.compute_environments[n] != old.compute_environments[n]
            ),
            "queues": sorted(
                n
                for n in set(new.queues) | set(old.queues)
                if new.queues.get(n) != old.queues.get(n)
            ),
        }
        self.note_change({"kind": "reload", "source": new.source, **summary})
        self._finish_removals()
        self.managed.wake()
        return summary

    def _finish_removals(self) -> None:
        """Hosts a reload removed or changed leave once nothing of theirs runs."""
        for name in list(self._removing):
            cap = self.hosts.capacity.get(name)
            if cap is not None and (cap.tasks or cap.exclusive):
                continue
            why = self._removing.pop(name)
            self.hosts.drop(name)
            if why.startswith("changed"):
                self.hosts.add(name)  # its new settings (the inventory has them)
                self.note_change({"kind": "host", "host": name, "state": "RECONNECTED"})
            else:
                keep = tuple(h for h in self.inventory.hosts if h.name != name)
                self.set_inventory(dataclasses.replace(self.inventory, hosts=keep))
                self.note_change({"kind": "host", "host": name, "state": "REMOVED"})


def default_provider(name: str, spec: ManagedSpec) -> Provider:
    """The provider a managed environment names (``provider = ...``)."""
    if spec.provider == "slurm":
        from mnp.provider.slurm import SlurmProvider

        return SlurmProvider(spec.options)
    if spec.provider == "pbs":
        from mnp.provider.pbs import PbsProvider

        return PbsProvider(spec.options)
    from mnp.provider.command import CommandProvider

    return CommandProvider(name, spec.start, spec.stop, spec.time_limit)


def default_managed_transport(provider: Provider, alloc_id: str, nodes: Sequence[str]) -> Transport:
    """How the nodes of an allocation are reached: Slurm's srun from outside it
    (``mnp.transport.srun.allocation_vars``); a "command" provider's hosts over SSH."""
    if provider.name == "command":
        from mnp.provider.command import SshByHost

        return SshByHost()
    from mnp.transport.srun import SrunTransport, allocation_vars

    environ = getattr(provider, "environ", None)
    return SrunTransport(alloc_id, environ=environ, job_env=allocation_vars(nodes))


GC_THRESHOLD = (10_000, 10, 10)


def tune_gc() -> None:
    """For a process that is about to run a controller: what was imported and built so
    far is frozen out of the collector's passes (``gc.freeze``), and the youngest
    generation is collected after 10,000 allocations instead of 700. A controller
    holds its jobs for long, and every event allocates: with the defaults, collections
    took a quarter of the dispatch time of a 20,000-task run (benchmarks/run.py, phase
    ``scale``: 7,500/s bare and 2,700/s with the store, then 8,900/s and 3,400/s)."""
    import gc

    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
