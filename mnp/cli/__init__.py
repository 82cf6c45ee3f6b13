"""The ``mnp`` command line: parse, call, print. One error handler maps to exit codes.

Exit codes: 0 success; a job's own exit code (``mnp run``); 124 timed out;
2 bad usage or invalid input; 3 infrastructure; 130 interrupted.

Where each command lives (click only; the work is done by the modules they call):

- ``jobs.py``: ``run``, ``submit``, ``cancel``, ``terminate``; the submit/run options
  made from ``mnp.overrides.OVERRIDES``, and the definition they build.
- ``reading.py``: ``list``, ``describe``, ``logs``, ``events`` (the store, read-only).
- ``admin.py``: ``controller start|stop|status``, ``hosts``, ``queues``, ``purge``,
  ``validate``.
- ``views_cmds.py``: ``plot``, ``top``.
- ``definitions.py``: ``definitions register|list|describe|deregister``.
- ``common.py``: the options every command takes, the settings they make, the
  controller's client, the store, printing.
- here: the group, ``main`` and its error handler.

Start-up is part of every command's cost: a module imports at its top only click and
what the commands print with; anything else (the client, the store, asyncio) inside
the command that needs it.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from mnp.cli import admin, definitions, jobs, reading, views_cmds
from mnp.cli.common import common_options
from mnp.cli.jobs import run, submit
from mnp.entry import entry_point, exit_now, keep_bytes
from mnp.errors import MnpError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@common_options
@click.version_option(package_name="mnp", prog_name="mnp")
@click.pass_context
def cli(
    ctx: click.Context,
    home: str | None,
    inventory: str | None,
    local_nodes: int | None,
    debug: bool | None,
) -> None:
    """mnp: single, array and multi-node parallel (MPI, GPU) jobs on hosts you reach over SSH,
    or on this machine with no configuration at all.

    \b
    Quick start:
      mnp run nodegroups/mpi-hello.toml     # 4-node MPI hello on this machine
      mnp validate nodegroups/*.toml
    """
    ctx.obj = {
        k: v
        for k, v in dict(
            home=home, inventory=inventory, local_nodes=local_nodes, debug=debug
        ).items()
        if v is not None
    }
    if debug:
        ctx.meta["mnp.debug"] = True


for _command in (
    *jobs.COMMANDS,
    *reading.COMMANDS,
    *admin.COMMANDS,
    *definitions.COMMANDS,
    *views_cmds.COMMANDS,
):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> NoReturn:
    ctx_debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    keep_bytes()
    try:
        cli.main(args=argv, prog_name="mnp", standalone_mode=False)
    except MnpError as e:
        if ctx_debug:
            import traceback

            traceback.print_exc()
        click.echo(f"mnp: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("mnp: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        msg = e.format_message().replace("\n", " ")
        click.echo(f"mnp: {msg} (see 'mnp --help')", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(0)


__all__ = ["cli", "entry_point", "exit_now", "main", "run", "submit"]
