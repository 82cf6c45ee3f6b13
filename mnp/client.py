"""The client layer the CLI and the Python API (``mnp.Client``) share.

Whatever both need to reach a home's controller, or to read what it recorded,
lives here once: finding or starting the controller (``connect``), building a
definition from a file, a dictionary or a command with the submit overrides of
``mnp.overrides.OVERRIDES`` (``build_definition``), and the read-only queries that
need no controller (``describe_job``, ``list_jobs``, ``LogReader``, ``events``),
which open the store read-only and the log files directly as the CLI always has.

Cheap to import (no click, no asyncio, no asyncssh): ``mnp.spec``, ``mnp.store``
and ``mnp.daemon`` are imported inside the functions that need them.

``mnp.Client`` (``mnp.pyapi``) is the Python API on top of it: the same functions,
with the CLI's errors (``mnp.errors``) raised instead of printed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mnp.errors import InfraError, UsageError
from mnp.overrides import BY_NAME, OVERRIDES

if TYPE_CHECKING:
    from mnp.api import ApiClient
    from mnp.model import JobDefinition
    from mnp.store import Store

__all__ = [
    "LogReader",
    "Submitter",
    "absolute_cwd",
    "build_definition",
    "build_registered",
    "deregister",
    "check_serves",
    "connect",
    "controller_args",
    "default_home",
    "describe_job",
    "end_job",
    "events",
    "inventory_key",
    "known_target",
    "list_definitions",
    "list_jobs",
    "open_store",
    "read_logs",
    "register",
    "registered_definition",
    "resolve_target",
    "serves",
    "submit",
    "tasks_per_node",
]

FINISHED = ("SUCCEEDED", "FAILED")
DEFAULT_LOCAL_NODES = 4


def default_home() -> Path:
    """``$MNP_HOME``, else ``~/.local/state/mnp``."""
    return Path(os.environ.get("MNP_HOME") or os.path.expanduser("~/.local/state/mnp"))


def inventory_key(inventory: str | None, local_nodes: int = DEFAULT_LOCAL_NODES) -> str:
    """Which inventory ``inventory`` names, comparable across working directories."""
    spec = str(inventory or "")
    if spec in ("", "local"):
        return f"local:{local_nodes}"
    if spec.startswith("hostfile:"):
        return "hostfile:" + os.path.realpath(spec[len("hostfile:") :])
    if spec in ("slurm", "pbs", "auto"):
        return spec
    return os.path.realpath(os.path.expanduser(spec))


def connect(
    home: Path,
    *,
    start: bool,
    inventory: str | None = None,
    local_nodes: int = DEFAULT_LOCAL_NODES,
) -> ApiClient:
    """A client of ``home``'s controller; one is started in the background when none
    runs and ``start`` (as ``mnp submit`` does), else an ``InfraError``. A bad
    ``inventory`` is a ``SpecError`` here, before any controller is started with it."""
    from mnp.api import ApiClient

    client = ApiClient.connect(home)
    if client is not None:
        return client
    if not start:
        raise InfraError(f"no controller runs for {home} (start one: mnp controller start)")
    from mnp import daemon

    return daemon.ensure_client(home, controller_args(inventory, local_nodes))


def controller_args(inventory: str | None, local_nodes: int = DEFAULT_LOCAL_NODES) -> list[str]:
    """The options a background controller is started with; the inventory is read here
    first: a bad one is a ``SpecError`` (exit 2) from the command that asked, not a
    controller that fails to start."""
    extra = ["--local-nodes", str(local_nodes)]
    if inventory:
        from mnp.spec import resolve_inventory

        resolve_inventory(inventory, local_nodes)
        extra += ["--inventory", inventory]
    return extra


def serves(
    client: ApiClient, inventory: str | None, local_nodes: int = DEFAULT_LOCAL_NODES
) -> bool:
    """Whether the running controller serves ``inventory`` (any will do when None)."""
    if not inventory:
        return True
    return bool(client.request("info")["inventory"] == inventory_key(inventory, local_nodes))


def check_serves(
    client: ApiClient, home: Path, inventory: str | None, local_nodes: int = DEFAULT_LOCAL_NODES
) -> None:
    """A ``UsageError`` when the running controller serves another inventory than the
    one asked for (any will do when none was)."""
    if not inventory:
        return
    served = client.request("info")["inventory"]
    wanted = inventory_key(inventory, local_nodes)
    if served != wanted:
        raise UsageError(
            f"the controller for {home} serves inventory {served}, not "
            f"{wanted}: stop it (mnp controller stop) or use another --home"
        )


def _here() -> str:
    try:
        return os.getcwd()
    except OSError as e:
        raise UsageError(
            f"the current directory cannot be used ({e.strerror}); give --cwd DIR"
        ) from None


class Submitter(NamedTuple):
    """What a definition built from a command line takes from the process that submits
    it: its working directory (None where it cannot be read), its environment (what
    ``--export`` forwards; the active venv or conda environment) and its Python's
    ``sys.prefix`` and ``sys.base_prefix``. ``mnp run``'s quick client
    (``mnp.quickrun``) sends its own, and the controller builds the definition from
    them as the client would have."""

    cwd: str | None
    environ: Mapping[str, str]
    prefix: str
    base_prefix: str

    @classmethod
    def here(cls) -> Submitter:
        try:
            cwd: str | None = os.getcwd()
        except OSError:
            cwd = None
        return cls(cwd, dict(os.environ), sys.prefix, sys.base_prefix)

    def working_dir(self) -> str:
        if self.cwd is None:
            raise UsageError("the current directory cannot be used; give --cwd DIR")
        return self.cwd


def absolute_cwd(path: str | None, what: str, here: Callable[[], str] = _here) -> str | None:
    """A working directory as the nodes get it: relative to where mnp runs (``here``,
    as Slurm's --chdir), since a relative one would be relative to wherever each agent
    runs."""
    if path is None or os.path.isabs(path) or path.startswith("~"):
        return path
    if not path:
        raise UsageError(f"{what}: empty; give a directory")
    return os.path.normpath(os.path.join(here(), path))


def full_overrides(given: Mapping[str, Any]) -> dict[str, Any]:
    """Every override of ``OVERRIDES`` by keyword, the ones not ``given`` at their
    defaults; K=V options as mappings, repeatable ones as lists. An unknown keyword
    is a ``UsageError`` naming the valid ones."""
    unknown = sorted(set(given) - set(BY_NAME))
    if unknown:
        valid = ", ".join(o.name for o in OVERRIDES)
        raise UsageError(f"unknown override {', '.join(unknown)}; valid: {valid}")
    out: dict[str, Any] = {}
    for opt in OVERRIDES:
        value = given.get(opt.name)
        if opt.pairs:
            value = {str(k): str(v) for k, v in dict(value or {}).items()}
        elif opt.multiple:
            value = [value] if isinstance(value, str) else list(value or ())
        elif opt.is_flag:
            value = bool(value)
        out[opt.name] = value
    return out


def build_definition(
    definition: str | os.PathLike[str] | Mapping[str, Any] | None,
    command: Sequence[str] | None,
    overrides: Mapping[str, Any],
    *,
    source: str = "<definition>",
    submitter: Submitter | None = None,
) -> JobDefinition:
    """The definition ``mnp submit``/``mnp run`` send: a file (path), a TOML-shaped
    dictionary (read as from ``source``), or ``command`` alone, with ``overrides``
    (``full_overrides``) applied. The working directory: ``cwd``, else the
    definition's, else the submitter's; the Python environment: the definition's,
    else the submitter's. ``submitter``: this process when None."""
    from mnp import spec

    here = _here if submitter is None else submitter.working_dir
    environ = os.environ if submitter is None else submitter.environ
    o = full_overrides(overrides)
    o["cwd"] = absolute_cwd(o["cwd"], "--cwd", here)
    if definition is None:
        if command is None:
            raise UsageError("give either a definition file (DEF.toml) or '-- CMD ARGS...'")
        if not command:
            raise UsageError("nothing after '--': give the command to run")
        if o["cwd"] is None:
            o["cwd"] = here()
        defn = spec.definition_from_command(list(command), environ=environ, **o)
    elif command:
        raise UsageError("give either a definition file (DEF.toml) or '-- CMD ARGS...', not both")
    else:
        if isinstance(definition, Mapping):
            defn = spec.parse_definition(dict(definition), source, open_refs=True)
        else:
            defn = spec.load_definition(os.fspath(definition), open_refs=True)
        if o["cwd"] is None:
            # cwd, else the definition's own cwd, else the directory mnp runs in
            cwd = here() if defn.cwd is None else absolute_cwd(defn.cwd, "cwd", here)
            if cwd != defn.cwd:
                o["cwd"] = cwd
        defn = spec.apply_overrides(defn, environ=environ, **o)
    if defn.python_env is None:  # neither the definition nor python_env said: the submitter's
        import dataclasses

        if submitter is None:
            found = spec.submitter_python_env(os.environ, sys.prefix, sys.base_prefix)
        else:
            found = spec.submitter_python_env(environ, submitter.prefix, submitter.base_prefix)
        defn = dataclasses.replace(defn, python_env=found or "none")
    return defn


def submit(client: ApiClient, defn: JobDefinition) -> tuple[str, list[str]]:
    """Queue ``defn``: its job id and the controller's warnings, once it is committed."""
    from mnp.spec import definition_to_dict

    answer = client.request("submit", definition=definition_to_dict(defn), source=defn.source)
    return str(answer["job_id"]), [str(w) for w in answer.get("warnings", ()) if w]


def end_job(client: ApiClient, op: str, job: str, reason: str) -> dict[str, Any]:
    """``cancel`` or ``terminate`` ``job``: ``{"job_id", "name", "state"}``."""
    answer = client.request(op, job_id=job, reason=reason)
    return {k: answer.get(k) for k in ("job_id", "name", "state")}


# --------------------------------------------------------------------------- registry


def parse_definition_ref(ref: str, *, revision_required: bool = False) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:REV`` of a registered definition; else a UsageError."""
    import re

    m = re.fullmatch(r"([A-Za-z0-9_-]{1,128})(?::([1-9][0-9]{0,17}))?", ref)
    if m is None or (revision_required and m.group(2) is None):
        form = "NAME:REV" if revision_required else "NAME or NAME:REV"
        raise UsageError(f"definition {ref!r}: expected {form} (e.g. train:3)")
    return m.group(1), int(m.group(2)) if m.group(2) else None


def looks_registered(definition: object) -> bool:
    """Whether ``Client.submit``'s ``definition`` names a registered definition
    (``NAME[:REV]``, no such file here) rather than a file."""
    if not isinstance(definition, str) or os.path.exists(definition):
        return False
    try:
        parse_definition_ref(definition)
    except UsageError:
        return False
    return True


def register(client: ApiClient, path: str | os.PathLike[str]) -> tuple[str, int]:
    """Register the definition file ``path``: its name and new revision. A
    ``Ref::K`` may stay without a value, for ``--param`` at submit."""
    from mnp import spec

    defn = spec.load_definition(os.fspath(path), open_refs=True)
    answer = client.request(
        "register", definition=spec.definition_to_dict(defn), source=defn.source
    )
    return str(answer["name"]), int(answer["revision"])


def deregister(client: ApiClient, ref: str) -> dict[str, Any]:
    name, revision = parse_definition_ref(ref, revision_required=True)
    answer = client.request("deregister", name=name, revision=revision)
    return {k: answer.get(k) for k in ("name", "revision", "status")}


def list_definitions(home: Path, name: str | None = None) -> list[dict[str, Any]]:
    """Every registered revision (of ``name``), without bodies."""
    store = open_store(home)
    if store is None:
        return []
    with store:
        return [dict(r) for r in store.definitions(name)]


def registered_definition(home: Path, ref: str, *, submitting: bool = False) -> dict[str, Any]:
    """``NAME[:REV]`` with its ``definition`` (no ``:REV``: the newest ACTIVE revision);
    ``submitting``: an INACTIVE one is refused."""
    name, revision = parse_definition_ref(ref)
    store = open_store(home)
    found = None
    revisions: list[int] = []
    if store is not None:
        with store:
            found = store.definition(name, revision)
            if found is None:
                revisions = [int(r["revision"]) for r in store.definitions(name)]
    if found is None:
        if revision is None and revisions:
            raise UsageError(f"definition {name} has no active revision (all are deregistered)")
        known = f"; its revisions: {', '.join(map(str, revisions))}" if revisions else ""
        raise UsageError(f"definition {ref} is not registered{known}")
    if submitting and found["status"] != "ACTIVE":
        raise UsageError(f"definition {name}:{found['revision']} is deregistered (INACTIVE)")
    return dict(found)


def build_registered(home: Path, ref: str, overrides: Mapping[str, Any]) -> JobDefinition:
    """``build_definition`` of the registered definition ``ref`` (``NAME[:REV]``)."""
    found = registered_definition(home, ref, submitting=True)
    source = f"{found['name']}:{found['revision']}"
    return build_definition(found["definition"], None, overrides, source=source)


# --------------------------------------------------------------------------- reads


def open_store(home: Path) -> Store | None:
    """The store, read-only, for queries that need no controller (None: none yet)."""
    from mnp.store import Store

    path = home / "mnp.db"
    if not path.exists():
        return None
    return Store(path, readonly=True)


def describe_job(home: Path, ref: str) -> dict[str, Any]:
    """``mnp describe --json``: everything about job ``ref`` (an id or a name), with
    ``root_cause``; an array's first failed children as ``failed_children``."""
    from mnp import views

    store = open_store(home)
    job = None
    if store is not None:
        with store:
            found = store.resolve(ref)
            job = store.get_job(found) if found is not None else None
            if job is not None and job.get("array_size"):
                job["failed_children"] = store.children(job["id"], state="FAILED", limit=5)
    if job is None:
        raise UsageError(f"job {ref} does not exist")
    job["root_cause"] = views.root_cause(job)
    job["tags"] = job_tags(job)
    return dict(job)


def job_tags(job: Mapping[str, Any]) -> dict[str, str]:
    """A stored job's tags (its definition's ``tags``)."""
    tags = (job.get("definition") or {}).get("tags")
    return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, Mapping) else {}


def parse_tag(tag: str) -> tuple[str, str]:
    """``K=V`` as ``(K, V)``; else a UsageError."""
    key, sep, value = tag.partition("=")
    if not sep or not key:
        raise UsageError(f"--tag {tag!r}: expected KEY=VALUE")
    return key, value


def tagged_ids(store: Store, ids: Sequence[str], tag: str) -> set[str]:
    """Which of the jobs ``ids`` carry tag ``K=V``."""
    key, value = parse_tag(tag)
    return {i for i, tags in store.job_tags(list(ids)).items() if tags.get(key) == value}


def list_jobs(
    home: Path,
    *,
    queue: str | None = None,
    state: str | None = None,
    tag: str | None = None,
    parents_only: bool = True,
    newest: int | None = None,
    finished: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """``mnp list --json``'s rows (oldest first) and how many matching jobs the page
    leaves out (see ``Store.list_page``). ``tag``: ``K=V``, jobs whose ``tags`` hold it."""
    if tag is not None:
        parse_tag(tag)
    store = open_store(home)
    if store is None:
        return [], 0
    with store:
        rows, left_out = store.list_page(
            queue=queue,
            state=state.upper() if state else None,
            parents_only=parents_only,
            newest=newest,
            finished=finished,
        )
        if tag is not None:
            keep = tagged_ids(store, [str(r["id"]) for r in rows], tag)
            rows = [r for r in rows if str(r["id"]) in keep]
    return [dict(r) for r in rows], left_out


def known_target(store: Store, target: str) -> str:
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
            slots = tasks_per_node(job.get("definition"), given.node)
            name = name.at_task(given.task)
            if slots is not None and given.task >= slots:
                first, last = name.job.at_node(given.node).at_task(0), name.at_task(slots - 1)
                raise UsageError(f"task {name} does not exist: tasks are {first}..{last}")
    return str(name)


def tasks_per_node(definition: Any, node: int) -> int | None:
    """How many tasks node ``node`` of a stored multi-node definition runs (None: unknown)."""
    try:
        for g in definition["multinode"]["groups"]:
            start, _, end = str(g["target_nodes"]).partition(":")
            if int(start) <= node <= int(end):
                return int(g.get("tasks_per_node") or 1)
    except (KeyError, TypeError, ValueError):
        return None
    return None


def resolve_target(store: Store | None, ref: str) -> str:
    """``known_target`` of ``ref``, a name or an id with any ``:INDEX``/``#NODE`` suffix."""
    from mnp import jobref

    resolved = store.resolve(ref) if store is not None else None
    if store is None or resolved is None:
        raise UsageError(f"job {jobref.split(ref)[0]} does not exist")
    return known_target(store, resolved)


class LogReader:
    """A job's (or a child's, a node's, a task's) output files under ``logs/``, read
    on from where the last ``pump`` stopped; each line prefixed with its node or
    index when there are several (``mnp logs``, ``mnp logs -f``, ``Client.logs``)."""

    def __init__(self, home: Path, target: str, stream: str = "stdout") -> None:
        from mnp import views
        from mnp.jobid import JobId

        if stream not in ("stdout", "stderr"):
            raise UsageError(f"stream {stream!r}: use stdout or stderr")
        self.target = target
        self.wanted = JobId.parse(target)
        self.root = self.wanted.top
        self.folder = home / "logs" / self.root
        self.suffix = ".err" if stream == "stderr" else ".out"
        self.offsets: dict[Path, int] = {}
        self.lines = views.PrefixedLines()

    def _matches(self, name: str) -> bool:
        from mnp.jobid import JobId

        if self.target == self.root:
            return True
        raw = name[: -len(self.suffix)]
        tid = JobId.parse_or_none(raw)
        return tid is not None and str(tid) == raw and tid.within(self.wanted)

    def _label(self, path: Path) -> str:
        tid = path.name[: -len(self.suffix)]
        rest = tid[len(self.root) :].lstrip(":#")
        return f"{rest}: " if rest else ""

    def pump(self, final: bool) -> str:
        """What was written since the last call; ``final``: with unfinished last lines."""
        folder = self.folder
        files = sorted(folder.glob("*" + self.suffix)) if folder.is_dir() else []
        files = [p for p in files if self._matches(p.name) and p.is_file()]  # never a FIFO
        many = len(files) > 1 or (self.target == self.root and any(self._label(p) for p in files))
        out: list[str] = []
        for path in files:
            # bytes that are not UTF-8 come back as surrogate escapes
            with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.seek(self.offsets.get(path, 0))
                data = f.read()
                self.offsets[path] = f.tell()
            prefix = self._label(path) if many else ""
            out.append(self.lines.feed(path, data, prefix))
            if final:
                out.append(self.lines.rest(path, prefix))
        return "".join(out)


def read_logs(home: Path, ref: str, stream: str = "stdout") -> str:
    """What ``mnp logs REF`` (``--stderr``) prints, as one string."""
    store = open_store(home)
    try:
        target = resolve_target(store, ref)
    finally:
        if store is not None:
            store.close()
    return LogReader(home, target, stream).pump(final=True)


def events(
    home: Path,
    since: int = 0,
    *,
    job: str | None = None,
    follow: bool = False,
    timeout: float | None = None,
    every: float = 0.2,
) -> Iterator[dict[str, Any]]:
    """The events after ``since`` as ``mnp events`` prints them (``job``: an id or a name,
    its children and nodes too); ``follow``: then new ones as they come, every ``every``
    seconds, until ``timeout`` seconds have passed (None: for ever)."""
    store = open_store(home)
    if job is not None:
        job = resolve_target(store, job)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            store = store or open_store(home)
            if store is not None:
                for ev in store.events_since(since, job_id=job, per_child=True):
                    since = max(since, int(ev["seq"]))
                    yield dict(ev)
            if not follow or (deadline is not None and time.monotonic() >= deadline):
                return
            time.sleep(every)
    finally:
        if store is not None:
            store.close()
