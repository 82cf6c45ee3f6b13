"""Commands that show the cluster rather than print records: ``plot`` (pictures,
``mnp.plot``) and ``top`` (a live terminal view, ``mnp.top``)."""

from __future__ import annotations

from typing import Any

import click

from mnp.cli.common import common_options, home, open_store, settings
from mnp.errors import UsageError


@click.command()
@click.argument("job_id", required=False, metavar="[JOB]")
@click.option("-o", "--output", required=True, metavar="FILE.png", help="Where to write it.")
@click.option("--since", metavar="DURATION", help="The cluster over this long back, e.g. 1h.")
@click.option(
    "--by",
    type=click.Choice(["host", "queue"]),
    default="host",
    help="With --since: one band per host or per queue (default host).",
)
@common_options
@click.pass_context
def plot(
    ctx: click.Context, /, job_id: str | None, output: str, since: str | None, by: str, **o: Any
) -> None:
    """A picture: a job's timeline, or the cluster's use over time.

    Needs matplotlib (pip install 'mnp[plot]').

    \b
    Examples:
      mnp plot 42 -o timeline.png          # nodes, ranks or children over time
      mnp plot --since 1h -o cluster.png   # attempts running at once, by host
      mnp plot --since 2h --by queue -o queues.png
    """
    import time

    from mnp import client as layer
    from mnp import plot as pictures

    if (job_id is None) == (since is None):
        raise UsageError("give a JOB (its timeline) or --since DURATION (the cluster), not both")
    now = time.time()
    s = settings(ctx, **o)
    if job_id is not None:
        job = layer.describe_job(home(s), job_id)
        store = open_store(s)
        spans: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        if store is not None:
            with store:
                spans = store.attempt_spans(root=str(job["id"]))
                if job.get("num_nodes"):
                    events = store.events_since(0, job_id=str(job["id"]))
        bars = pictures.job_bars(job, spans, events, now)
        if not bars:
            raise UsageError(f"job {job['id']} has not run yet ({job['state']}): nothing to plot")
        title = f"job {job['id']} ({job.get('name')}): {job['state']}"
        pictures.draw_timeline(bars, title, output)
    else:
        from mnp.spec.units import parse_duration

        try:
            window = parse_duration(str(since))
        except ValueError as e:
            raise UsageError(f"--since {since!r}: {e}") from None
        if window <= 0:
            raise UsageError(f"--since {since!r}: give a duration above zero, e.g. 1h")
        store = open_store(s)
        spans = []
        if store is not None:
            with store:
                spans = store.attempt_spans(since=now - window)
        times, series = pictures.usage_series(spans, now - window, now, by)
        pictures.draw_usage(times, series, f"attempts running, by {by}, last {since}", output)
    click.echo(output)


@click.command()
@common_options
@click.pass_context
def top(ctx: click.Context, /, **o: Any) -> None:
    """A live view: hosts (CPU, memory, GPUs in use; load), queues, running and waiting
    jobs, recent failures; redrawn every second, q quits.

    Hosts and queues need a running controller; jobs are read from the store.
    """
    import sys

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("mnp top needs a terminal (stdin and stdout); use mnp list, mnp hosts")
    from mnp import top as live

    live.run(home(settings(ctx, **o)))


COMMANDS = (plot, top)
