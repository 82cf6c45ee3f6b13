"""Job definitions, inventories and nodesets: TOML → the validated model (pure).

Everything here raises :class:`~mnp.errors.SpecError` (``file:field: what is
wrong; what is allowed``, one line) for bad input, and nothing else; the unit
parsers in :mod:`mnp.spec.units` and :mod:`mnp.spec.nodeset` raise ``ValueError``.
"""

from __future__ import annotations

import os
from typing import Any

from mnp.errors import SpecError
from mnp.model import JobType
from mnp.spec.definition import (
    REF_PATTERN,
    load_definition,
    parse_definition,
    refs_used,
    sanitize_name,
)
from mnp.spec.fields import read_toml
from mnp.spec.inventory import (
    load_inventory,
    local_inventory,
    parse_inventory,
    unverified_warning,
)
from mnp.spec.nodeset import expand_nodeset, expand_slurm_cpus, fold_nodeset, parse_node_range
from mnp.spec.overrides import (
    COMMAND_LINE,
    apply_overrides,
    definition_from_command,
    definition_to_dict,
    submitter_python_env,
)
from mnp.spec.sources import (
    hostfile_inventory,
    pbs_inventory,
    resolve_inventory,
    slurm_inventory,
)
from mnp.spec.units import format_duration, format_memory, parse_duration, parse_memory

__all__ = [
    "COMMAND_LINE",
    "REF_PATTERN",
    "apply_overrides",
    "definition_from_command",
    "definition_to_dict",
    "expand_nodeset",
    "expand_slurm_cpus",
    "fold_nodeset",
    "format_duration",
    "format_memory",
    "hostfile_inventory",
    "load_definition",
    "load_inventory",
    "local_inventory",
    "parse_definition",
    "parse_duration",
    "parse_inventory",
    "parse_memory",
    "parse_node_range",
    "pbs_inventory",
    "refs_used",
    "resolve_inventory",
    "sanitize_name",
    "slurm_inventory",
    "submitter_python_env",
    "unverified_warning",
    "validate_file",
    "validation_report",
]


def validate_file(path: str | os.PathLike[str]) -> str:
    """Validate a job definition or an inventory (a file with ``hosts``); return one line:
    ``nodegroups/mpi-hello.toml: ok (multinode job "mpi-hello", 4 nodes, 2 groups)``.

    A ``Ref::K`` that ``[parameters]`` does not declare is allowed (``--param K=V``
    gives it a value at submit) and said: ``...; needs --param K=VALUE)``."""
    data, source = read_toml(path)
    return f"{source}: ok ({_check(data, source)[1]})"


def validation_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``mnp validate --json``'s entry for one file: ``file``, ``kind`` (``definition``,
    ``inventory``, or None when the file cannot be read as TOML), ``ok``, then
    ``summary`` (what :func:`validate_file` says in parentheses) or ``error`` (the
    one-line SpecError); a definition also has ``needs_params``, the ``Ref::K``
    that only ``--param`` can give a value."""
    report: dict[str, Any] = {"file": os.fspath(path), "kind": None, "ok": False}
    try:
        data, source = read_toml(path)
        report["kind"] = "inventory" if "hosts" in data else "definition"
        needs, summary = _check(data, source)
    except SpecError as e:
        report["error"] = str(e)
        return report
    report.update(ok=True, summary=summary)
    if needs is not None:
        report["needs_params"] = needs
    return report


def _check(data: dict[str, Any], source: str) -> tuple[list[str] | None, str]:
    """(for a definition: the parameters only --param can give, the summary)."""
    if "hosts" in data:
        inv = parse_inventory(data, source)
        return None, (
            f"inventory, {_count(len(inv.hosts), 'host')}, "
            f"{_count(len(inv.compute_environments), 'compute environment')}, "
            f"{_count(len(inv.queues), 'queue')}"
        )
    defn = parse_definition(data, source, open_refs=True)
    if defn.multinode is not None:
        mn = defn.multinode
        what = (
            f'multinode job "{defn.name}", {_count(mn.num_nodes, "node")}, '
            f"{_count(len(mn.groups), 'group')}"
        )
    elif defn.array is not None:
        what = f'array job "{defn.name}", {_count(defn.array.size, "child", "children")}'
    else:
        what = f'{JobType.SINGLE.value} job "{defn.name}"'
    needed = sorted(refs_used(defn) - defn.parameters.keys())
    if needed:
        what += "; needs " + " ".join(f"--param {k}=VALUE" for k in needed)
    return needed, what


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"
