"""Commands about the installation rather than one job: ``controller start|stop|status``,
``hosts``, ``queues``, ``purge``, ``validate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mnp import views
from mnp.cli.common import (
    client,
    common_options,
    controller_args,
    inventory_key,
    open_store,
    print_json,
    settings,
    warn,
)
from mnp.errors import InfraError, UsageError

if TYPE_CHECKING:
    from mnp import hostcheck


@click.group()
def controller() -> None:
    """The controller daemon: start, stop, status."""


@controller.command(name="start")
@click.option("--foreground", is_flag=True, help="Run in this process (logs to stderr).")
@click.option(
    "--retention",
    metavar="DURATION|never",
    envvar="MNP_RETENTION",
    help="Purge finished jobs this long after they end, e.g. 30d (env MNP_RETENTION; "
    "default never).",
)
@common_options
@click.pass_context
def controller_start(
    ctx: click.Context, /, foreground: bool, retention: str | None, **o: Any
) -> None:
    """Start the controller for --home with --inventory (default: the local inventory).

    \b
    Examples:
      mnp controller start --inventory cluster.toml
      mnp controller start --retention 30d    # purge jobs 30 days after they end
    """
    from mnp import daemon
    from mnp.purge import parse_retention

    s = settings(ctx, **o)
    home = Path(s["home"]).expanduser()
    keep_for = parse_retention(retention)
    if foreground:
        from mnp.service import make_handler_factory
        from mnp.spec import resolve_inventory

        inventory = resolve_inventory(s["inventory"], s["local_nodes"])
        factory = make_handler_factory(home, inventory, inventory_key(s), keep_for)
        sys.exit(daemon.serve_forever(home, factory))
    extra = controller_args(s)
    if retention is not None:
        extra += ["--retention", retention]
    pid = daemon.start_background(home, extra)
    click.echo(f"controller running (pid {pid}), home {home}")
    with client(s, start=False) as api:
        for w in api.request("info").get("warnings", ()):
            warn(w)


@controller.command(name="stop")
@common_options
@click.pass_context
def controller_stop(ctx: click.Context, /, **o: Any) -> None:
    """Stop the controller; jobs stay stored and resume at the next start."""
    from mnp import daemon

    s = settings(ctx, **o)
    if daemon.stop(Path(s["home"]).expanduser()):
        click.echo("controller stopped")
    else:
        click.echo("no controller was running")


@controller.command(name="status")
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def controller_status(ctx: click.Context, /, as_json: bool, **o: Any) -> None:
    """Whether a controller runs for --home (exit 0) or not (exit 3)."""
    import json as jsonlib

    from mnp import daemon

    s = settings(ctx, **o)
    st = daemon.status(Path(s["home"]).expanduser())
    if as_json:
        click.echo(jsonlib.dumps(st))
    elif st.get("running"):
        click.echo(f"controller running (pid {st.get('pid')}), home {st.get('home')}")
    else:
        click.echo(f"no controller running, home {st.get('home')}")
    if not st.get("running"):
        sys.exit(3)


@click.group(
    invoke_without_command=True,
    epilog="""\b
Examples:
  mnp hosts --inventory cluster.toml --check
  mnp hosts drain node3 --reason "disk check"   # no new work; running work finishes
  mnp hosts resume node3
  mnp hosts --inventory slurm --json     # inside an allocation; connects to nothing
""",
)
@click.option("--check", is_flag=True, help="Connect to every host and report what was found.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@common_options
@click.pass_context
def hosts(ctx: click.Context, /, check: bool, as_json: bool, **o: Any) -> None:
    """Inventory hosts: what they declare, or with --check what each one really is.

    With --check, exits 0 only if every host is usable (3 otherwise).
    """
    if ctx.invoked_subcommand is not None:
        return
    import asyncio
    import json as jsonlib

    from mnp import hostcheck
    from mnp.spec import resolve_inventory, unverified_warning
    from mnp.transport import transports_for

    s = settings(ctx, **o)
    if not check and not o.get("inventory"):
        from mnp.api.client import ApiClient

        running = ApiClient.connect(Path(s["home"]))
        if running is not None:  # the running controller knows what is free now
            with running:
                live = running.request("hosts")["hosts"]
            if as_json:
                click.echo(jsonlib.dumps(live, indent=2))
            else:
                cols = ["name", "address", "state", "vcpus", "vcpus_free", "gpus", "gpus_free"]
                for row in live:
                    row["memory_used"] = views.memory_cell(row.get("memory_used"))
                    row["load"] = "-" if row.get("load") is None else f"{row['load']:.2f}"
                click.echo(views.table(live, [*cols, "tasks", "load", "memory_used"]))
            return
    inventory = resolve_inventory(s["inventory"], s["local_nodes"])
    if not check:
        rows = [views.declared_host(inventory, h) for h in inventory.hosts]
        if as_json:
            click.echo(jsonlib.dumps(rows, indent=2))
        else:
            click.echo(
                views.table(
                    rows,
                    [
                        "name",
                        "address",
                        "transport",
                        "vcpus",
                        "memory",
                        "gpus",
                        "labels",
                        "compute_environments",
                    ],
                )
            )
        return

    warn(unverified_warning(inventory))

    async def probe() -> list[hostcheck.HostReport]:
        transports = transports_for(inventory)
        try:
            return await hostcheck.check_hosts(inventory, transports, "check")
        finally:
            for t in transports.values():
                await t.close()

    reports = asyncio.run(probe())
    if as_json:
        click.echo(jsonlib.dumps(hostcheck.to_json(reports), indent=2))
    else:
        click.echo(hostcheck.format_table(reports))
    bad = [r for r in reports if not r.ok]
    if bad:
        raise InfraError(f"{len(bad)} of {len(reports)} hosts unusable")


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def queues(ctx: click.Context, /, as_json: bool, **o: Any) -> None:
    """Queues: priority, compute environments, jobs by state.

    \b
    Example:
      mnp queues
      mnp queues update default --priority 10 --state DISABLED
    """
    if ctx.invoked_subcommand is not None:
        return
    import json as jsonlib

    s = settings(ctx, **o)
    from mnp.api.client import ApiClient

    running = ApiClient.connect(Path(s["home"]))
    if running is not None:
        with running:
            rows = running.request("queues")["queues"]
    else:
        from mnp.spec import resolve_inventory

        inventory = resolve_inventory(s["inventory"], s["local_nodes"])
        store = open_store(s)
        counts = store.counts_by_queue_state() if store is not None else {}
        rows = [
            {
                "name": q.name,
                "priority": q.priority,
                "state": q.state,
                "compute_environments": list(q.compute_environments),
                "counts": counts.get(q.name, {}),
            }
            for q in sorted(inventory.queues.values(), key=lambda q: -q.priority)
        ]
    if as_json:
        click.echo(jsonlib.dumps(rows, indent=1))
        return
    table = [
        {
            "name": r["name"],
            "priority": r["priority"],
            "state": r["state"],
            "compute_environments": r["compute_environments"],
            "jobs": " ".join(f"{k}={v}" for k, v in sorted(r["counts"].items())) or "-",
        }
        for r in rows
    ]
    click.echo(views.table(table, ["name", "priority", "state", "compute_environments", "jobs"]))


@click.command(
    epilog="""\b
Examples:
  mnp purge --before 7d                 # jobs that ended more than 7 days ago
  mnp purge --state SUCCEEDED           # every job that succeeded
  mnp purge                             # every finished job
"""
)
@click.option(
    "--before",
    "older_than",
    metavar="DURATION",
    help="Only jobs that ended more than DURATION ago (7d, 12h, 90m); default: any time.",
)
@click.option(
    "--state",
    type=click.Choice(["SUCCEEDED", "FAILED"], case_sensitive=False),
    help="Only jobs that ended in this state (default: both).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the purged ids.")
@common_options
@click.pass_context
def purge(
    ctx: click.Context, /, older_than: str | None, state: str | None, as_json: bool, **o: Any
) -> None:
    """Delete finished jobs: their records, array children, events and logs.

    Unfinished jobs, and finished ones that an unfinished job depends on, are
    kept. Job ids and event seq numbers go on from where they were. Works with
    or without a running controller (without one, a controller that starts
    meanwhile waits for the purge to end).
    """
    import json as jsonlib

    from mnp import purge as purging
    from mnp.spec import parse_duration

    s = settings(ctx, **o)
    seconds = None
    if older_than is not None:
        try:
            seconds = parse_duration(older_than)
        except ValueError as e:
            raise UsageError(f"--before: {e}") from None
    home = Path(s["home"]).expanduser()
    out = purging.purge(home, seconds, state.upper() if state else None)
    ids, errors = out.job_ids, out.log_errors
    for error in errors:
        warn(f"cannot remove {error}")
    if as_json:
        click.echo(jsonlib.dumps({"purged": len(ids), "job_ids": ids, "log_errors": errors}))
    elif not ids:
        click.echo("nothing to purge")
    else:
        few = ": " + " ".join(ids) if len(ids) <= 20 else ""
        click.echo(f"purged {len(ids):,} job{'s' if len(ids) != 1 else ''}{few}")


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON list, an entry per file.")
def validate(files: tuple[str, ...], as_json: bool) -> None:
    """Check job definitions and inventories without running anything.

    Stops at the first file that is not valid (exit 2). With --json every file is
    checked and listed: [{"file", "kind", "ok", "summary" | "error"}, ...]; the first
    error is also on stderr, and the exit code is 2 if any file is not valid.

    \b
    Examples:
      mnp validate nodegroups/*.toml examples/inventories/cluster.toml
      mnp validate --json job.toml
    """
    from mnp import spec

    if not as_json:
        for f in files:
            click.echo(spec.validate_file(f))
        return
    reports = [spec.validation_report(f) for f in files]
    print_json(reports)
    bad = next((r for r in reports if not r["ok"]), None)
    if bad is not None:
        raise UsageError(bad["error"])


# --- changes while it runs (the running controller's; issue 15) ---------------------


def _ask(ctx: click.Context, o: dict[str, Any], op: str, **request: Any) -> dict[str, Any]:
    from mnp.api.client import ApiClient

    s = settings(ctx, **o)
    running = ApiClient.connect(Path(s["home"]))
    if running is None:
        raise UsageError(f"no controller running for {s['home']}; start one: mnp controller start")
    with running:
        answer: dict[str, Any] = running.request(op, **request)
    return answer


_STATE = click.Choice(["ENABLED", "DISABLED"], case_sensitive=False)


@hosts.command(name="drain")
@click.argument("names", nargs=-1, required=True)
@click.option("--reason", default="", help="Why (shown by mnp hosts).")
@common_options
@click.pass_context
def hosts_drain(ctx: click.Context, /, names: tuple[str, ...], reason: str, **o: Any) -> None:
    """No new work on these hosts; what runs there finishes."""
    done = _ask(ctx, o, "drain", names=list(names), reason=reason)["hosts"]
    click.echo(f"drained {' '.join(done)}")


@hosts.command(name="resume")
@click.argument("names", nargs=-1, required=True)
@common_options
@click.pass_context
def hosts_resume(ctx: click.Context, /, names: tuple[str, ...], **o: Any) -> None:
    """These hosts take work again."""
    done = _ask(ctx, o, "resume", names=list(names))["hosts"]
    click.echo(f"resumed {' '.join(done)}")


@queues.command(name="update")
@click.argument("name")
@click.option("--priority", type=click.IntRange(0, 1000), help="0-1000, as in the inventory.")
@click.option("--state", type=_STATE)
@common_options
@click.pass_context
def queues_update(
    ctx: click.Context, /, name: str, priority: int | None, state: str | None, **o: Any
) -> None:
    """Change a queue's priority or state (DISABLED: refuses new jobs, runs what it holds)."""
    state = state.upper() if state else None
    change = _ask(ctx, o, "queue_update", name=name, priority=priority, state=state)["change"]
    click.echo(f"queue {name}: priority {change['priority']}, {change['state']}")


@click.group(name="ce", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def ce(ctx: click.Context, /, as_json: bool, **o: Any) -> None:
    """Compute environments of the running controller, with managed allocations and
    their scheduler ids.

    \b
    Examples:
      mnp ce
      mnp ce update burst --desired-vcpus 8 --max-vcpus 64
      mnp ce update burst --state DISABLED
    """
    import json as jsonlib

    if ctx.invoked_subcommand is not None:
        return
    answer = _ask(ctx, o, "ce")
    rows = answer["compute_environments"]
    if as_json:
        click.echo(jsonlib.dumps(answer, indent=2))
        return
    for row in rows:
        line = f"{row['name']}  {row['type']}  {row['state']}  hosts: {len(row['hosts'])}"
        if row["type"] == "MANAGED":
            line += (
                f"  vcpus {row['min_vcpus']}/{row['desired_vcpus']}/{row['max_vcpus']}"
                f" (min/desired/max)  provider {row['provider']}"
            )
        click.echo(line)
        for a in row.get("allocations", ()):
            nodes = ",".join(a["nodes"]) or f"{a['nodes_asked']} node(s)"
            click.echo(
                f"  allocation {a['id']}  {a['state']} ({a['scheduler_state']})  {nodes}"
                + (f"  {a['reason']}" if a["reason"] else "")
            )
        if row.get("error"):
            click.echo(f"  error: {row['error']}")


@ce.command(name="update")
@click.argument("name")
@click.option("--state", type=_STATE)
@click.option("--min-vcpus", type=click.IntRange(0, 10_000_000))
@click.option("--max-vcpus", type=click.IntRange(0, 10_000_000))
@click.option("--desired-vcpus", type=click.IntRange(0, 10_000_000))
@common_options
@click.pass_context
def ce_update(
    ctx: click.Context,
    /,
    name: str,
    state: str | None,
    min_vcpus: int | None,
    max_vcpus: int | None,
    desired_vcpus: int | None,
    **o: Any,
) -> None:
    """Change a compute environment while the controller runs."""
    change = _ask(
        ctx,
        o,
        "ce_update",
        name=name,
        state=state.upper() if state else None,
        min_vcpus=min_vcpus,
        max_vcpus=max_vcpus,
        desired_vcpus=desired_vcpus,
    )["change"]
    click.echo(" ".join(f"{k}={v}" for k, v in change.items() if k != "kind"))


@controller.command(name="reload")
@common_options
@click.pass_context
def controller_reload(ctx: click.Context, /, **o: Any) -> None:
    """Read the inventory file again: hosts, compute environments and queues added,
    removed or changed. Running jobs are untouched; a removed host is drained and
    leaves once idle."""
    answer = _ask(ctx, o, "reload")
    for key in ("hosts_added", "hosts_removed", "hosts_changed", "ces", "queues"):
        if answer.get(key):
            click.echo(f"{key.replace('_', ' ')}: {' '.join(answer[key])}")
    click.echo("inventory reloaded")


COMMANDS = (controller, hosts, queues, ce, purge, validate)
