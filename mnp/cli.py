"""The ``mnp`` command line: parse, call, print. One error handler maps to exit codes.

Exit codes: 0 success; a job's own exit code (``mnp run``); 124 timed out;
2 bad usage or invalid input; 3 infrastructure; 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from mnp.errors import InfraError, MnpError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

EXAMPLE_RUN = """\b
Examples:
  mnp run nodegroups/mpi-hello.toml            # a 4-node MPI job on this machine
  mnp run -- sh -c 'exit 7'                    # exits 7
  mnp run --array-size 5 -- sh -c 'echo $MNP_ARRAY_INDEX'
  mnp run --nodes 4 -- hostname                # every node runs hostname
  mnp run --timeout 1s -- sleep 30             # exits 124
"""


class _DashDashCommand(click.Command):
    """Keeps what follows ``--`` as the job's command, untouched by option parsing."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta["mnp.command"] = args[i + 1 :]
            args = args[:i]
        else:
            ctx.meta["mnp.command"] = None
        return super().parse_args(ctx, args)


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


def _settings(ctx: click.Context, **given: Any) -> dict[str, Any]:
    merged = dict(ctx.obj or {})
    for k, v in given.items():
        if v is not None:
            merged[k] = v
    merged.setdefault("inventory", os.environ.get("MNP_INVENTORY") or None)
    merged.setdefault("local_nodes", 4)
    merged.setdefault(
        "home", os.environ.get("MNP_HOME") or os.path.expanduser("~/.local/state/mnp")
    )
    if merged.get("debug"):
        ctx.find_root().meta["mnp.debug"] = True
    return merged


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


def _kv(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {p!r}: expected KEY=VALUE")
        out[key] = value
    return out


def submit_options(f: F) -> F:
    """The options that override a definition (SPEC §2), shared by run and submit."""
    opts: list[Callable[[F], F]] = [
        click.option("--name", help="Job name."),
        click.option("--queue", help="Queue to submit to."),
        click.option("--param", "params", multiple=True, metavar="K=V", help="Set a parameter."),
        click.option("--env", "envs", multiple=True, metavar="K=V", help="Set a variable."),
        click.option(
            "--export", "export_env", is_flag=True, help="Forward this shell's environment."
        ),
        click.option("--array-size", type=int, help="Make an array of N children."),
        click.option("--array-parallelism", type=int, help="At most N children running."),
        click.option("--sequential", is_flag=True, help="Array children run one after another."),
        click.option(
            "--depends-on", multiple=True, metavar="JOB[:TYPE]", help="N_TO_N or afterany."
        ),
        click.option("--nodes", type=int, help="Multi-node: number of nodes."),
        click.option("--vcpus", type=float, help="vCPUs per task (per node for multinode)."),
        click.option("--memory", help="Memory per task, e.g. 512MiB."),
        click.option("--gpus", type=int, help="GPUs per task (per node for multinode)."),
        click.option("--attempts", type=int, help="Attempts (1..10)."),
        click.option("--timeout", help="Per-attempt time limit, e.g. 90s, 2h."),
        click.option("--tasks-per-node", type=int, help="Multi-node: tasks per node."),
        click.option("--cwd", help="Working directory on the nodes (default: here)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_definition(ctx: click.Context, args: tuple[str, ...], o: dict[str, Any]) -> Any:
    from mnp import spec

    command = ctx.meta.get("mnp.command")
    overrides = dict(
        name=o["name"],
        queue=o["queue"],
        params=_kv(o["params"], "--param"),
        env=_kv(o["envs"], "--env"),
        array_size=o["array_size"],
        array_parallelism=o["array_parallelism"],
        sequential=o["sequential"],
        depends_on=list(o["depends_on"]),
        nodes=o["nodes"],
        vcpus=o["vcpus"],
        memory=o["memory"],
        gpus=o["gpus"],
        attempts=o["attempts"],
        timeout=o["timeout"],
        tasks_per_node=o["tasks_per_node"],
        cwd=o["cwd"] or os.getcwd(),
        export_env=o["export_env"],
    )
    if command is not None and not args:
        if not command:
            raise UsageError("nothing after '--': give the command to run")
        return spec.definition_from_command(list(command), **overrides)
    if len(args) == 1 and not command:
        return spec.apply_overrides(spec.load_definition(args[0]), **overrides)
    raise UsageError("give either a definition file (DEF.toml) or '-- CMD ARGS...', not both")


@cli.command(cls=_DashDashCommand, epilog=EXAMPLE_RUN)
@click.argument("definition", nargs=-1, metavar="[DEF.toml]")
@submit_options
@click.option("-v", "--verbose", is_flag=True, help="Print state changes and launch timings.")
@common_options
@click.pass_context
def run(ctx: click.Context, /, definition: tuple[str, ...], verbose: bool, **o: Any) -> None:
    """Run a job, stream its output, and exit with its exit code.

    Runs the controller in this process (the form for submission scripts):
    Ctrl-C terminates the job, tears it down and exits 130.
    """
    from mnp.run import run_job

    s = _settings(
        ctx,
        home=o.pop("home"),
        inventory=o.pop("inventory"),
        local_nodes=o.pop("local_nodes"),
        debug=o.pop("debug"),
    )
    defn = build_definition(ctx, definition, o)
    code = run_job(defn, s["inventory"], s["local_nodes"], verbose=verbose)
    sys.exit(code)


@cli.command(
    epilog="""\b
Examples:
  mnp hosts --inventory cluster.toml --check
  mnp hosts --inventory slurm --json     # inside an allocation; connects to nothing
"""
)
@click.option("--check", is_flag=True, help="Connect to every host and report what was found.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@common_options
@click.pass_context
def hosts(ctx: click.Context, /, check: bool, as_json: bool, **o: Any) -> None:
    """Inventory hosts: what they declare, or with --check what each one really is.

    With --check, exits 0 only if every host is usable (3 otherwise).
    """
    import asyncio
    import json as jsonlib

    from mnp import hostcheck
    from mnp.run import transports_for
    from mnp.spec import resolve_inventory

    s = _settings(ctx, **o)
    inventory = resolve_inventory(s["inventory"], s["local_nodes"])
    if not check:
        rows = [_declared_host(inventory, h) for h in inventory.hosts]
        if as_json:
            click.echo(jsonlib.dumps(rows, indent=2))
        else:
            click.echo(
                _table(
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


def _declared_host(inventory: Any, h: Any) -> dict[str, Any]:
    from mnp.spec import format_memory

    def auto(v: Any) -> Any:
        return "auto" if v is None else v

    return {
        "name": h.name,
        "address": h.address,
        "transport": h.transport,
        "vcpus": auto(h.vcpus),
        "memory": "auto" if h.memory is None else format_memory(h.memory),
        "gpus": auto(h.gpus),
        "labels": list(h.labels),
        "compute_environments": [
            ce.name for ce in inventory.compute_environments.values() if h.name in ce.hosts
        ],
    }


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
def validate(files: tuple[str, ...]) -> None:
    """Check job definitions and inventories without running anything.

    \b
    Example:
      mnp validate nodegroups/*.toml examples/inventories/cluster.toml
    """
    from mnp import spec

    for f in files:
        click.echo(spec.validate_file(f))


def main(argv: list[str] | None = None) -> NoReturn:
    ctx_debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="mnp", standalone_mode=False)
    except MnpError as e:
        if ctx_debug:
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
