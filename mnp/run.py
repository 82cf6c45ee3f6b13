"""``mnp run`` with an in-process controller: submit one job, stream it, exit with it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mnp.controller import Controller, tune_gc
from mnp.jobs import Job, TaskRun, job_exit_code, output_label
from mnp.model import Inventory, JobDefinition, JobState
from mnp.sink import INTERRUPTED, STDOUT_CLOSED, Progress, Sink, wants_progress
from mnp.transport import transports_for
from mnp.views import PrefixedLines


class OutputPrinter:
    """Writes task output line by line, prefixed with the node or index when there are several."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.sink = Sink(stdout=stdout, stderr=stderr)
        self.lines = PrefixedLines()

    def _prefix(self, job: Job, task: TaskRun) -> str:
        label = output_label(job, task)
        return f"{label}: " if label is not None else ""

    def __call__(self, job: Job, task: TaskRun, fd: int, data: str) -> None:
        self.sink.write(fd, self.lines.feed((task.tid, fd), data, self._prefix(job, task)))

    def flush_task(self, job: Job, task: TaskRun) -> None:
        for fd in (1, 2):
            self.sink.write(fd, self.lines.rest((task.tid, fd), self._prefix(job, task)))


async def run_async(
    defn: JobDefinition, inventory: Inventory, *, verbose: bool = False, printer: Any = None
) -> tuple[int, Job]:
    printer = printer or OutputPrinter()
    progress: Progress | None = None
    sink: Sink | None = printer.sink if isinstance(printer, OutputPrinter) else None

    def on_event(event: dict[str, Any]) -> None:
        if verbose:
            if sink is not None:
                sink.write(2, "mnp: " + json.dumps(event) + "\n")
            else:
                sys.stderr.write("mnp: " + json.dumps(event) + "\n")
        if progress is not None and sink is not None:
            progress.feed(event)
            sink.status(progress.line())

    controller = Controller(
        inventory,
        transports_for(inventory),
        on_output=printer,
        on_task_end=getattr(printer, "flush_task", None),
        on_event=on_event,
    )
    t0 = time.monotonic()
    try:
        await controller.start()
        for host, err in controller.host_errors.items():
            sys.stderr.write(f"mnp: host {host} unusable: {err}\n")
        if verbose:
            sys.stderr.write(
                f"mnp: {len(controller.agents)} agent(s) ready in {time.monotonic() - t0:.3f}s\n"
            )
        job = controller.submit(defn)
        shape = Progress.of(defn)
        if shape is not None and sink is not None and wants_progress(sink.streams[2]):
            progress = Progress(job.id, *shape)
        loop = asyncio.get_running_loop()
        forced: asyncio.Future[Any] = loop.create_future()
        signals = 0

        def interrupt() -> None:
            """First signal: terminate the job (its teardown, kill_grace). Another one:
            stop waiting; closing the agents kills what is left at once."""
            nonlocal signals
            signals += 1
            if signals == 1:
                controller.terminate(job.id, INTERRUPTED)
            elif not forced.done():
                forced.set_result(None)

        def stdout_closed() -> None:
            controller.terminate(job.id, STDOUT_CLOSED)

        if isinstance(printer, OutputPrinter):
            printer.sink.on_closed = stdout_closed
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, interrupt)
        waiter: asyncio.Future[Any] = asyncio.ensure_future(controller.wait(job))
        try:
            await asyncio.wait([waiter, forced], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            waiter.cancel()
            if sink is not None:
                sink.status("")
        if not job.done:  # a second signal: the job ends with the agents
            sys.stderr.write(f"mnp: job {job.id} interrupted again: killing it now\n")
            return 130, job
        if verbose:
            for a in job.attempts:
                sys.stderr.write(
                    f"mnp: job {job.id} attempt {a.number}: {json.dumps(a.timings())}\n"
                )
        return job_exit_code(job), job
    finally:
        await controller.close()


def run_job(
    defn: JobDefinition,
    inventory_spec: str | None,
    local_nodes: int,
    *,
    verbose: bool,
    home: Path | None = None,
    inventory_key: str = "",
) -> int:
    """``mnp run`` with no controller answering for ``home``: this process becomes it
    (``mnp.hosted``: the job is recorded like any other). Without a home, or when another
    process holds it, the job runs unrecorded in a bare in-process controller."""
    from mnp.spec import resolve_inventory, unverified_warning

    inventory = resolve_inventory(inventory_spec, local_nodes)
    if home is not None:
        from mnp.daemon import Lock
        from mnp.hosted import try_hosted_run

        code = try_hosted_run(home, inventory, inventory_key, defn, verbose=verbose)
        if code is not None:
            return code
        holder = Lock(home).holder()
        sys.stderr.write(
            f"mnp: warning: {home} is held by another process (pid {holder or '?'}) that does "
            "not answer on its socket: this job is not recorded there\n"
        )
    warning = unverified_warning(inventory)
    if warning:
        sys.stderr.write(f"mnp: warning: {warning}\n")
    tune_gc()
    code, job = asyncio.run(run_async(defn, inventory, verbose=verbose))
    if job.state is JobState.FAILED and job.reason and job.reason != STDOUT_CLOSED:
        sys.stderr.write(f"mnp: job {job.id} FAILED: {job.reason}\n")
    return code
