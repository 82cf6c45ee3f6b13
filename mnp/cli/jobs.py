"""Commands that make and end jobs: ``run``, ``submit``, ``cancel``, ``terminate``.

The options of ``run`` and ``submit`` that override a definition are generated from
the one table, ``mnp.overrides.OVERRIDES`` (``submit_options``); ``build_definition``
turns a file or ``-- CMD ARGS`` and those options into a validated definition.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mnp.cli.common import (
    F,
    checked_client,
    client,
    common_options,
    inventory_key,
    print_json,
    settings,
    warn,
)
from mnp.errors import UsageError
from mnp.overrides import OVERRIDES

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mnp.api.client import ApiClient
    from mnp.client import Submitter
    from mnp.model import JobDefinition

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


def submit_options(f: F) -> F:
    """The options that override a definition (SPEC §2), shared by run and submit:
    generated from the one table, ``mnp.overrides.OVERRIDES``."""
    for opt in reversed(OVERRIDES):
        f = click.option(opt.flag, opt.name, **opt.click_kwargs())(f)
    return f


def _kv(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {p!r}: expected KEY=VALUE")
        out[key] = value
    return out


def build_definition(ctx: click.Context, args: tuple[str, ...], o: dict[str, Any]) -> JobDefinition:
    """The definition ``run``/``submit`` were given (``DEF.toml`` or ``-- CMD ARGS``),
    with the override options ``o`` applied (``mnp.client.build_definition``)."""
    from mnp import client as layer

    command = ctx.meta.get("mnp.command")
    if len(args) > 1:
        raise UsageError("give one definition file (DEF.toml) or '-- CMD ARGS...'")
    return layer.build_definition(args[0] if args else None, command, _overrides(o))


def _overrides(o: dict[str, Any]) -> dict[str, Any]:
    """The override options as ``mnp.client.full_overrides`` takes them (K=V as mappings)."""
    return {opt.name: _kv(o[opt.name], opt.flag) if opt.pairs else o[opt.name] for opt in OVERRIDES}


def _common(o: dict[str, Any]) -> dict[str, Any]:
    """The common options, taken out of ``o`` (what is left are the overrides)."""
    return {k: o.pop(k) for k in ("home", "inventory", "local_nodes", "debug")}


@click.command(cls=_DashDashCommand, epilog=EXAMPLE_RUN)
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
    from mnp import client as layer
    from mnp.api.client import ApiClient

    s = settings(ctx, **_common(o))
    defn = build_definition(ctx, definition, o)

    running = ApiClient.connect(Path(s["home"]))
    if running is not None:
        with running:
            if layer.serves(running, s["inventory"], s["local_nodes"]):
                sys.exit(_run_through(running, Path(s["home"]), defn, verbose))
    from mnp.run import run_job  # the in-process controller: asyncio, transports

    code = run_job(
        defn,
        s["inventory"],
        s["local_nodes"],
        verbose=verbose,
        home=Path(s["home"]),
        inventory_key=inventory_key(s),
    )
    sys.exit(code)


def _run_through(api: ApiClient, home: Path, defn: JobDefinition, verbose: bool) -> int:
    """``mnp run`` against the running controller: stream, and terminate on Ctrl-C."""
    from mnp.runclient import run_through
    from mnp.sink import Progress, wants_progress
    from mnp.spec import definition_to_dict

    fields = {"definition": definition_to_dict(defn), "source": defn.source}
    progress_of = Progress.of(defn) if wants_progress() else None
    code = run_through(api, home, fields, verbose=verbose, progress_of=progress_of)
    assert code is not None  # a refusal raises
    return code


def definition_from_argv(argv: Sequence[str], submitter: Submitter) -> JobDefinition:
    """The definition ``mnp run ARGV`` would build in ``submitter``'s process: ARGV
    parsed by the ``run`` command itself, for the controller that serves ``mnp run``'s
    quick client (``mnp.quickrun``). Only the ``-- CMD ARGS`` form without a common
    option (``--home``, ``--inventory``, ``--local-nodes``, ``--debug``) or
    ``--verbose`` is built; anything else, and anything wrong, is a ``UsageError``
    (that client then runs the full command, which says what is wrong)."""
    from mnp import client as layer

    try:
        ctx = run.make_context("run", list(argv))
    except (click.ClickException, click.exceptions.Exit) as e:
        raise UsageError(f"not a quick run: {e}") from None
    o = dict(ctx.params)
    definition, verbose, common = o.pop("definition"), o.pop("verbose"), _common(o)
    command = ctx.meta.get("mnp.command")
    if definition or verbose or command is None or any(v is not None for v in common.values()):
        raise UsageError("not a quick run: give the full command")
    return layer.build_definition(None, command, _overrides(o), submitter=submitter)


@click.command(cls=_DashDashCommand)
@click.argument("definition", nargs=-1, metavar="[DEF.toml]")
@click.option(
    "--definition",
    "registered",
    metavar="NAME[:REV]",
    help="A registered definition (mnp definitions); no :REV: its newest active revision.",
)
@submit_options
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit with its exit code.")
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"job_id", "name", "warnings"} as JSON.'
)
@common_options
@click.pass_context
def submit(
    ctx: click.Context,
    /,
    definition: tuple[str, ...],
    registered: str | None,
    wait: bool,
    as_json: bool,
    **o: Any,
) -> None:
    """Queue a job and print its id; starts the controller in the background if none runs.

    With --json, one JSON document: {"job_id", "name", "warnings"}, and with --wait
    also "state", "exit_code" and "reason", once the job has ended.

    \b
    Examples:
      mnp submit -- sh -c 'exit 1'
      mnp submit --depends-on 1 -- true
      mnp submit --name prep -- ./prepare.sh; mnp submit --depends-on prep -- ./train.sh
      mnp submit --array-size 100 --array-parallelism 10 -- ./work.sh
      mnp submit nodegroups/mpi-hello.toml --wait
      mnp submit --json -- true          # {"job_id": "7", "name": "true", "warnings": []}
    """
    from mnp import client as layer

    s = settings(ctx, **_common(o))
    if registered is None:
        defn = build_definition(ctx, definition, o)
    elif definition or ctx.meta.get("mnp.command") is not None:
        raise UsageError("give --definition NAME[:REV], a definition file or '-- CMD', not two")
    else:
        defn = layer.build_registered(Path(s["home"]), registered, _overrides(o))
    with checked_client(s) as api:
        job_id, warnings = layer.submit(api, defn)
        for w in warnings:
            warn(w)
        doc: dict[str, Any] = {"job_id": job_id, "name": defn.name, "warnings": warnings}
        if not as_json:
            click.echo(job_id)
        if not wait:
            if as_json:
                print_json(doc)
            return
        outcome = api.request("wait", job_id=job_id)
        if outcome.get("state") == "FAILED":
            click.echo(f"mnp: job {job_id} FAILED: {outcome.get('reason')}", err=True)
        code = int(outcome.get("exit_code", 1))
        if as_json:
            state, reason = outcome.get("state"), outcome.get("reason")
            print_json({**doc, "state": state, "exit_code": code, "reason": reason})
        sys.exit(code)


@click.command()
@click.argument("job_id")
@click.option("--reason", required=True, help="Why (kept with the job).")
@click.option("--json", "as_json", is_flag=True, help='Print {"job_id", "name", "state"} as JSON.')
@common_options
@click.pass_context
def cancel(ctx: click.Context, /, job_id: str, reason: str, as_json: bool, **o: Any) -> None:
    """SUBMITTED/PENDING/RUNNABLE jobs → FAILED; cascades to array children.

    JOB is an id or a name (the newest job of that name).

    \b
    Example:
      mnp cancel 42 --reason "wrong input"
    """
    _end_job(ctx, "cancel", job_id, reason, as_json, o)


@click.command()
@click.argument("job_id")
@click.option("--reason", required=True, help="Why (kept with the job).")
@click.option("--json", "as_json", is_flag=True, help='Print {"job_id", "name", "state"} as JSON.')
@common_options
@click.pass_context
def terminate(ctx: click.Context, /, job_id: str, reason: str, as_json: bool, **o: Any) -> None:
    """Like cancel, and also kills STARTING/RUNNING jobs (whole process trees).

    JOB is an id or a name (the newest job of that name).

    \b
    Example:
      mnp terminate 42 --reason "taking too long"
    """
    _end_job(ctx, "terminate", job_id, reason, as_json, o)


def _end_job(
    ctx: click.Context, op: str, job_id: str, reason: str, as_json: bool, o: dict[str, Any]
) -> None:
    from mnp import client as layer

    with client(settings(ctx, **o), start=False) as api:
        answer = layer.end_job(api, op, job_id, reason)
    if as_json:
        print_json(answer)
    else:
        click.echo(f"{answer['job_id']} {answer['state']}")


COMMANDS = (run, submit, cancel, terminate)
