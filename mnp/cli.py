"""The ``mnp`` command line: parse, call, print. One error handler maps to exit codes.

Exit codes: 0 success; a job's own exit code (``mnp run``); 124 timed out;
2 bad usage or invalid input; 3 infrastructure; 130 interrupted.
"""

from __future__ import annotations

import codecs
import io
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from mnp import views
from mnp.errors import InfraError, MnpError, UsageError
from mnp.overrides import OVERRIDES

F = TypeVar("F", bound=Callable[..., Any])

INT_MAX = 2**63 - 1
"""The largest integer an option takes: SQLite's INTEGER (a job seq, an event seq, a
count). Options the job definition bounds more tightly are checked there."""

_STATES = ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"]

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
    """The options that override a definition (SPEC §2), shared by run and submit:
    generated from the one table, ``mnp.overrides.OVERRIDES``."""
    for opt in reversed(OVERRIDES):
        f = click.option(opt.flag, opt.name, **opt.click_kwargs())(f)
    return f


def build_definition(ctx: click.Context, args: tuple[str, ...], o: dict[str, Any]) -> Any:
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
    s = _settings(
        ctx,
        home=o.pop("home"),
        inventory=o.pop("inventory"),
        local_nodes=o.pop("local_nodes"),
        debug=o.pop("debug"),
    )
    defn = build_definition(ctx, definition, o)
    from mnp.api import ApiClient

    client = ApiClient.connect(Path(s["home"]))
    if client is not None:
        with client:
            if _serves(client, s):
                sys.exit(_run_through(client, Path(s["home"]), defn, verbose))
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


def _run_through(client: Any, home: Path, defn: Any, verbose: bool) -> int:
    """``mnp run`` against the running controller: stream, and terminate on Ctrl-C."""
    import signal

    from mnp.api import ApiClient
    from mnp.sink import INTERRUPTED, STDOUT_CLOSED, RunStream
    from mnp.spec import definition_to_dict

    interrupted = 0

    def end_job(reason: str) -> None:
        if view.job_id is not None:
            with ApiClient.connect(home) as other:  # type: ignore[union-attr]
                other.request("terminate", job_id=view.job_id, reason=reason)

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted > 1:  # again: stop waiting; the controller ends the job of a
            raise KeyboardInterrupt  # client that went away
        end_job(INTERRUPTED)

    view = RunStream(on_stdout_closed=lambda: end_job(STDOUT_CLOSED))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    for msg in client.stream("run", definition=definition_to_dict(defn), source=defn.source):
        view.feed(msg)
    return view.finish(verbose=verbose, interrupted=interrupted > 0)


@cli.command(cls=_DashDashCommand)
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

    s = _settings(
        ctx,
        home=o.pop("home"),
        inventory=o.pop("inventory"),
        local_nodes=o.pop("local_nodes"),
        debug=o.pop("debug"),
    )
    defn = build_definition(ctx, definition, o)
    with _client(s, start=True) as client:
        if not _serves(client, s):
            info = client.request("info")
            raise UsageError(
                f"the controller for {s['home']} serves inventory {info['inventory']}, not "
                f"{inventory_key(s)}: stop it (mnp controller stop) or use another --home"
            )
        answer = client.request("submit", definition=definition_to_dict(defn), source=defn.source)
        warnings = list(answer.get("warnings", ()))
        for w in warnings:
            _warn(w)
        job_id = answer["job_id"]
        doc: dict[str, Any] = {"job_id": job_id, "name": defn.name, "warnings": warnings}
        if not as_json:
            click.echo(job_id)
        if not wait:
            if as_json:
                _print_json(doc)
            return
        outcome = client.request("wait", job_id=job_id)
        if outcome.get("state") == "FAILED":
            click.echo(f"mnp: job {job_id} FAILED: {outcome.get('reason')}", err=True)
        code = int(outcome.get("exit_code", 1))
        if as_json:
            state, reason = outcome.get("state"), outcome.get("reason")
            _print_json({**doc, "state": state, "exit_code": code, "reason": reason})
        sys.exit(code)


def _print_json(doc: Any) -> None:
    import json as jsonlib

    click.echo(jsonlib.dumps(doc, indent=1))


def inventory_key(s: dict[str, Any]) -> str:
    """Which inventory the settings name, comparable across working directories."""
    spec = str(s.get("inventory") or "")
    if spec in ("", "local"):
        return f"local:{s['local_nodes']}"
    if spec.startswith("hostfile:"):
        return "hostfile:" + os.path.realpath(spec[len("hostfile:") :])
    if spec in ("slurm", "pbs", "auto"):
        return spec
    return os.path.realpath(os.path.expanduser(spec))


def _serves(client: Any, s: dict[str, Any]) -> bool:
    """Whether the running controller serves the inventory asked for (any, if none was)."""
    if not s.get("inventory"):
        return True
    return bool(client.request("info")["inventory"] == inventory_key(s))


def _warn(warning: str | None) -> None:
    if warning:
        click.echo(f"mnp: warning: {warning}", err=True)


def _client(s: dict[str, Any], *, start: bool) -> Any:
    """A client of the controller for ``s["home"]``; started in the background when asked."""
    from mnp import daemon
    from mnp.api import ApiClient

    home = Path(s["home"])
    if start:
        client = ApiClient.connect(home)
        if client is not None:
            return client
        extra = ["--local-nodes", str(s["local_nodes"])]
        if s.get("inventory"):
            _check_inventory(s)
            extra += ["--inventory", s["inventory"]]
        return daemon.ensure_client(home, extra)
    client = ApiClient.connect(home)
    if client is None:
        raise InfraError(f"no controller runs for {home} (start one: mnp controller start)")
    return client


def _check_inventory(s: dict[str, Any]) -> None:
    """Read the inventory here before a controller is started with it: a bad one is
    one line and exit 2 from this command, not a controller that fails to start."""
    from mnp.spec import resolve_inventory

    resolve_inventory(s["inventory"], s["local_nodes"])


def _store(s: dict[str, Any]) -> Any:
    """The store, read-only, for queries that need no controller."""
    from mnp.store import Store

    path = Path(s["home"]) / "mnp.db"
    if not path.exists():
        return None
    return Store(path, readonly=True)


LIST_FINISHED = 1000
"""Finished jobs ``mnp list`` shows by default, the newest; ``--all`` shows every one."""


@cli.command(name="list")
@click.option("--queue", help="Only this queue.")
@click.option("--state", type=click.Choice([st for st in _STATES], case_sensitive=False))
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
    s = _settings(ctx, **o)
    store = _store(s)
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


@cli.command()
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

    s = _settings(ctx, **o)
    store = _store(s)
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
    from mnp.spec import resolve_inventory, unverified_warning
    from mnp.transport import transports_for

    s = _settings(ctx, **o)
    if not check and not o.get("inventory"):
        from mnp.api import ApiClient

        client = ApiClient.connect(Path(s["home"]))
        if client is not None:  # the running controller knows what is free now
            with client:
                live = client.request("hosts")["hosts"]
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

    _warn(unverified_warning(inventory))

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


@cli.command()
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

    s = _settings(ctx, **o)
    store = _store(s)
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


@cli.command()
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


@cli.command()
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


def _known_target(store: Any, target: str) -> str:
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


def _end_job(
    ctx: click.Context, op: str, job_id: str, reason: str, as_json: bool, o: dict[str, Any]
) -> None:
    with _client(_settings(ctx, **o), start=False) as client:
        answer = client.request(op, job_id=job_id, reason=reason)
    if as_json:
        _print_json({k: answer.get(k) for k in ("job_id", "name", "state")})
    else:
        click.echo(f"{answer['job_id']} {answer['state']}")


@cli.command()
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

    s = _settings(ctx, **o)
    store = _store(s)
    if job_id is not None:
        if store is None:
            raise UsageError(f"job {job_id} does not exist")
        resolved = store.resolve(job_id)  # a name: the newest job of that name
        if resolved is None:
            raise UsageError(f"job {jobref.split(job_id)[0]} does not exist")
        job_id = _known_target(store, resolved)
    while True:
        store = store or _store(s)
        if store is not None:
            for ev in store.events_since(since, job_id=job_id):
                since = max(since, int(ev["seq"]))
                sys.stdout.write(jsonlib.dumps(ev) + "\n")
            sys.stdout.flush()
        if not follow:
            break
        time.sleep(0.2)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@common_options
@click.pass_context
def queues(ctx: click.Context, /, as_json: bool, **o: Any) -> None:
    """Queues: priority, compute environments, jobs by state.

    \b
    Example:
      mnp queues
    """
    import json as jsonlib

    s = _settings(ctx, **o)
    from mnp.api import ApiClient

    client = ApiClient.connect(Path(s["home"]))
    if client is not None:
        with client:
            rows = client.request("queues")["queues"]
    else:
        from mnp.spec import resolve_inventory

        inventory = resolve_inventory(s["inventory"], s["local_nodes"])
        store = _store(s)
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


@cli.command(
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

    s = _settings(ctx, **o)
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
        _warn(f"cannot remove {error}")
    if as_json:
        click.echo(jsonlib.dumps({"purged": len(ids), "job_ids": ids, "log_errors": errors}))
    elif not ids:
        click.echo("nothing to purge")
    else:
        few = ": " + " ".join(ids) if len(ids) <= 20 else ""
        click.echo(f"purged {len(ids):,} job{'s' if len(ids) != 1 else ''}{few}")


@cli.group()
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

    s = _settings(ctx, **o)
    home = Path(s["home"]).expanduser()
    keep_for = parse_retention(retention)
    if foreground:
        from mnp.service import make_handler_factory
        from mnp.spec import resolve_inventory

        inventory = resolve_inventory(s["inventory"], s["local_nodes"])
        factory = make_handler_factory(home, inventory, inventory_key(s), keep_for)
        sys.exit(daemon.serve_forever(home, factory))
    extra = ["--local-nodes", str(s["local_nodes"])]
    if s.get("inventory"):
        _check_inventory(s)
        extra += ["--inventory", s["inventory"]]
    if retention is not None:
        extra += ["--retention", retention]
    pid = daemon.start_background(home, extra)
    click.echo(f"controller running (pid {pid}), home {home}")
    with _client(s, start=False) as client:
        for w in client.request("info").get("warnings", ()):
            _warn(w)


@controller.command(name="stop")
@common_options
@click.pass_context
def controller_stop(ctx: click.Context, /, **o: Any) -> None:
    """Stop the controller; jobs stay stored and resume at the next start."""
    from mnp import daemon

    s = _settings(ctx, **o)
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

    s = _settings(ctx, **o)
    st = daemon.status(Path(s["home"]).expanduser())
    if as_json:
        click.echo(jsonlib.dumps(st))
    elif st.get("running"):
        click.echo(f"controller running (pid {st.get('pid')}), home {st.get('home')}")
    else:
        click.echo(f"no controller running, home {st.get('home')}")
    if not st.get("running"):
        sys.exit(3)


@cli.command()
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
    _print_json(reports)
    bad = next((r for r in reports if not r["ok"]), None)
    if bad is not None:
        raise UsageError(bad["error"])


def _original_bytes(e: UnicodeError) -> tuple[bytes | str, int]:
    """Encoding error handler: a surrogate escape (U+DC80..U+DCFF) is written as the byte
    it stands for (``surrogateescape``), anything else that cannot be encoded as
    ``\\uNNNN`` (``backslashreplace``): printing never fails."""
    if not isinstance(e, UnicodeEncodeError):
        raise e
    out = bytearray()
    for c in e.object[e.start : e.end]:
        n = ord(c)
        if 0xDC80 <= n <= 0xDCFF:
            out.append(n - 0xDC00)
        else:
            out += c.encode("ascii", "backslashreplace")
    return bytes(out), e.end


def main(argv: list[str] | None = None) -> NoReturn:
    ctx_debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    # bytes that are not UTF-8 (in task output, arguments, paths) are kept as surrogate
    # escapes end to end; written out, they are the original bytes again
    codecs.register_error("mnp-bytes", _original_bytes)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="mnp-bytes")
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
