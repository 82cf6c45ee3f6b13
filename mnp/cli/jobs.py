"""Commands that make and end jobs: ``run``, ``submit``, ``cancel``, ``terminate``.

The options of ``run`` and ``submit`` that override a definition are generated from
the one table, ``mnp.overrides.OVERRIDES`` (``submit_options``); ``build_definition``
turns a file or ``-- CMD ARGS`` and those options into a validated definition.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mnp.cli.common import (
    F,
    client,
    common_options,
    inventory_key,
    print_json,
    serves,
    settings,
    warn,
)
from mnp.errors import UsageError
from mnp.overrides import OVERRIDES

if TYPE_CHECKING:
    from types import FrameType

    from mnp.api.client import ApiClient
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
    with the override options ``o`` applied."""
    from mnp import spec

    command = ctx.meta.get("mnp.command")
    overrides: dict[str, Any] = {}
    for opt in OVERRIDES:
        value = o[opt.name]
        if opt.pairs:
            value = _kv(value, opt.flag)
        elif opt.multiple:
            value = list(value)
        overrides[opt.name] = value
    overrides["cwd"] = _absolute(overrides["cwd"], "--cwd")
    if command is not None and not args:
        if not command:
            raise UsageError("nothing after '--': give the command to run")
        if overrides["cwd"] is None:
            overrides["cwd"] = _here()
        defn = spec.definition_from_command(list(command), **overrides)
    elif len(args) == 1 and not command:
        defn = spec.load_definition(args[0], open_refs=True)
        if overrides["cwd"] is None:
            # --cwd, else the definition's own cwd, else the directory mnp runs in
            cwd = _here() if defn.cwd is None else _absolute(defn.cwd, "cwd")
            if cwd != defn.cwd:
                overrides["cwd"] = cwd
        defn = spec.apply_overrides(defn, **overrides)
    else:
        raise UsageError("give either a definition file (DEF.toml) or '-- CMD ARGS...', not both")
    if defn.python_env is None:  # neither the file nor --python-env said: the submitter's
        import dataclasses

        found = spec.submitter_python_env(os.environ, sys.prefix, sys.base_prefix)
        defn = dataclasses.replace(defn, python_env=found or "none")
    return defn


def _here() -> str:
    try:
        return os.getcwd()
    except OSError as e:
        raise UsageError(
            f"the current directory cannot be used ({e.strerror}); give --cwd DIR"
        ) from None


def _absolute(path: str | None, what: str) -> str | None:
    """A working directory as the nodes get it: relative to where mnp runs (as Slurm's
    --chdir), since a relative one would be relative to wherever each agent runs."""
    if path is None or os.path.isabs(path) or path.startswith("~"):
        return path
    if not path:
        raise UsageError(f"{what}: empty; give a directory")
    return os.path.normpath(os.path.join(_here(), path))


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
    s = settings(ctx, **_common(o))
    defn = build_definition(ctx, definition, o)
    from mnp.api.client import ApiClient

    running = ApiClient.connect(Path(s["home"]))
    if running is not None:
        with running:
            if serves(running, s):
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
    import signal

    from mnp.api.client import ApiClient
    from mnp.sink import INTERRUPTED, STDOUT_CLOSED, RunStream
    from mnp.spec import definition_to_dict

    interrupted = 0

    def end_job(reason: str) -> None:
        if view.job_id is not None:
            with ApiClient.connect(home) as other:  # type: ignore[union-attr]
                other.request("terminate", job_id=view.job_id, reason=reason)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted > 1:  # again: stop waiting; the controller ends the job of a
            raise KeyboardInterrupt  # client that went away
        end_job(INTERRUPTED)

    view = RunStream(on_stdout_closed=lambda: end_job(STDOUT_CLOSED))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    for msg in api.stream("run", definition=definition_to_dict(defn), source=defn.source):
        view.feed(msg)
    return view.finish(verbose=verbose, interrupted=interrupted > 0)


@click.command(cls=_DashDashCommand)
@click.argument("definition", nargs=-1, metavar="[DEF.toml]")
@submit_options
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit with its exit code.")
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"job_id", "name", "warnings"} as JSON.'
)
@common_options
@click.pass_context
def submit(
    ctx: click.Context, /, definition: tuple[str, ...], wait: bool, as_json: bool, **o: Any
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
    from mnp.spec import definition_to_dict

    s = settings(ctx, **_common(o))
    defn = build_definition(ctx, definition, o)
    with client(s, start=True) as api:
        if not serves(api, s):
            info = api.request("info")
            raise UsageError(
                f"the controller for {s['home']} serves inventory {info['inventory']}, not "
                f"{inventory_key(s)}: stop it (mnp controller stop) or use another --home"
            )
        answer = api.request("submit", definition=definition_to_dict(defn), source=defn.source)
        warnings = list(answer.get("warnings", ()))
        for w in warnings:
            warn(w)
        job_id = answer["job_id"]
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
    with client(settings(ctx, **o), start=False) as api:
        answer = api.request(op, job_id=job_id, reason=reason)
    if as_json:
        print_json({k: answer.get(k) for k in ("job_id", "name", "state")})
    else:
        click.echo(f"{answer['job_id']} {answer['state']}")


COMMANDS = (run, submit, cancel, terminate)
