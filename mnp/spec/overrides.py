"""Command-line overrides (``--nodes``, ``--attempts``...) and ``mnp run -- CMD``.

An override edits the definition's TOML-shaped dictionary
(:func:`definition_to_dict`), and the result goes through the very same
validation as a file. A problem the override caused is reported against
``<command line>`` and the option: ``<command line>:--attempts: 11 is out of
range; allowed 1..10``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mnp.errors import SpecError
from mnp.model import JobDefinition, JobType, Resources, RetryRule
from mnp.overrides import BY_NAME, OVERRIDES, Override
from mnp.spec.container import container_to_dict
from mnp.spec.definition import MAX_NODES, parse_definition, refs_used, sanitize_name
from mnp.spec.fields import ENV_NAME_RE, MAX_ARG_BYTES, RESERVED_ENV_PREFIXES, fail, show
from mnp.spec.units import format_memory

COMMAND_LINE = "<command line>"

# (field path pattern, options that may have caused an error there, first given wins)
_GROUP = r"(?:multinode\.groups\[\d+\]\.)?"
_BLAME: list[tuple[re.Pattern[str], tuple[str, ...]]] = [
    (re.compile(p), flags)
    for p, flags in [
        (r"name$", ("--name",)),
        (r"queue$", ("--queue",)),
        (r"parameters\b", ("--param",)),
        (r"tags\b", ("--tag",)),
        (_GROUP + r"environment\b", ("--env",)),
        (r"array\.size$", ("--array-size",)),
        (r"array\.parallelism$", ("--array-parallelism",)),
        (r"array\.sequential$", ("--sequential",)),
        (r"array$", ("--array-size", "--nodes")),
        (r"depends_on\b", ("--depends-on",)),
        (_GROUP + r"resources\.vcpus$", ("--vcpus",)),
        (_GROUP + r"resources\.memory$", ("--memory",)),
        (_GROUP + r"resources\.gpus$", ("--gpus",)),
        (_GROUP + r"resources\.cpu_bind$", ("--cpu-bind",)),
        (_GROUP + r"tasks_per_node$", ("--tasks-per-node", "--nodes")),
        (_GROUP + r"mpi$", ("--mpi",)),
        (r"retry\.attempts$", ("--attempts",)),
        (r"timeout\.attempt_duration$", ("--timeout",)),
        (r"cwd$", ("--cwd",)),
        (r"python_env$", ("--python-env",)),
        (_GROUP + r"container\.image$", ("--image",)),
        (_GROUP + r"container\.mounts\b", ("--mount",)),
        (r"(type|multinode)\b", ("--nodes",)),
        (r"command\b", ("--nodes",)),
    ]
]


def definition_to_dict(defn: JobDefinition) -> dict[str, Any]:
    """``defn`` as the TOML-shaped dictionary :func:`parse_definition` reads back.

    Everything is explicit (group resources in full, ranges as ``"S:E"``);
    ``export_env`` and ``source`` are not definition fields and are left out.
    """
    d: dict[str, Any] = {"name": defn.name, "type": defn.type.value, "queue": defn.queue}
    if defn.command:
        d["command"] = list(defn.command)
    if defn.parameters:
        d["parameters"] = dict(defn.parameters)
    if defn.environment:
        d["environment"] = dict(defn.environment)
    if defn.secrets:
        d["secrets"] = {
            k: {"file": s.file} if s.file is not None else {"env": s.env}
            for k, s in defn.secrets.items()
        }
    d["resources"] = _resources_dict(defn.resources)
    d["retry"] = {
        "attempts": defn.retry.attempts,
        "evaluate_on_exit": [_rule_dict(r) for r in defn.retry.evaluate_on_exit],
    }
    d["timeout"] = {"kill_grace": defn.timeout.kill_grace}
    if defn.timeout.attempt_duration is not None:
        d["timeout"]["attempt_duration"] = defn.timeout.attempt_duration
    if defn.array is not None:
        d["array"] = {"size": defn.array.size, "sequential": defn.array.sequential}
        if defn.array.parallelism is not None:
            d["array"]["parallelism"] = defn.array.parallelism
    if defn.multinode is not None:
        mn = defn.multinode
        groups = []
        for g in mn.groups:
            gd: dict[str, Any] = {
                "target_nodes": f"{g.start}:{g.end}",
                "tasks_per_node": g.tasks_per_node,
                "resources": _resources_dict(g.resources),
                "environment": dict(g.environment),
                "gpu_bind": g.gpu_bind,
            }
            if g.mpi != "none" or defn.mpi != "none":
                gd["mpi"] = g.mpi
            if g.command is not None:
                gd["command"] = list(g.command)
            if g.container is not None:
                gd["container"] = container_to_dict(g.container)
            groups.append(gd)
        d["multinode"] = {
            "num_nodes": mn.num_nodes,
            "main_node": mn.main_node,
            "exclusive": mn.exclusive,
            "on_child_failure": mn.on_child_failure,
            "groups": groups,
        }
    if defn.depends_on:
        d["depends_on"] = [
            {"job_id": dep.job_id, "type": dep.type} if dep.type else {"job_id": dep.job_id}
            for dep in defn.depends_on
        ]
    d["tasks_per_node"] = defn.tasks_per_node
    d["gpu_bind"] = defn.gpu_bind
    if defn.mpi != "none":
        d["mpi"] = defn.mpi
    d["aws_batch_env"] = defn.aws_batch_env
    if defn.cwd is not None:
        d["cwd"] = defn.cwd
    if defn.python_env is not None:
        d["python_env"] = defn.python_env
    if defn.container is not None:
        d["container"] = container_to_dict(defn.container)
    if defn.tags:
        d["tags"] = dict(defn.tags)
    return d


def _rule_dict(r: RetryRule) -> dict[str, str]:
    d = {"on_exit_code": r.on_exit_code, "on_reason": r.on_reason, "action": r.action}
    if r.on_status_reason != "*":
        d["on_status_reason"] = r.on_status_reason
    return d


def _resources_dict(r: Resources) -> dict[str, Any]:
    d: dict[str, Any] = {"vcpus": r.vcpus, "memory": format_memory(r.memory), "gpus": r.gpus}
    if r.cpu_bind != "none":
        d["cpu_bind"] = r.cpu_bind
    return d


def apply_overrides(
    defn: JobDefinition, *, environ: Mapping[str, str] | None = None, **overrides: Any
) -> JobDefinition:
    """A new definition: ``defn`` with the submit/run options applied and validated again.

    ``--nodes N`` on a multinode job sets ``num_nodes`` and stretches every
    group that ended at the old last node to the new last node; on a single
    job it makes a multinode job of N nodes with one group ``":"`` running the
    command on every node. ``--vcpus/--memory/--gpus`` and ``--tasks-per-node``
    apply to the job and to every group; ``--env K=V`` also wins over a
    group's own ``K``. Numbers may be given as strings (as click passes them).

    ``--param K=V`` gives ``Ref::K`` its value, declared in ``[parameters]`` or
    not (``defn`` may come from ``load_definition(path, open_refs=True)``); every
    ``Ref::K`` must have a value afterwards, and a ``K`` that no ``Ref::K`` of
    the job's commands names is an error (a typo would otherwise go unnoticed).

    ``environ``: the submitting shell's environment, what ``--export`` forwards
    (default: this process's).
    """
    _check_names(overrides)
    raw = definition_to_dict(defn)
    given = _apply(raw, overrides)
    export_env = bool(overrides.get("export_env")) or defn.export_env
    result = _reparse(raw, defn.source, given, export_env, environ)
    _check_params_used(result, overrides.get("params"))
    return result


def definition_from_command(
    argv: Sequence[str], *, environ: Mapping[str, str] | None = None, **overrides: Any
) -> JobDefinition:
    """The definition for ``mnp run [opts] -- CMD ARGS``; ``overrides`` and ``environ``
    as in :func:`apply_overrides`. The name is ``CMD``'s basename, made valid."""
    if not argv:
        fail(COMMAND_LINE, "command", "no command given; put it after --, e.g. mnp run -- hostname")
    program = argv[0] if isinstance(argv[0], str) else ""
    raw: dict[str, Any] = {
        "name": sanitize_name(os.path.basename(program.rstrip("/"))),
        "command": list(argv),
    }
    _check_names(overrides)
    given = _apply(raw, overrides)
    result = _reparse(raw, COMMAND_LINE, given, bool(overrides.get("export_env")), environ)
    _check_params_used(result, overrides.get("params"))
    return result


def _check_names(overrides: Mapping[str, Any]) -> None:
    """A keyword that is not an override is refused, naming every one that is."""
    unknown = sorted(set(overrides) - set(BY_NAME))
    if unknown:
        valid = ", ".join(o.name for o in OVERRIDES)
        raise TypeError(f"unknown override {', '.join(unknown)}; the overrides are: {valid}")


def _check_params_used(defn: JobDefinition, params: Mapping[str, str] | None) -> None:
    """A ``--param K=V`` that no ``Ref::K`` of the job's commands names is refused."""
    if not params:
        return
    used = refs_used(defn)
    for key in params:
        if key not in used:
            uses = ", ".join(sorted(used)) or "none"
            fail(
                COMMAND_LINE,
                "--param",
                f"{key}: no Ref::{key} in the job's commands uses it; "
                f"parameters the commands use: {uses}",
            )


def _reparse(
    raw: dict[str, Any],
    source: str,
    given: set[str],
    export_env: bool,
    environ: Mapping[str, str] | None,
) -> JobDefinition:
    try:
        defn = parse_definition(raw, source)
    except SpecError as e:
        for pattern, flags in _BLAME:
            if pattern.match(e.field):
                flag = next((f for f in flags if f in given), None)
                if flag is not None:
                    raise SpecError(COMMAND_LINE, flag, e.detail) from None
        raise
    if not export_env:
        return defn
    forwarded = exported(defn, os.environ if environ is None else environ)
    return dataclasses.replace(defn, export_env=True, environment=forwarded)


def exported(defn: JobDefinition, environ: Mapping[str, str]) -> dict[str, str]:
    """The job's ``environment`` with ``--export``: the submitting shell's variables
    first, so that the definition's own (and ``--env``) win over them. Variables that
    cannot be forwarded are left out: names that are not valid names (exported shell
    functions), the MNP_*/AWS_BATCH_* that mnp sets itself, names the job takes from
    ``[secrets]`` and the variables its ``{ env = NAME }`` secrets are read from (the
    environment is stored with the job, a secret never), values too long for a task."""
    hidden = {*defn.secrets, *(s.env for s in defn.secrets.values() if s.env is not None)}
    out = {
        k: v
        for k, v in environ.items()
        if ENV_NAME_RE.fullmatch(k)
        and not k.startswith(RESERVED_ENV_PREFIXES)
        and k not in hidden
        and len(v.encode("utf-8", "surrogateescape")) <= MAX_ARG_BYTES
    }
    out.update(defn.environment)
    return out


def _apply(raw: dict[str, Any], overrides: Mapping[str, Any]) -> set[str]:
    """Edit ``raw`` in place as the table ``OVERRIDES`` says, ``--nodes`` first (it
    makes the groups the others then edit); return the flags of the options given."""
    given: set[str] = set()
    groups: list[dict[str, Any]] = raw.get("multinode", {}).get("groups", [])
    ordered = sorted(OVERRIDES, key=lambda o: o.edit != "nodes")  # stable: table order
    for opt in ordered:
        value: Any = overrides.get(opt.name)
        if not opt.edit or not opt.given(value):
            continue
        given.add(opt.flag)
        if opt.is_flag:
            value = True
        elif opt.value == "whole":
            value = _whole(opt.flag, value)
        elif opt.value == "number":
            value = _number(opt.flag, value)
        if opt.edit == "nodes":
            groups = _set_nodes(raw, value)
        elif opt.edit == "set":
            _put(raw, opt.path, value)
        elif opt.edit == "every":
            for table in (raw, *groups):
                _put(table, opt.path, value)
        elif opt.edit == "array":
            _array_of(raw, opt.flag)[opt.path] = value
        elif opt.edit == "append":
            items = [value] if isinstance(value, str) else list(value)
            raw[opt.path] = [*raw.get(opt.path, []), *items]
        elif opt.edit == "merge":
            raw[opt.path] = {**raw.get(opt.path, {}), **value}
        elif opt.edit == "container":
            _edit_containers(raw, groups, opt, value)
        elif opt.edit == "env":
            raw["environment"] = {**raw.get("environment", {}), **value}
            for g in groups:  # --env K=V wins over a group's own K
                if "environment" in g:
                    g["environment"] = {k: value.get(k, v) for k, v in g["environment"].items()}
        else:  # pragma: no cover - the table is checked by the tests
            raise AssertionError(f"{opt.flag}: unknown edit {opt.edit!r}")
    return given


def _edit_containers(
    raw: dict[str, Any], groups: list[dict[str, Any]], opt: Override, value: Any
) -> None:
    """``--image``/``--mount``: in the job's ``[container]`` and in every group's own
    ``container`` (a group's wins over the job's, so it must change too). ``--image``
    makes the job's table when there is none; ``--mount`` needs a container."""
    if "container" not in raw:
        if opt.multiple:
            fail(
                COMMAND_LINE,
                opt.flag,
                "needs a container to mount into; give --image IMAGE or a [container] table",
            )
        raw["container"] = {}
    tables = [raw["container"], *(g["container"] for g in groups if "container" in g)]
    for table in tables:
        if opt.multiple:
            items = [value] if isinstance(value, str) else list(value)
            table[opt.path] = [*table.get(opt.path, []), *items]
        else:
            table[opt.path] = value


def _put(table: dict[str, Any], path: str, value: object) -> None:
    """``table[a][b] = value`` for the dotted path ``a.b``, making the tables on the way."""
    *outer, last = path.split(".")
    for key in outer:
        table = table.setdefault(key, {})
    table[last] = value


def submitter_python_env(environ: Mapping[str, str], prefix: str, base_prefix: str) -> str | None:
    """The Python environment the submitting shell works in, for ``python_env``: the
    activated virtual environment (``VIRTUAL_ENV``: venv, virtualenv, uv) or conda
    environment (``CONDA_PREFIX``), else the virtual environment mnp itself runs from
    (``bin/mnp`` called without activating it); None on a system-wide Python."""
    for name in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        value = environ.get(name, "")
        if value.startswith("/"):
            return os.path.normpath(value)
    if prefix != base_prefix and prefix.startswith("/"):
        return os.path.normpath(prefix)
    return None


def _set_nodes(raw: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Apply ``--nodes n``; return the groups (new ones for a single job)."""
    if not 1 <= n <= MAX_NODES:
        fail(COMMAND_LINE, "--nodes", f"{n} is out of range; allowed 1..{MAX_NODES}")
    if raw.get("type") != JobType.MULTINODE.value:
        group: dict[str, Any] = {"target_nodes": ":"}
        if "command" in raw:
            group["command"] = list(raw["command"])
        raw["type"] = JobType.MULTINODE.value
        raw["multinode"] = {"num_nodes": n, "groups": [group]}
        return [group]
    mn = raw["multinode"]
    old_last = mn["num_nodes"] - 1
    groups: list[dict[str, Any]] = mn["groups"]
    needed = mn.get("main_node", 0) + 1
    for g in groups:
        start, _, end = g["target_nodes"].partition(":")
        if int(end) == old_last:
            g["target_nodes"] = f"{start}:{n - 1}"
            needed = max(needed, int(start) + 1)
        else:
            needed = max(needed, int(end) + 1)
    if n < needed:
        fail(
            COMMAND_LINE,
            "--nodes",
            f"{n} is too few for this job's node groups and main node; "
            f"allowed {needed}..{MAX_NODES}",
        )
    mn["num_nodes"] = n
    return groups


def _array_of(raw: dict[str, Any], flag: str) -> dict[str, Any]:
    if "array" not in raw:
        fail(COMMAND_LINE, flag, "needs an array job; add --array-size N or an [array] table")
    array: dict[str, Any] = raw["array"]
    return array


def _whole(flag: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,18}\s*", value, re.A):
        return int(value)
    fail(COMMAND_LINE, flag, f"expected a whole number, got {show(value)}")


def _number(flag: str, value: object) -> float | int:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?(\d{1,18}(\.\d*)?|\.\d+)\s*", value, re.A):
        return float(value)
    fail(COMMAND_LINE, flag, f"expected a number, got {show(value)}")
