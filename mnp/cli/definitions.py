"""``mnp definitions register|list|describe|deregister``: named, versioned job
definitions kept in the home's store (``mnp.store.registry``); ``mnp submit
--definition NAME[:REV]`` submits one (``mnp.cli.jobs``)."""

from __future__ import annotations

from typing import Any

import click

from mnp.cli.common import client, common_options, home, print_json, settings


@click.group()
def definitions() -> None:
    """Named, versioned job definitions (submit one: mnp submit --definition NAME[:REV])."""


@definitions.command()
@click.argument("file", metavar="DEF.toml")
@click.option("--json", "as_json", is_flag=True, help='Print {"name", "revision"} as JSON.')
@common_options
@click.pass_context
def register(ctx: click.Context, /, file: str, as_json: bool, **o: Any) -> None:
    """Store DEF.toml as the next revision of its name; print NAME:REV.

    Starts the controller in the background if none runs.

    \b
    Example:
      mnp definitions register nodegroups/mpi-hello.toml   # mpi-hello:1
    """
    from mnp import client as layer

    with client(settings(ctx, **o), start=True) as api:
        name, revision = layer.register(api, file)
    if as_json:
        print_json({"name": name, "revision": revision})
    else:
        click.echo(f"{name}:{revision}")


@definitions.command(name="list")
@click.option("--name", help="Only the revisions of this name.")
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def list_(ctx: click.Context, /, name: str | None, as_json: bool, **o: Any) -> None:
    """Every registered revision: name, revision, status, registered, source."""
    import time

    from mnp import client as layer
    from mnp import views

    rows = layer.list_definitions(home(settings(ctx, **o)), name)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no definitions")
        return
    now = time.time()
    cells = [
        (r["name"], str(r["revision"]), r["status"], views.age(now - r["registered"]), r["source"])
        for r in rows
    ]
    click.echo(views.text_table(("name", "revision", "status", "age", "source"), cells))


@definitions.command()
@click.argument("ref", metavar="NAME[:REV]")
@common_options
@click.pass_context
def describe(ctx: click.Context, /, ref: str, **o: Any) -> None:
    """A registered definition as JSON (no :REV: the newest active revision)."""
    from mnp import client as layer

    print_json(layer.registered_definition(home(settings(ctx, **o)), ref))


@definitions.command()
@click.argument("ref", metavar="NAME:REV")
@common_options
@click.pass_context
def deregister(ctx: click.Context, /, ref: str, **o: Any) -> None:
    """Make a revision INACTIVE: it can no longer be submitted; describe still shows it."""
    from mnp import client as layer

    layer.parse_definition_ref(ref, revision_required=True)  # checked before connecting
    with client(settings(ctx, **o), start=False) as api:
        done = layer.deregister(api, ref)
    click.echo(f"{done['name']}:{done['revision']} {done['status']}")


COMMANDS = (definitions,)
