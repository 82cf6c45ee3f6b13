"""Commands that read jobs from the store, read-only, with or without a controller:
``list``, ``describe``, ``logs``, ``events``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mnp import views
from mnp.cli.common import INT_MAX, common_options, open_store, settings
from mnp.errors import UsageError

if TYPE_CHECKING:
    from mnp.store import Store

STATES = ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"]

LIST_FINISHED = 1000
"""Finished jobs ``mnp list`` shows by default, the newest; ``--all`` shows every one."""


@click.command(name="list")
@click.option("--queue", help="Only this queue.")
@click.option("--state", type=click.Choice(STATES, case_sensitive=False))
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
    store = open_store(s)
    rows: list[Any] = []
    left_out = 0
    if store is not None:
        with store:
            rows, left_out = (store.list_page if as_json else store.table_page)(
                queue=queue,
                state=state.upper() if state else None,
                parents_only=not children,
                newest=limit,
                finished=None if show_all or limit is not None else LIST_FINISHED,
            )
    if as_json:
        import json as jsonlib

        click.echo(jsonlib.dumps(rows, indent=1))
    elif rows:
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
    if left_out:
        jobs = "job" if left_out == 1 else "jobs"
        click.echo(f"mnp: {left_out:,} older finished {jobs} not shown; --all shows them", err=True)


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
    import json as jsonlib

    s = settings(ctx, **o)
    store = open_store(s)
    job = None
    if store is not None:
        with store:
            found = store.resolve(job_id)
            job = store.get_job(found) if found is not None else None
            if job is not None and job.get("array_size"):
                job["failed_children"] = store.children(job["id"], state="FAILED", limit=5)
    if job is None:
        raise UsageError(f"job {job_id} does not exist")
    job["root_cause"] = views.root_cause(job)
    if as_json:
        click.echo(jsonlib.dumps(job, indent=1))
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

    from mnp import jobref
    from mnp.jobid import JobId

    s = settings(ctx, **o)
    store = open_store(s)
    if store is None:
        raise UsageError(f"job {jobref.split(target)[0]} does not exist")
    given = target
    resolved = store.resolve(given)
    if resolved is None:
        raise UsageError(f"job {jobref.split(given)[0]} does not exist")
    target = _known_target(store, resolved)
    wanted = JobId.parse(target)
    root = wanted.top
    folder = Path(s["home"]) / "logs" / root
    suffix = ".err" if stderr else ".out"
    offsets: dict[Path, int] = {}
    lines = views.PrefixedLines()

    def matches(name: str) -> bool:
        if target == root:
            return True
        raw = name[: -len(suffix)]
        tid = JobId.parse_or_none(raw)
        return tid is not None and str(tid) == raw and tid.within(wanted)

    def label(path: Path) -> str:
        tid = path.name[: -len(suffix)]
        rest = tid[len(root) :].lstrip(":#")
        return f"{rest}: " if rest else ""

    def pump(final: bool) -> None:
        files = sorted(folder.glob("*" + suffix)) if folder.is_dir() else []
        files = [p for p in files if matches(p.name) and p.is_file()]  # never a FIFO
        many = len(files) > 1 or (target == root and any(label(p) for p in files))
        for path in files:
            # bytes that are not UTF-8 come back as the same bytes on stdout
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.seek(offsets.get(path, 0))
                data = f.read()
                offsets[path] = f.tell()
            prefix = label(path) if many else ""
            sys.stdout.write(lines.feed(path, data, prefix))
            if final:
                sys.stdout.write(lines.rest(path, prefix))
        sys.stdout.flush()

    while True:
        job = store.get_job(root)
        done = job is None or job["state"] in ("SUCCEEDED", "FAILED")  # None: purged meanwhile
        pump(final=done or not follow)
        if done or not follow:
            break
        time.sleep(0.2)
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
    import time

    from mnp import jobref

    s = settings(ctx, **o)
    store = open_store(s)
    if job_id is not None:
        if store is None:
            raise UsageError(f"job {job_id} does not exist")
        resolved = store.resolve(job_id)  # a name: the newest job of that name
        if resolved is None:
            raise UsageError(f"job {jobref.split(job_id)[0]} does not exist")
        job_id = _known_target(store, resolved)
    while True:
        store = store or open_store(s)
        if store is not None:
            for ev in store.events_since(since, job_id=job_id):
                since = max(since, int(ev["seq"]))
                sys.stdout.write(jsonlib.dumps(ev) + "\n")
            sys.stdout.flush()
        if not follow:
            break
        time.sleep(0.2)


def _known_target(store: Store, target: str) -> str:
    """``JOB``, ``JOB:INDEX``, ``JOB#NODE`` or ``JOB#NODE.TASK`` (``JOB:INDEX#NODE`` too)
    in its canonical spelling, once checked to exist; else a UsageError (exit 2) that
    says what does exist."""
    from mnp.jobid import JobId

    given = JobId.parse_or_none(target)
    if given is None:
        raise UsageError(f"job {target} does not exist; name one as JOB, JOB:INDEX or JOB#NODE")
    top = JobId(given.root)
    root = top.top
    job = store.get_job(root)
    if job is None:
        raise UsageError(f"job {root} does not exist")
    name = top
    if given.index is not None:
        size = job.get("array_size")
        name = top.child(given.index)
        if not size:
            raise UsageError(f"job {name} does not exist: job {root} is not an array")
        if given.index >= size:
            last = top.child(size - 1)
            raise UsageError(f"job {name} does not exist: children are {top.child(0)}..{last}")
        job = store.get_job(str(name)) or job
    if given.node is not None:
        nodes = job.get("num_nodes")
        child = name
        name = child.at_node(given.node)
        if not nodes:
            raise UsageError(f"node {name} does not exist: job {child} is not a multi-node job")
        if given.node >= nodes:
            last = child.at_node(nodes - 1)
            raise UsageError(f"node {name} does not exist: nodes are {child.at_node(0)}..{last}")
        if given.task is not None:
            slots = _tasks_per_node(job.get("definition"), given.node)
            name = name.at_task(given.task)
            if slots is not None and given.task >= slots:
                first, last = name.job.at_node(given.node).at_task(0), name.at_task(slots - 1)
                raise UsageError(f"task {name} does not exist: tasks are {first}..{last}")
    return str(name)


def _tasks_per_node(definition: Any, node: int) -> int | None:
    """How many tasks node ``node`` of a stored multi-node definition runs (None: unknown)."""
    try:
        for g in definition["multinode"]["groups"]:
            start, _, end = str(g["target_nodes"]).partition(":")
            if int(start) <= node <= int(end):
                return int(g.get("tasks_per_node") or 1)
    except (KeyError, TypeError, ValueError):
        return None
    return None


COMMANDS = (list_, describe, logs, events)
