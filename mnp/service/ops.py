"""The control socket's ops: ``socket_ops`` is the one table (op name → handler) that
the daemon and ``mnp run``'s hosted controller both dispatch through
(``mnp.daemon.dispatch``). The ops are documented in the package docstring; a unit
test holds the two to the same names."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

from mnp.api import Handler, Responder
from mnp.errors import InfraError, JobRefused, UsageError
from mnp.jobs import Job, job_exit_code
from mnp.model import JobDefinition
from mnp.service.feeds import Feed
from mnp.spec import parse_definition

if TYPE_CHECKING:
    from mnp.controller import Controller
    from mnp.daemon import Daemon
    from mnp.model import Inventory
    from mnp.service.feeds import Feeds
    from mnp.service.purging import Housekeeping
    from mnp.service.recording import Recording

RUN_BUFFER = 4 << 20  # characters of output kept for one `mnp run` client that reads slowly


def socket_ops(h: Handlers, daemon: Daemon) -> dict[str, Handler]:
    """Every op of the control socket, and who answers it."""
    return {
        # the process (mnp.daemon)
        "ping": daemon.ping,
        "shutdown": daemon.shutdown,
        # jobs
        "submit": h.submit,
        "run": h.run,
        "wait": h.wait,
        "cancel": h.cancel,
        "terminate": h.terminate,
        "purge": h.purge,
        # registered definitions (mnp definitions)
        "register": h.register,
        "deregister": h.deregister,
        # the controller and its hosts
        "info": h.info,
        "hosts": h.hosts,
        "queues": h.queues,
        # changes while it runs (issue 15)
        "drain": h.drain,
        "resume": h.resume,
        "ce": h.ce,
        "ce_update": h.ce_update,
        "queue_update": h.queue_update,
        "reload": h.reload,
    }


class ServiceParts(Protocol):
    """What the handlers use of the service (``mnp.service.core.Service`` has it); named
    here so that this module does not import the one that composes it."""

    inventory: Inventory
    inventory_key: str
    warnings: list[str]
    controller: Controller
    recording: Recording
    feeds: Feeds
    housekeeping: Housekeeping


class Handlers:
    """The handlers of the service's ops: each reads its request, asks the controller
    (through the service's parts), and answers through its ``Responder``."""

    def __init__(self, service: ServiceParts) -> None:
        self.service = service
        self.controller = service.controller
        self.recording = service.recording

    # --- helpers ----------------------------------------------------------

    def _definition(self, request: dict[str, Any]) -> JobDefinition:
        data = request.get("definition")
        if not isinstance(data, dict):
            raise UsageError("submit: a definition is required")
        return parse_definition(data, str(request.get("source") or "<submitted>"))

    @staticmethod
    def _command_line(request: dict[str, Any]) -> JobDefinition:
        """The definition of ``mnp run``'s quick client (``mnp.quickrun``): its command
        line (``argv``, what follows ``run``) built by the ``run`` command for the
        client's process (``submitter``), then read as a submitted definition is."""
        from mnp.cli.jobs import definition_from_argv
        from mnp.client import Submitter
        from mnp.spec import definition_to_dict

        argv, who = request.get("argv"), request.get("submitter")
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            raise UsageError("run: argv must be a list of strings")
        if not isinstance(who, dict):
            raise UsageError("run: a submitter is required with argv")
        cwd, environ = who.get("cwd"), who.get("environ")
        prefix, base_prefix = who.get("prefix"), who.get("base_prefix")
        if not (
            (cwd is None or isinstance(cwd, str))
            and isinstance(environ, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in environ.items())
            and isinstance(prefix, str)
            and isinstance(base_prefix, str)
        ):
            raise UsageError("run: submitter must have cwd, environ, prefix and base_prefix")
        defn = definition_from_argv(argv, Submitter(cwd, environ, prefix, base_prefix))
        return parse_definition(definition_to_dict(defn), defn.source)

    def _accept(self, request: dict[str, Any], defn: JobDefinition | None = None) -> Job:
        """Submit a job (``defn``, else the request's definition) and commit it; if it
        cannot be committed it is withdrawn (also when the database file turns out not
        to be ``mnp.db`` any more)."""
        if self.recording.check_db() is not None:
            raise InfraError(f"job not accepted: {self.recording.db_lost}")
        job = self.controller.submit(defn if defn is not None else self._definition(request))
        failed = self.recording.flush()
        if failed is None and self.recording.check_db() is not None:
            failed = self.recording.db_lost
        if failed is not None:
            self.controller.withdraw(job)
            self.recording.withdraw(job)
            raise InfraError(f"job not accepted: {failed}")
        return job

    def _job(self, request: dict[str, Any]) -> Job:
        """The job a request names by id or by name (the newest of that name)."""
        ref = str(request.get("job_id", ""))
        job_id = self.controller.resolve(ref)
        if job_id is None:
            raise JobRefused(f"job {ref} does not exist")
        job = self.controller.jobs.get(job_id)
        if job is None:
            raise JobRefused(
                f"job {ref} is not known to the running controller (it ended before the "
                "controller's last start)"
            )
        return job

    def _outcome(self, job: Job) -> dict[str, Any]:
        return {
            "ok": True,
            "job_id": job.id,
            "state": job.state.value,
            "reason": job.reason,
            "exit_code": job_exit_code(job),
            "timings": [a.timings() for a in job.attempts if a.placed_at is not None],
        }

    # --- jobs -------------------------------------------------------------

    async def submit(self, request: dict[str, Any], r: Responder) -> None:
        job = self._accept(request)
        await r.end({"ok": True, "job_id": job.id, "warnings": self.service.warnings})

    async def run(self, request: dict[str, Any], r: Responder) -> None:
        """Submit, stream the job's output, end with how it ended. A client that reads
        more slowly than the job writes gets gaps, each said in a line on stderr (the
        logs have everything): the controller keeps at most ``RUN_BUFFER`` characters
        of output for it. ``argv`` and ``submitter`` in place of the definition: the
        command line of ``mnp run``'s quick client (``_command_line``)."""
        job = self._accept(request, self._command_line(request) if "argv" in request else None)
        feed = Feed(RUN_BUFFER, job.id)
        feeds = self.service.feeds
        feeds.add(feed)
        await r.send({"ok": True, "job_id": job.id, "warnings": self.service.warnings})
        try:
            waiter = asyncio.ensure_future(self.controller.wait(job))
            waiter.add_done_callback(lambda _f: feed.put(None))
            closed = asyncio.ensure_future(r.wait_closed())
            while True:
                getter = asyncio.ensure_future(feed.get())
                done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    getter.cancel()
                    if not job.done:  # the client went away: the job goes with it
                        self.controller.terminate(job.id, "mnp run client went away")
                    return
                msg = getter.result()
                if msg is None and job.done:
                    break
                if msg is not None and msg.get("stopping") and not job.done:
                    closed.cancel()
                    await r.fail(
                        InfraError(
                            f"the controller stopped; job {job.id} was not failed and runs "
                            "again when a controller starts for this home (mnp controller start)"
                        )
                    )
                    return
                if msg is not None and "out" in msg:
                    await r.send(msg)
            closed.cancel()
            self.recording.flush()  # what the client reads next (describe, list) shows the end
            await r.end(self._outcome(job))
        finally:
            feeds.remove(feed)

    async def wait(self, request: dict[str, Any], r: Responder) -> None:
        job = self._job(request)
        await self.controller.wait(job)
        self.recording.flush()  # what a client reads next (describe, list) shows the end
        await r.end(self._outcome(job))

    async def cancel(self, request: dict[str, Any], r: Responder) -> None:
        job = self.controller.cancel(self._job(request).id, str(request.get("reason") or ""))
        self.recording.flush()
        await r.end({"ok": True, "job_id": job.id, "name": job.defn.name, "state": job.state.value})

    async def terminate(self, request: dict[str, Any], r: Responder) -> None:
        job = self.controller.terminate(self._job(request).id, str(request.get("reason") or ""))
        self.recording.flush()
        await r.end({"ok": True, "job_id": job.id, "name": job.defn.name, "state": job.state.value})

    async def purge(self, request: dict[str, Any], r: Responder) -> None:
        older_than = request.get("older_than")
        state = request.get("state")
        if older_than is not None and (
            isinstance(older_than, bool)
            or not isinstance(older_than, int | float)
            or not 0 <= older_than < float("inf")
        ):
            raise UsageError(f"purge: older_than {older_than!r} is not a number of seconds")
        if state is not None and state not in ("SUCCEEDED", "FAILED"):
            raise UsageError(f"purge: cannot purge {state!r} jobs; use SUCCEEDED or FAILED")
        before = None if older_than is None else time.time() - float(older_than)
        ids, errors = await self.service.housekeeping.purge(before, state)
        await r.end({"ok": True, "job_ids": ids, "log_errors": errors})

    # --- registered definitions ---------------------------------------------

    async def register(self, request: dict[str, Any], r: Responder) -> None:
        """Check the definition as ``submit`` would (a ``Ref::K`` may wait for
        ``--param`` at submit) and store it as the next revision of its name."""
        from mnp.spec import definition_to_dict

        data = request.get("definition")
        if not isinstance(data, dict):
            raise UsageError("register: a definition is required")
        source = str(request.get("source") or "<registered>")
        defn = parse_definition(data, source, open_refs=True)
        body = definition_to_dict(defn)
        revision = self.recording.store.register_definition(defn.name, body, source)
        await r.end({"ok": True, "name": defn.name, "revision": revision})

    async def deregister(self, request: dict[str, Any], r: Responder) -> None:
        name, revision = request.get("name"), request.get("revision")
        if not isinstance(name, str) or isinstance(revision, bool) or not isinstance(revision, int):
            raise UsageError("deregister: give name (a string) and revision (a number)")
        before = self.recording.store.deregister_definition(name, revision)
        if before is None:
            raise UsageError(f"definition {name}:{revision} does not exist")
        await r.end({"ok": True, "name": name, "revision": revision, "status": "INACTIVE"})

    # --- the controller and its hosts ---------------------------------------

    async def info(self, request: dict[str, Any], r: Responder) -> None:
        await r.end(
            {
                "ok": True,
                "inventory": self.service.inventory_key,
                "hosts": len(self.service.inventory.hosts),
                "warnings": self.service.warnings,
            }
        )

    async def hosts(self, request: dict[str, Any], r: Responder) -> None:
        """Every host's capacity, what is free of it, and its load now (``load``: the
        1-minute load average, ``memory_used``: bytes in use on the host, whoever uses
        them; None for a host that is down or did not answer in time)."""
        loads = await self.controller.host_loads()
        rows = []
        for h in self.controller.inventory.hosts:
            cap = self.controller.capacity.get(h.name)
            conn = self.controller.agents.get(h.name)
            sample = loads.get(h.name, {})
            averages = sample.get("load")
            rows.append(
                {
                    "name": h.name,
                    "address": h.address,
                    "state": "up" if cap is not None and cap.up and conn else "down",
                    "vcpus": cap.vcpus if cap else None,
                    "vcpus_free": cap.free_vcpus if cap else None,
                    "memory": cap.memory if cap else None,
                    "memory_free": cap.free_memory if cap else None,
                    "gpus": len(cap.gpus) if cap else None,
                    "gpus_free": len(cap.free_gpus) if cap else None,
                    "tasks": cap.tasks if cap else 0,
                    "load": averages[0] if isinstance(averages, list) and averages else None,
                    "memory_used": sample.get("memory_used"),
                    "error": self.controller.host_errors.get(h.name),
                    "drained": self.controller.hosts.drained.get(h.name),
                }
            )
        await r.end({"ok": True, "hosts": rows})

    async def queues(self, request: dict[str, Any], r: Responder) -> None:
        self.recording.flush()
        counts = self.recording.store.counts_by_queue_state()
        rows = [
            {
                "name": q.name,
                "priority": q.priority,
                "state": q.state,
                "compute_environments": list(q.compute_environments),
                "counts": counts.get(q.name, {}),
            }
            for q in sorted(self.controller.inventory.queues.values(), key=lambda q: -q.priority)
        ]
        await r.end({"ok": True, "queues": rows})

    # --- changes while it runs ------------------------------------------------

    def _names(self, request: dict[str, Any]) -> list[str]:
        names = request.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise UsageError("hosts: give one or more host names")
        return names

    async def drain(self, request: dict[str, Any], r: Responder) -> None:
        names = self.controller.drain(self._names(request), str(request.get("reason") or ""))
        await r.end({"ok": True, "hosts": names})

    async def resume(self, request: dict[str, Any], r: Responder) -> None:
        await r.end({"ok": True, "hosts": self.controller.resume(self._names(request))})

    async def ce(self, request: dict[str, Any], r: Responder) -> None:
        managed = {v["name"]: v for v in self.controller.managed.views()}
        rows = []
        for name, ce in self.controller.inventory.compute_environments.items():
            rows.append(
                managed.get(name)
                or {"name": name, "type": "UNMANAGED", "state": ce.state, "hosts": list(ce.hosts)}
            )
        await r.end(
            {"ok": True, "compute_environments": rows, "changes": self.controller.changes[-100:]}
        )

    async def ce_update(self, request: dict[str, Any], r: Responder) -> None:
        sizes = {}
        for key in ("min_vcpus", "max_vcpus", "desired_vcpus"):
            v = request.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise UsageError(f"ce update: {key} {v!r} is not a whole number >= 0")
            sizes[key] = v
        state = request.get("state")
        change = self.controller.update_ce(
            str(request.get("name") or ""), state=None if state is None else str(state), **sizes
        )
        await r.end({"ok": True, "change": change})

    async def queue_update(self, request: dict[str, Any], r: Responder) -> None:
        priority = request.get("priority")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            raise UsageError(f"queues update: priority {priority!r} is not a whole number")
        state = request.get("state")
        change = self.controller.update_queue(
            str(request.get("name") or ""),
            priority=priority,
            state=None if state is None else str(state),
        )
        await r.end({"ok": True, "change": change})

    async def reload(self, request: dict[str, Any], r: Responder) -> None:
        """Read the inventory file again (a file only: ``local``, ``slurm``... are not files)."""
        from mnp.spec import load_inventory

        source = self.service.inventory.source
        if source in ("local", "slurm", "pbs") or source.startswith(("hostfile:", "<")):
            raise UsageError(f"reload: the inventory is {source!r}, not a file to read again")
        new = await asyncio.to_thread(load_inventory, source)
        summary = self.controller.reload(new)
        self.service.inventory = self.controller.inventory
        await r.end({"ok": True, **summary})
