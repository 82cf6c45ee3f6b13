"""Job definitions: TOML (SPEC §4) → a validated :class:`~mnp.model.JobDefinition`.

Choices where the spec is silent (also in the README):

- ``name`` defaults to the file's stem (made valid); names are 1..128 of
  ``A-Z a-z 0-9 _ -`` as in AWS Batch.
- ``type`` defaults to ``multinode`` when a ``[multinode]`` table is present.
- A multinode job without ``[[multinode.groups]]`` gets one group ``":"``
  running the top-level command on every node (as ``--nodes N`` does).
- A group's ``resources`` start from the top-level ``resources`` (only the
  keys it sets change); its ``tasks_per_node`` and ``gpu_bind`` default to the
  top-level ones. Its ``environment`` holds only its own variables; the task
  sees the job's environment, then the group's.
- ``environment`` and ``parameters`` values may be strings, numbers or
  booleans (written as TOML writes them: ``true``, ``1.5``).
- Dependencies: ``"ID"``, ``"ID:TYPE"`` or ``{job_id, type}``; TYPE is
  ``N_TO_N``, ``afterany`` or ``afterok`` (= plain), case-insensitive. A
  suffix that is a number is part of the id (``"42:7"`` is array child 7).
  ID may be a job's name: the controller takes the newest job of that name at
  submit (``mnp.jobref``) and keeps its id.
- Caps: 1..1000 nodes, 1..5 groups, 1..1024 tasks per node, 20 dependencies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from mnp.model import (
    ArrayProperties,
    Dependency,
    JobDefinition,
    JobType,
    MultiNodeProperties,
    NodeGroup,
    Resources,
    RetryRule,
    RetryStrategy,
    SecretRef,
    Timeout,
)
from mnp.spec.container import parse_container
from mnp.spec.fields import (
    ENV_NAME_RE,
    MAX_ARGV_BYTES,
    NAME_RE,
    Table,
    array_of,
    check_arg_size,
    check_env_name,
    fail,
    got,
    index_path,
    key_path,
    read_toml,
    show,
    string_map,
)
from mnp.spec.nodeset import describe_nodes, parse_node_range
from mnp.spec.units import parse_duration, parse_memory

TOP_FIELDS = (
    "name", "type", "command", "queue", "parameters", "environment", "secrets", "resources",
    "retry", "timeout", "array", "multinode", "depends_on", "aws_batch_env", "cwd", "python_env",
    "tasks_per_node", "gpu_bind", "tags", "mpi", "container",
)  # fmt: skip
RESOURCE_FIELDS = ("vcpus", "memory", "gpus", "cpu_bind")
RETRY_FIELDS = ("attempts", "evaluate_on_exit")
RULE_FIELDS = ("on_exit_code", "on_reason", "on_status_reason", "action")
TIMEOUT_FIELDS = ("attempt_duration", "kill_grace")
ARRAY_FIELDS = ("size", "parallelism", "sequential")
MULTINODE_FIELDS = ("num_nodes", "main_node", "exclusive", "on_child_failure", "groups")
GROUP_FIELDS = (
    "target_nodes", "command", "tasks_per_node", "resources", "environment", "gpu_bind", "mpi",
    "container",
)  # fmt: skip
DEPENDENCY_FIELDS = ("job_id", "type")
SECRET_FIELDS = ("file", "env")

MAX_NODES = 1000
MAX_GROUPS = 5
MAX_DEPENDENCIES = 20
MAX_RULES = 5
MAX_ATTEMPTS = 10
MIN_ARRAY, MAX_ARRAY = 2, 100_000
MAX_TASKS_PER_NODE = 1024
MAX_VCPUS = 100_000.0
MAX_GPUS = 1024
GPU_BINDS = ("per-node", "per-task")
MPI_KINDS = ("none", "pmi")  # pmi: mnp starts the ranks and serves PMI-1 (issue 16)
PMIX_REFUSED = (
    "PMIx (Open MPI) is not supported: mnp serves PMI-1 to MPICH-ABI MPIs only "
    "(MPICH, the mpich wheel, Intel MPI, MVAPICH); allowed none or pmi"
)
CPU_BINDS = ("none", "cores")  # default none: tasks float over the host's CPUs

NAME_RULE = "use 1 to 128 letters, digits, - and _"
REF_PATTERN = re.compile(r"Ref::([A-Za-z0-9_]+)")
"""A parameter placeholder in a command argument (``wiring`` substitutes it)."""
PARAM_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,128}")
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.:#-]{0,127}")  # an id or a job name
_EXIT_CODE_RE = re.compile(r"[0-9*?]{1,512}")
TAG_KEY_RE = re.compile(r"[A-Za-z0-9_.:/+@-]{1,128}")
TAG_KEY_RULE = "use 1 to 128 letters, digits and _ . : / + @ -"
MAX_TAGS, MAX_TAG_VALUE = 50, 256  # as AWS Batch
_DEP_TYPES = {"n_to_n": "N_TO_N", "afterany": "afterany", "afterok": None}


def load_definition(path: str | os.PathLike[str], *, open_refs: bool = False) -> JobDefinition:
    """Read and validate a job definition file; any problem is a SpecError.
    ``open_refs``: as in :func:`parse_definition`."""
    data, source = read_toml(path)
    return parse_definition(data, source, open_refs=open_refs)


def sanitize_name(text: str) -> str:
    """``text`` made into a valid job name (``my job.v2`` → ``my-job-v2``)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:128]
    return name or "job"


def parse_definition(
    data: dict[str, Any], source: str, *, open_refs: bool = False
) -> JobDefinition:
    """Validate ``data`` (a parsed TOML document) read from ``source``.

    A ``Ref::K`` in a command needs a value: ``K`` in ``[parameters]``. With
    ``open_refs`` it may stay without one, to be given by ``--param K=V``
    (AWS Batch SubmitJob parameters): the CLI reads a file so and checks again
    once its overrides are applied (:func:`mnp.spec.overrides.apply_overrides`).
    """
    t = Table(source, "", data, TOP_FIELDS, what="a table of job definition fields")
    name = t.string("name", None, pattern=NAME_RE, rule=NAME_RULE)
    if name is None:
        if source.startswith("<"):
            t.fail("name", f"missing; {NAME_RULE}")
        name = sanitize_name(PurePath(source).stem)
    queue = t.string("queue", "default", pattern=NAME_RE, rule=NAME_RULE)
    chosen = t.choice("type", None, [j.value for j in JobType])
    job_type = (
        JobType(chosen) if chosen else (JobType.MULTINODE if "multinode" in t else JobType.SINGLE)
    )
    command = command_field(source, "command", t.get("command")) if "command" in t else ()
    parameters = string_map(
        source, "parameters", t.get("parameters") if "parameters" in t else {}, _param_name
    )
    environment = string_map(
        source, "environment", t.get("environment") if "environment" in t else {}, check_env_name
    )
    secrets = _secrets(source, t)
    _check_secret_names(source, "environment", environment, secrets)
    resources = _resources(t.table("resources", RESOURCE_FIELDS), Resources())
    tasks_per_node = t.integer("tasks_per_node", 1, 1, MAX_TASKS_PER_NODE)
    gpu_bind = t.choice("gpu_bind", "per-node", GPU_BINDS)
    mpi = _mpi(t, "none")
    array = _array(t.table("array", ARRAY_FIELDS))
    multinode = None
    if job_type is JobType.MULTINODE:
        if array is not None:
            t.fail(
                "array",
                "an array job cannot be multinode (AWS Batch does not allow it); "
                "remove [array] or the [multinode] part",
            )
        mt = t.table("multinode", MULTINODE_FIELDS)
        if mt is None:
            t.fail("multinode", "missing; a multinode job needs a [multinode] table with num_nodes")
        multinode = _multinode(mt, command, resources, tasks_per_node, gpu_bind, mpi)
    else:
        if "multinode" in t:
            t.fail("multinode", 'only allowed with type = "multinode"')
        if "command" not in t:
            t.fail(
                "command",
                "missing; give the program and its arguments, e.g. "
                'command = ["python3", "train.py"]',
            )
        if mpi != "none":
            t.fail(
                "mpi",
                f'"{mpi}" needs a multinode job (its ranks are the tasks of its nodes); '
                "allowed none, or make it multinode (--nodes 1 for ranks on one node)",
            )
        if tasks_per_node != 1:
            t.fail(
                "tasks_per_node",
                f"{tasks_per_node} is not allowed for a single or array job "
                "(one task each); allowed 1, or make it multinode (--nodes N)",
            )
    if multinode is not None:
        for i, g in enumerate(multinode.groups):
            field = index_path("multinode.groups", i) + ".environment"
            _check_secret_names(source, field, g.environment, secrets)
    if not open_refs:
        _check_refs(source, parameters, command, multinode)
    depends_on = _dependencies(t)
    for i, dep in enumerate(depends_on):
        if dep.type == "N_TO_N" and array is None:
            fail(
                source,
                index_path("depends_on", i),
                "N_TO_N needs an array job; add an [array] table or --array-size",
            )
    cwd = t.string("cwd", None)
    if cwd == "":
        t.fail("cwd", "empty; give a directory or leave cwd out")
    python_env = t.string("python_env", None)
    if python_env is not None and python_env != "none" and not python_env.startswith("/"):
        t.fail(
            "python_env",
            f"{python_env!r} is not an absolute path; give the environment's prefix "
            '(e.g. "/home/alice/venv") or "none"',
        )
    return JobDefinition(
        name=name,
        command=command,
        type=job_type,
        queue=queue,
        parameters=parameters,
        environment=environment,
        secrets=secrets,
        resources=resources,
        retry=_retry(t.table("retry", RETRY_FIELDS)),
        timeout=_timeout(t.table("timeout", TIMEOUT_FIELDS)),
        array=array,
        multinode=multinode,
        depends_on=depends_on,
        tasks_per_node=tasks_per_node,
        gpu_bind=gpu_bind,
        mpi=mpi,
        aws_batch_env=t.boolean("aws_batch_env", False),
        cwd=cwd,
        python_env=python_env,
        tags=_tags(source, t),
        source=source,
        container=parse_container(source, "container", t.get("container"))
        if "container" in t
        else None,
    )


def command_field(source: str, field: str, value: object) -> tuple[str, ...]:
    """An argv list: non-empty, strings only, no NUL, a non-empty program name."""
    if isinstance(value, str):
        example = ", ".join(f'"{w}"' for w in value.split()[:4]) or '"prog", "arg"'
        fail(source, field, f"expected a list of strings, got a string; use a list: [{example}]")
    if not isinstance(value, list):
        fail(source, field, f"expected a list of strings, got {got(value)}")
    if not value:
        fail(source, field, "empty; give the program and its arguments")
    out = []
    for i, arg in enumerate(value):
        f = index_path(field, i)
        if isinstance(arg, int | float) and not isinstance(arg, bool):
            fail(source, f, f'expected a string, got {got(arg)}; quote it: "{show(arg)}"')
        if not isinstance(arg, str):
            fail(source, f, f"expected a string, got {got(arg)}")
        if "\x00" in arg:
            fail(source, f, "contains a NUL character, which no argument can hold")
        check_arg_size(source, f, arg)
        out.append(arg)
    total = sum(len(a.encode("utf-8", "surrogateescape")) + 1 for a in out)
    if total > MAX_ARGV_BYTES:
        fail(
            source,
            field,
            f"{total:,} bytes in all; a command can have at most {MAX_ARGV_BYTES:,}"
            "; pass big data in a file",
        )
    if not out[0].strip():
        fail(source, index_path(field, 0), "empty program name")
    return tuple(out)


def _tags(source: str, t: Table) -> dict[str, str]:
    tags = string_map(source, "tags", t.get("tags") if "tags" in t else {}, _tag_key)
    if len(tags) > MAX_TAGS:
        t.fail("tags", f"{len(tags)} tags; allowed at most {MAX_TAGS}")
    for k, v in tags.items():
        if len(v) > MAX_TAG_VALUE or not v.isprintable():
            fail(
                source,
                key_path("tags", k),
                f"use a value of at most {MAX_TAG_VALUE} printable characters",
            )
    return tags


def _tag_key(source: str, field: str, name: object) -> str:
    if not isinstance(name, str) or not TAG_KEY_RE.fullmatch(name):
        fail(source, field, f"not a valid tag key; {TAG_KEY_RULE}")
    return name


def _param_name(source: str, field: str, name: object) -> str:
    if not isinstance(name, str) or not PARAM_NAME_RE.fullmatch(name):
        fail(source, field, "not a valid parameter name; use 1 to 128 letters, digits and _")
    return name


def _secrets(source: str, t: Table) -> dict[str, SecretRef]:
    out: dict[str, SecretRef] = {}
    for key, value in (t.mapping("secrets") or {}).items():
        field = key_path("secrets", key)
        name = check_env_name(source, field, key)
        st = Table(
            source,
            field,
            value,
            SECRET_FIELDS,
            what='a table { file = "PATH" } or { env = "NAME" }',
        )
        if ("file" in st) == ("env" in st):
            fail(source, field, 'give exactly one of file = "PATH" or env = "NAME"')
        path = st.string("file", None)
        if path == "":
            st.fail("file", "empty; give the path of the file holding the secret")
        env = st.string("env", None, pattern=ENV_NAME_RE, rule="use an environment variable name")
        out[name] = SecretRef(file=path, env=env)
    return out


def _check_secret_names(
    source: str, field: str, environment: Mapping[str, str], secrets: Mapping[str, SecretRef]
) -> None:
    """An environment may neither set a secret's name nor the variable a secret is read
    from (``{ env = "NAME" }``): the definition is stored, and a secret never is."""
    if not secrets:
        return
    sources = {ref.env: name for name, ref in secrets.items() if ref.env is not None}
    for key in environment:
        if key in secrets:
            fail(source, key_path(field, key), "also set in [secrets]; keep one of them")
        if key in sources:
            fail(
                source,
                key_path(field, key),
                f'{key} is where secret {sources[key]} is read from ({{ env = "{key}" }}); '
                "an environment is stored with the job and a secret never is: "
                "set it only in the controller's environment",
            )


def _resources(rt: Table | None, base: Resources) -> Resources:
    if rt is None:
        return base
    return Resources(
        vcpus=rt.number("vcpus", base.vcpus, 0, MAX_VCPUS, lo_open=True),
        memory=rt.convert("memory", base.memory, parse_memory),
        gpus=rt.integer("gpus", base.gpus, 0, MAX_GPUS),
        cpu_bind=rt.choice("cpu_bind", base.cpu_bind, CPU_BINDS),
    )


def _retry(rt: Table | None) -> RetryStrategy:
    if rt is None:
        return RetryStrategy()
    attempts = rt.integer("attempts", 1, 1, MAX_ATTEMPTS)
    rules: list[RetryRule] = []
    if "evaluate_on_exit" in rt:
        field = rt.field("evaluate_on_exit")
        items = array_of(rt.source, field, rt.get("evaluate_on_exit"), "an array of tables")
        if len(items) > MAX_RULES:
            fail(rt.source, field, f"{len(items)} entries; allowed at most {MAX_RULES}")
        for i, item in enumerate(items):
            et = Table(rt.source, index_path(field, i), item, RULE_FIELDS)
            if "action" not in et:
                et.fail("action", 'missing; use "RETRY" or "EXIT"')
            action = et.choice("action", "", ("RETRY", "EXIT"))
            code = et.get("on_exit_code")
            if isinstance(code, int) and not isinstance(code, bool) and 0 <= code < 10**9:
                code = str(code)
            if code is not None and not (isinstance(code, str) and _EXIT_CODE_RE.fullmatch(code)):
                et.fail(
                    "on_exit_code",
                    f"{show(code)} is not an exit-code pattern; "
                    'use digits with * and ? as wildcards, e.g. "137" or "1*"',
                )
            globs = {}
            for key in ("on_reason", "on_status_reason"):
                globs[key] = et.string(key, "*")
                if not globs[key] or len(globs[key]) > 512:
                    et.fail(key, "use a pattern of 1 to 512 characters (* and ? are wildcards)")
            rules.append(RetryRule(action=action, on_exit_code=str(code or "*"), **globs))
    return RetryStrategy(attempts=attempts, evaluate_on_exit=tuple(rules))


def _timeout(tt: Table | None) -> Timeout:
    if tt is None:
        return Timeout()
    duration = tt.convert("attempt_duration", None, parse_duration)
    if duration is not None and duration < 1:
        tt.fail("attempt_duration", f"{duration:g}s is too short; allowed 1s or more")
    grace = tt.convert("kill_grace", Timeout().kill_grace, parse_duration)
    return Timeout(attempt_duration=duration, kill_grace=grace)


def _array(at: Table | None) -> ArrayProperties | None:
    if at is None:
        return None
    size = at.integer("size", None, MIN_ARRAY, MAX_ARRAY)
    if size is None:
        at.fail("size", f"missing; give the number of children, {MIN_ARRAY}..{MAX_ARRAY}")
    return ArrayProperties(
        size=size,
        parallelism=at.integer("parallelism", None, 1, MAX_ARRAY),
        sequential=at.boolean("sequential", False),
    )


def _mpi(t: Table, default: str) -> str:
    """The ``mpi`` field: ``pmix`` is refused with its own reason (README: Direct MPI launch)."""
    value = t.get("mpi")
    if isinstance(value, str) and value.lower() == "pmix":
        t.fail("mpi", PMIX_REFUSED)
    return t.choice("mpi", default, MPI_KINDS)


def _multinode(
    mt: Table,
    command: tuple[str, ...],
    resources: Resources,
    tasks_per_node: int,
    gpu_bind: str,
    mpi: str = "none",
) -> MultiNodeProperties:
    src = mt.source
    num_nodes = mt.integer("num_nodes", None, 1, MAX_NODES)
    if num_nodes is None:
        mt.fail("num_nodes", f"missing; give the number of nodes, 1..{MAX_NODES}")
    main_node = mt.integer("main_node", 0, 0, num_nodes - 1)
    groups: list[NodeGroup] = []
    if "groups" not in mt:
        groups.append(
            NodeGroup(
                0, num_nodes - 1, command or None, tasks_per_node, resources, {}, gpu_bind, mpi
            )
        )
    else:
        field = mt.field("groups")
        items = array_of(src, field, mt.get("groups"), "an array of tables ([[multinode.groups]])")
        if not 1 <= len(items) <= MAX_GROUPS:
            fail(src, field, f"{len(items)} groups; allowed 1..{MAX_GROUPS}")
        for i, item in enumerate(items):
            gt = Table(src, index_path(field, i), item, GROUP_FIELDS)
            groups.append(_group(gt, num_nodes, resources, tasks_per_node, gpu_bind, mpi))
        _check_cover(src, field, groups, num_nodes)
    _, main_group = next((i, g) for i, g in enumerate(groups) if g.contains(main_node))
    if main_group.command is None and not command:
        fail(
            src,
            "command",
            "missing; the main node's group has no command, so give a top-level "
            "command or one in that group",
        )
    return MultiNodeProperties(
        num_nodes=num_nodes,
        groups=tuple(groups),
        main_node=main_node,
        exclusive=mt.boolean("exclusive", True),
        on_child_failure=mt.choice("on_child_failure", "ignore", ("ignore", "terminate")),
    )


def _group(
    gt: Table, num_nodes: int, resources: Resources, tasks_per_node: int, gpu_bind: str, mpi: str
) -> NodeGroup:
    if "target_nodes" not in gt:
        gt.fail("target_nodes", 'missing; give the nodes, e.g. "0", "1:3", "4:" or ":"')
    target = gt.get("target_nodes")
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < 10**9:
        target = str(target)
    if not isinstance(target, str):
        gt.fail(
            "target_nodes", f'expected a string like "0", "1:3", "4:" or ":", got {got(target)}'
        )
    start, end = gt.convert("target_nodes", (0, 0), lambda _: parse_node_range(target, num_nodes))
    command = (
        command_field(gt.source, gt.field("command"), gt.get("command"))
        if "command" in gt
        else None
    )
    env = string_map(
        gt.source,
        gt.field("environment"),
        gt.get("environment") if "environment" in gt else {},
        check_env_name,
    )
    return NodeGroup(
        start=start,
        end=end,
        command=command,
        tasks_per_node=gt.integer("tasks_per_node", tasks_per_node, 1, MAX_TASKS_PER_NODE),
        resources=_resources(gt.table("resources", RESOURCE_FIELDS), resources),
        environment=env,
        gpu_bind=gt.choice("gpu_bind", gpu_bind, GPU_BINDS),
        mpi=_mpi(gt, mpi),
        container=parse_container(gt.source, gt.field("container"), gt.get("container"))
        if "container" in gt
        else None,
    )


def _check_cover(src: str, field: str, groups: Sequence[NodeGroup], num_nodes: int) -> None:
    owner = [-1] * num_nodes
    for i, g in enumerate(groups):
        clash = [n for n in range(g.start, g.end + 1) if owner[n] >= 0]
        if clash:
            other = index_path(field, owner[clash[0]])
            fail(
                src,
                key_path(index_path(field, i), "target_nodes"),
                f"{describe_nodes(clash)} also in {other}; each node must be in exactly one group",
            )
        for n in range(g.start, g.end + 1):
            owner[n] = i
    missing = [n for n in range(num_nodes) if owner[n] < 0]
    if missing:
        fail(
            src,
            field,
            f"{describe_nodes(missing)} in no group; the groups must cover nodes "
            f"0..{num_nodes - 1} exactly once",
        )


def _commands(
    command: tuple[str, ...], multinode: MultiNodeProperties | None
) -> list[tuple[str, tuple[str, ...]]]:
    """(field, argv) of every command of a job: the top-level one and the groups'."""
    commands: list[tuple[str, tuple[str, ...]]] = [("command", command)]
    for i, g in enumerate(multinode.groups if multinode else ()):
        if g.command is not None:
            commands.append((f"multinode.groups[{i}].command", g.command))
    return commands


def refs_used(defn: JobDefinition) -> set[str]:
    """The parameter names that some ``Ref::K`` of the job's commands names."""
    return {
        ref
        for _, argv in _commands(defn.command, defn.multinode)
        for arg in argv
        for ref in REF_PATTERN.findall(arg)
    }


def _check_refs(
    source: str,
    parameters: dict[str, str],
    command: tuple[str, ...],
    multinode: MultiNodeProperties | None,
) -> None:
    declared = ", ".join(sorted(parameters)) or "none"
    for field, argv in _commands(command, multinode):
        for j, arg in enumerate(argv):
            for ref in REF_PATTERN.findall(arg):
                if ref not in parameters:
                    fail(
                        source,
                        index_path(field, j),
                        f"Ref::{ref} names no parameter; declared parameters: {declared}; "
                        f"declare it in [parameters] or give --param {ref}=VALUE",
                    )


def _dependencies(t: Table) -> tuple[Dependency, ...]:
    if "depends_on" not in t:
        return ()
    value = t.get("depends_on")
    if isinstance(value, str):
        t.fail("depends_on", f'expected a list, got a string; use a list: ["{show(value)[1:-1]}"]')
    items = array_of(t.source, "depends_on", value, 'a list of "ID" or "ID:TYPE"')
    if len(items) > MAX_DEPENDENCIES:
        t.fail("depends_on", f"{len(items)} dependencies; allowed at most {MAX_DEPENDENCIES}")
    out: list[Dependency] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        field = index_path("depends_on", i)
        dep = _dependency(t.source, field, item)
        if dep.job_id in seen:
            fail(t.source, field, f"job {dep.job_id} is listed twice; list each job once")
        seen.add(dep.job_id)
        out.append(dep)
    return tuple(out)


def _dependency(source: str, field: str, item: object) -> Dependency:
    job_id: object
    dep_type: object
    if isinstance(item, str):
        job_id, dep_type = item.strip(), None
        head, sep, tail = job_id.rpartition(":")
        if sep and not tail.isdigit():  # "42:7" is array child 7, not a type
            job_id, dep_type = head, tail
        id_field = type_field = field
    elif isinstance(item, dict):
        dt = Table(source, field, item, DEPENDENCY_FIELDS)
        if "job_id" not in dt:
            dt.fail("job_id", "missing; give the id of the job to wait for")
        job_id, dep_type = dt.get("job_id"), dt.get("type")
        if isinstance(job_id, int) and not isinstance(job_id, bool) and 0 <= job_id < 10**18:
            job_id = str(job_id)
        id_field, type_field = dt.field("job_id"), dt.field("type")
    else:
        fail(source, field, f'expected "ID", "ID:TYPE" or {{ job_id, type }}, got {got(item)}')
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        fail(
            source,
            id_field,
            f"{show(job_id)} is not a job id or name; use an id from mnp submit or a "
            'job\'s name, optionally with a type: "42", "42:N_TO_N", "train:afterany"',
        )
    if dep_type is None:
        return Dependency(job_id=job_id)
    if isinstance(dep_type, str) and dep_type.lower() == "sequential":
        fail(
            source,
            type_field,
            "SEQUENTIAL is not a dependency type but an array's order; "
            "use [array] sequential = true or --sequential",
        )
    if not isinstance(dep_type, str) or dep_type.lower() not in _DEP_TYPES:
        fail(
            source,
            type_field,
            f"{show(dep_type)} is not a dependency type; use N_TO_N, "
            "afterany or afterok (the default: wait for success)",
        )
    return Dependency(job_id=job_id, type=_DEP_TYPES[dep_type.lower()])
