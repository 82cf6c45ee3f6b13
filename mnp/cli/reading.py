"""Commands that read jobs from the store, read-only, with or without a controller:
``list``, ``describe``, ``logs``, ``events``."""

from __future__ import annotations

import sys
from typing import Any

import click

from mnp import views
from mnp.cli.common import INT_MAX, common_options, home, open_store, print_json, settings

STATES = ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"]

LIST_FINISHED = 1000
"""Finished jobs ``mnp list`` shows by default, the newest; ``--all`` shows every one."""


@click.command(name="list")
@click.option("--queue", help="Only this queue.")
@click.option("--state", type=click.Choice(STATES, case_sensitive=False))
@click.option("--tag", metavar="K=V", help="Only jobs with this tag.")
@click.option("--children", is_flag=True, help="Show array children too.")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help=f"Every finished job (default: the newest {LIST_FINISHED:,}, and every unfinished one).",
)
@click.option(
    "--limit",
    type=click.IntRange(1, INT_MAX),
    default=None,
    help="At most N jobs, the newest, finished or not.",
)
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def list_(
    ctx: click.Context,
    /,
    queue: str | None,
    state: str | None,
    tag: str | None,
    children: bool,
    show_all: bool,
    limit: int | None,
    as_json: bool,
    **o: Any,
) -> None:
    """Jobs as a table: id, name, type, state, queue, nodes/size, age, reason.

    Oldest first: every unfinished job and the newest 1,000 finished ones (a
    note on stderr says how many older ones are left out); --all shows them all.

    \b
    Example:
      mnp list --state RUNNING
    """
    s = settings(ctx, **o)
    page: dict[str, Any] = dict(
        queue=queue,
        state=state.upper() if state else None,
        parents_only=not children,
        newest=limit,
        finished=None if show_all or limit is not None else LIST_FINISHED,
    )
    if as_json:
        from mnp import client as layer

        found, left_out = layer.list_jobs(home(s), tag=tag, **page)
        print_json(found)
    else:
        rows: list[Any] = []
        left_out = 0
        if tag is not None:
            from mnp import client as layer

            layer.parse_tag(tag)
        store = open_store(s)
        if store is not None:
            with store:
                rows, left_out = store.table_page(**page)
                if tag is not None:
                    keep = layer.tagged_ids(store, [str(r[0]) for r in rows], tag)
                    rows = [r for r in rows if str(r[0]) in keep]
        _print_table(rows)
    if left_out:
        jobs = "job" if left_out == 1 else "jobs"
        click.echo(f"mnp: {left_out:,} older finished {jobs} not shown; --all shows them", err=True)


def _print_table(rows: list[Any]) -> None:
    if rows:
        import time

        now, age = time.time(), views.age
        cells = [
            (i, name, kind, st, q, size, age(now - (created or now)), reason)
            for i, name, kind, st, q, size, created, reason in rows
        ]
        cols = ("id", "name", "type", "state", "queue", "nodes/size", "age", "reason")
        click.echo(views.text_table(cols, cells))
    else:
        click.echo("no jobs")


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def describe(ctx: click.Context, /, job_id: str, as_json: bool, **o: Any) -> None:
    """Everything about a job: definition, attempts, nodes or children, reasons, timings.

    JOB is an id (42, 42:7) or a name (the newest job of that name: train, train:7).

    \b
    Examples:
      mnp describe 42
      mnp describe mpi-hello --json
    """
    from mnp import client as layer

    job = layer.describe_job(home(settings(ctx, **o)), job_id)
    if as_json:
        print_json(job)
        return
    click.echo(views.describe_text(job))


@click.command()
@click.argument("target", metavar="JOB[#NODE|:INDEX]")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@click.option("--stderr", is_flag=True, help="Standard error instead of standard output.")
@common_options
@click.pass_context
def logs(ctx: click.Context, /, target: str, follow: bool, stderr: bool, **o: Any) -> None:
    """A job's output; each line prefixed with its node or index when there are several.

    JOB is an id or a name (the newest job of that name).

    \b
    Examples:
      mnp logs 42          # every task of job 42
      mnp logs 42#0        # node 0 of a multi-node job
      mnp logs 42:7 -f     # array child 7, following
      mnp logs mpi-hello#0 # node 0 of the newest job named mpi-hello
    """
    import time

    from mnp import client as layer

    s = settings(ctx, **o)
    store = open_store(s)
    try:
        reader = layer.LogReader(
            home(s), layer.resolve_target(store, target), "stderr" if stderr else "stdout"
        )
        while True:
            job = store.get_job(reader.root) if store is not None else None
            done = job is None or job["state"] in layer.FINISHED  # None: purged meanwhile
            sys.stdout.write(reader.pump(final=done or not follow))
            sys.stdout.flush()
            if done or not follow:
                break
            time.sleep(0.2)
    finally:
        if store is not None:
            store.close()


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option(
    "--since", type=click.IntRange(0, INT_MAX), default=0, help="Only events after this seq."
)
@click.option("--job", "job_id", help="Only this job, by id or name (its children and nodes too).")
@common_options
@click.pass_context
def events(ctx: click.Context, /, follow: bool, since: int, job_id: str | None, **o: Any) -> None:
    """The event stream, one JSON object a line (at least once; ``seq`` orders them).

    \b
    Example:
      mnp events --follow --since 120 --job 42
    """
    import json as jsonlib

    from mnp import client as layer

    out = sys.stdout
    for ev in layer.events(home(settings(ctx, **o)), since, job=job_id, follow=follow):
        out.write(jsonlib.dumps(ev) + "\n")
        if follow:  # each as it comes; a backlog without --follow in one go
            out.flush()
    out.flush()


COMMANDS = (list_, describe, logs, events)
