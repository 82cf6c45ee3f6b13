"""``mnp run`` against a running controller: send the ``run`` request, print what the
job writes as it comes, terminate the job on Ctrl-C, and exit with its code.

Two callers: the ``run`` command (``mnp.cli.jobs``: it sends the definition it built)
and the quick client (``mnp.quickrun``: it sends the command line, and the controller
builds the definition). Cheap to import: no click, no ``mnp.spec``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnp.errors import MnpError

if TYPE_CHECKING:
    from types import FrameType

    from mnp.api.client import ApiClient
    from mnp.sink import Progress


def run_through(
    api: ApiClient,
    home: Path,
    fields: dict[str, Any],
    *,
    verbose: bool = False,
    progress_of: tuple[int, str] | None = None,
    refusal_returns: bool = False,
) -> int | None:
    """Send ``run`` with ``fields`` on ``api`` and follow the job to its end; its exit
    code. ``progress_of`` (total, unit): draw a progress line on stderr.
    ``refusal_returns``: a request the controller refuses (before it accepted a job)
    returns None, with nothing printed, instead of raising its error."""
    from mnp import client as layer
    from mnp.api.client import ApiClient
    from mnp.sink import INTERRUPTED, STDOUT_CLOSED, ProgressThread, RunStream

    interrupted = 0

    def end_job(reason: str) -> None:
        if view.job_id is not None:
            with ApiClient.connect(home) as other:  # type: ignore[union-attr]
                layer.end_job(other, "terminate", view.job_id, reason)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted > 1:  # again: stop waiting; the controller ends the job of a
            raise KeyboardInterrupt  # client that went away
        end_job(INTERRUPTED)

    view = RunStream(on_stdout_closed=lambda: end_job(STDOUT_CLOSED))
    view.progress_of = progress_of
    drawing: ProgressThread | None = None
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.signal(sig, on_signal) for sig in caught}
    try:
        try:
            stream = api.stream("run", **fields)
            accepted = next(stream)
        except MnpError:
            if not refusal_returns or interrupted:
                raise
            for sig, handler in before.items():
                signal.signal(sig, handler)
            return None
        view.feed(accepted)
        for msg in stream:
            view.feed(msg)
            if drawing is None and view.progress is not None:
                drawing = ProgressThread(view.sink, view.progress, _new_events(home, view.progress))
    finally:
        if drawing is not None:
            drawing.stop()
    return view.finish(verbose=verbose, interrupted=interrupted > 0)


def _new_events(home: Path, progress: Progress) -> Callable[[], list[dict[str, Any]]]:
    """The job's events committed since the last call (the store, read-only)."""
    from mnp import client as layer

    since = 0

    def poll() -> list[dict[str, Any]]:
        nonlocal since
        store = layer.open_store(home)
        if store is None:
            return []
        with store:
            found = [dict(e) for e in store.events_since(since, job_id=progress.job_id)]
        if found:
            since = max(int(e["seq"]) for e in found)
        return found

    return poll
