"""``mnp run`` when no controller runs for its home: this process is that controller while
its job runs.

It takes the home's lock and runs the very ``Service`` a daemon runs -- the job is
recorded in ``mnp.db`` with its attempts, events (``events.jsonl``) and logs, and ids go
on from the last job -- and serves the control socket meanwhile, so ``mnp list``,
``describe``, ``logs``, and other ``mnp run``/``submit`` in the same home (a submission
script's background runs) work as with a daemon. Its own job streams to this process's
terminal through the socket's op table (its ``run`` op, ``mnp.daemon.dispatch``), exactly
as a socket client's would. It stops once its job and every job it accepted meanwhile
have ended. It does not take back jobs an earlier daemon left unfinished: the next
daemon does.

Signals: the first SIGINT/SIGTERM/SIGHUP terminates every job it holds (``mnp run``'s
Ctrl-C); another one stops at once (the agents kill what is left). ``mnp controller
stop`` stops it like a daemon: jobs still running are left for the next controller.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from mnp.api import Responder
from mnp.controller import tune_gc
from mnp.daemon import Daemon, Lock, Ops, ShutdownFn, dispatch, prepare_home, serve
from mnp.errors import InfraError, MnpError
from mnp.model import Inventory, JobDefinition
from mnp.sink import INTERRUPTED, STDOUT_CLOSED, Progress, RunStream, wants_progress
from mnp.spec import definition_to_dict

log = logging.getLogger("mnp")


class _Terminal:
    """The run's own client, in this process: a ``Responder`` that prints (``RunStream``)."""

    def __init__(self, view: RunStream) -> None:
        self.view = view
        self.done = False
        self.error: MnpError | None = None
        self.closed = False

    async def wait_closed(self) -> None:
        await asyncio.get_running_loop().create_future()  # a terminal never hangs up

    async def send(self, msg: Mapping[str, Any]) -> None:
        self.view.feed({"ok": True, **msg})

    async def end(self, msg: Mapping[str, Any] | None = None) -> None:
        self.done = True
        self.view.feed({"ok": True, **(msg or {}), "end": True})

    async def fail(self, exc: MnpError) -> None:
        self.done = True
        self.error = exc


def try_hosted_run(
    home: Path, inventory: Inventory, inventory_key: str, defn: JobDefinition, *, verbose: bool
) -> int | None:
    """Run ``defn`` as ``home``'s controller; None (nothing done) when another process
    holds the home (a controller starting or stopping, or one on another host of a shared
    file system), for the caller to run the job unrecorded."""
    home = prepare_home(home)
    lock = Lock(home)
    if not lock.acquire(wait=0.2):
        return None
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("mnp: %(message)s"))
    handler.setLevel(logging.ERROR)  # warnings reach the terminal with the run's first answer
    log.addHandler(handler)
    try:
        tune_gc()
        return asyncio.run(_host(home, inventory, inventory_key, defn, verbose))
    finally:
        log.removeHandler(handler)
        lock.release()


async def _host(
    home: Path, inventory: Inventory, inventory_key: str, defn: JobDefinition, verbose: bool
) -> int:
    from mnp.service import Service

    service: Service | None = None
    signals = 0
    stop_serving: Any = None

    def end_job(reason: str) -> None:
        if service is not None and view.job_id in service.controller.jobs:
            service.controller.terminate(view.job_id, reason)

    view = RunStream(on_stdout_closed=lambda: end_job(STDOUT_CLOSED))
    if wants_progress():
        view.progress_of = Progress.of(defn)
    terminal = _Terminal(view)

    def on_signal(signame: str) -> None:
        nonlocal signals
        signals += 1
        if service is None:
            return
        if signals == 1:
            for job in list(service.controller.jobs.values()):
                if job.parent is None and not job.done:
                    service.controller.terminate(job.id, INTERRUPTED)
        elif stop_serving is not None:
            stop_serving()

    async def make_handler(daemon: Daemon) -> tuple[Ops, ShutdownFn]:
        nonlocal service, stop_serving
        stop = stop_serving = daemon.stop
        service = Service(home, inventory, inventory_key)
        ops = service.ops(daemon)
        t0 = time.monotonic()

        def on_event(event: dict[str, Any]) -> None:
            if verbose:  # state changes as they happen, as the bare in-process controller does
                view.sink.write(2, f"mnp: {json.dumps(event)}\n")
            view.show_progress(event)

        service.controller.on_event = on_event
        try:
            await service.start(restore=False)
        except MnpError as e:  # no host reachable...: said in one line, not logged
            terminal.error = e
            await service.shutdown()
            stop()
            return ops, _nothing
        for host, err in service.controller.host_errors.items():
            view.sink.write(2, f"mnp: host {host} unusable: {err}\n")
        if verbose:
            n, took = len(service.controller.agents), time.monotonic() - t0
            view.sink.write(2, f"mnp: {n} agent(s) ready in {took:.3f}s\n")
        request = {"op": "run", "definition": definition_to_dict(defn), "source": defn.source}
        own = asyncio.ensure_future(dispatch(ops)(request, cast(Responder, terminal)))

        async def until_idle() -> None:
            try:
                await own
            except MnpError as e:
                terminal.error = e
            assert service is not None
            jobs = service.controller.jobs
            while True:  # the jobs other clients gave it meanwhile
                busy = next((j for j in jobs.values() if j.parent is None and not j.done), None)
                if busy is None:
                    break
                await service.controller.wait(busy)
            stop()

        watcher = asyncio.ensure_future(until_idle())

        async def shutdown() -> None:
            assert service is not None
            await service.shutdown()
            await asyncio.wait([own, watcher], timeout=5)

        return ops, shutdown

    code = await serve(home, make_handler, on_signal=on_signal)
    if terminal.error is not None:
        raise terminal.error
    if not terminal.done:
        if code:  # the controller could not start: serve logged why
            raise InfraError(f"mnp run could not start its controller (see above); home {home}")
        view.sink.write(2, f"mnp: job {view.job_id} interrupted again: killing it now\n")
        return 130
    return view.finish(verbose=verbose, interrupted=signals > 0)


async def _nothing() -> None:
    return None


__all__ = ["try_hosted_run"]
