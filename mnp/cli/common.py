"""What every command shares: the common options and the settings they make, the
controller's client, the store read-only, and printing (``print_json``, ``warn``).

Cheap to import: click, ``os``, ``pathlib`` and ``typing``; the client, the store and
the daemon are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import click

if TYPE_CHECKING:
    from mnp.api.client import ApiClient
    from mnp.store import Store

F = TypeVar("F", bound=Callable[..., Any])

INT_MAX = 2**63 - 1
"""The largest integer an option takes: SQLite's INTEGER (a job seq, an event seq, a
count). Options the job definition bounds more tightly are checked there."""


class Settings(TypedDict):
    """Where a command works: ``--home``, ``--inventory``, ``--local-nodes``, each
    given after the command, else before it, else from the environment or the default."""

    home: str
    inventory: str | None
    local_nodes: int


def common_options(f: F) -> F:
    """--home, --inventory, --local-nodes, --debug: accepted before or after the command."""
    f = click.option("--debug", is_flag=True, default=None, help="Show tracebacks.")(f)
    f = click.option(
        "--local-nodes",
        type=click.IntRange(1, 1024),
        default=None,
        help="Virtual nodes of the embedded local inventory (default 4).",
    )(f)
    f = click.option(
        "--inventory",
        metavar="FILE|local|slurm|pbs|hostfile:PATH|auto",
        default=None,
        help="Where the hosts come from (env MNP_INVENTORY; default: local).",
    )(f)
    f = click.option(
        "--home",
        type=click.Path(file_okay=False),
        default=None,
        help="State directory (env MNP_HOME; default ~/.local/state/mnp).",
    )(f)
    return f


def settings(
    ctx: click.Context,
    home: str | None = None,
    inventory: str | None = None,
    local_nodes: int | None = None,
    debug: bool | None = None,
) -> Settings:
    """The settings of the common options given to the command (they win) and to the
    group (``ctx.obj``); ``--debug`` anywhere turns on tracebacks."""
    merged = dict(ctx.obj or {})
    given = dict(home=home, inventory=inventory, local_nodes=local_nodes, debug=debug)
    merged.update((k, v) for k, v in given.items() if v is not None)
    if merged.get("debug"):
        ctx.find_root().meta["mnp.debug"] = True
    return Settings(
        home=merged["home"]
        if "home" in merged
        else os.environ.get("MNP_HOME") or os.path.expanduser("~/.local/state/mnp"),
        inventory=merged["inventory"]
        if "inventory" in merged
        else os.environ.get("MNP_INVENTORY") or None,
        local_nodes=merged.get("local_nodes", 4),
    )


def home(s: Settings) -> Path:
    return Path(s["home"])


def inventory_key(s: Settings) -> str:
    """Which inventory the settings name (``mnp.client.inventory_key``)."""
    from mnp import client as layer

    return layer.inventory_key(s["inventory"], s["local_nodes"])


def controller_args(s: Settings) -> list[str]:
    """The options a background controller is started with for ``s``
    (``mnp.client.controller_args``: a bad inventory is exit 2 here)."""
    from mnp import client as layer

    return layer.controller_args(s["inventory"], s["local_nodes"])


def client(s: Settings, *, start: bool) -> ApiClient:
    """A client of the controller for ``s["home"]`` (``mnp.client.connect``)."""
    from mnp import client as layer

    return layer.connect(
        home(s), start=start, inventory=s["inventory"], local_nodes=s["local_nodes"]
    )


def checked_client(s: Settings) -> ApiClient:
    """``client(s, start=True)`` once it serves the inventory ``s`` asks for
    (``mnp.client.check_serves``: else a UsageError)."""
    from mnp import client as layer

    api = client(s, start=True)
    try:
        layer.check_serves(api, home(s), s["inventory"], s["local_nodes"])
    except BaseException:
        api.close()
        raise
    return api


def open_store(s: Settings) -> Store | None:
    """The store, read-only, for queries that need no controller (``mnp.client.open_store``)."""
    from mnp import client as layer

    return layer.open_store(home(s))


def print_json(doc: object) -> None:
    import json

    click.echo(json.dumps(doc, indent=1))


def warn(warning: str | None) -> None:
    if warning:
        click.echo(f"mnp: warning: {warning}", err=True)
