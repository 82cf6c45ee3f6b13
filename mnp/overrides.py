"""The submit/run overrides (SPEC §2), one table: ``--name``, ``--nodes``, ``--attempts``...

Each row says once what an option is called (its keyword and its flag), how the
command line takes it (type, metavar, repeatable, flag) with its help text, and
how it edits the definition's TOML-shaped dictionary. ``mnp.cli.jobs.submit_options``
generates the click options of ``mnp run`` and ``mnp submit`` from it, and
``mnp.spec.overrides`` (``apply_overrides``, ``definition_from_command``) applies
it, so an override is added in one place.

Plain data, cheap to import: ``mnp.cli`` reads it at start, and neither ``mnp.spec``
nor ``dataclasses`` belongs in every ``mnp list`` (a NamedTuple, then).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Override(NamedTuple):
    """One submit/run option.

    ``edit`` says how the option edits the TOML-shaped dictionary ``raw``, at the
    dotted ``path``:

    - ``set``: ``raw[path] = value``
    - ``every``: the same, and in every node group (``resources.vcpus``...)
    - ``array``: in the existing ``[array]`` table (an error without one)
    - ``append``: to the list at ``path``
    - ``merge``: into the table at ``path``
    - ``env``: merge into ``environment``, and win over a group's own variable
    - ``nodes``: make or resize a multi-node job (applied before the others)
    - ``container``: in the job's ``[container]`` and every group's own ``container``:
      set ``path``, or append to it when ``multiple``
    - ``""``: no edit (``--export`` changes how the definition is read back)

    ``value`` converts what was given: ``whole``, ``number`` or ``text`` (as given);
    a flag sets ``True``.
    """

    name: str  # keyword of apply_overrides/definition_from_command, and click's dest
    flag: str
    help: str
    edit: str = "set"
    path: str = ""
    value: str = "text"
    cli_type: type | None = None  # on the command line; None: text
    metavar: str | None = None
    multiple: bool = False
    is_flag: bool = False
    pairs: bool = False  # K=V on the command line, a mapping for the API

    def given(self, value: Any) -> bool:
        """Whether ``value`` means the option was given (not its default)."""
        if self.is_flag or self.multiple or self.pairs:
            return bool(value)
        return value is not None

    def click_kwargs(self) -> dict[str, Any]:
        """The keywords of ``click.option(flag, name, **kwargs)``."""
        kw: dict[str, Any] = {"help": self.help}
        if self.cli_type is not None:
            kw["type"] = self.cli_type
        if self.metavar is not None:
            kw["metavar"] = self.metavar
        if self.multiple:
            kw["multiple"] = True
        if self.is_flag:
            kw["is_flag"] = True
        return kw


# in the order `mnp run --help` lists them (and the order they apply in, --nodes first)
OVERRIDES: tuple[Override, ...] = (
    Override("name", "--name", "Job name.", path="name"),
    Override("queue", "--queue", "Queue to submit to.", path="queue"),
    Override(
        "params",
        "--param",
        "Set a parameter.",
        edit="merge",
        path="parameters",
        metavar="K=V",
        multiple=True,
        pairs=True,
    ),
    Override(
        "env", "--env", "Set a variable.", edit="env", metavar="K=V", multiple=True, pairs=True
    ),
    Override(
        "tags",
        "--tag",
        "Tag the job (mnp list --tag K=V).",
        edit="merge",
        path="tags",
        metavar="K=V",
        multiple=True,
        pairs=True,
    ),
    Override("export_env", "--export", "Forward this shell's environment.", edit="", is_flag=True),
    Override(
        "array_size",
        "--array-size",
        "Make an array of N children.",
        path="array.size",
        value="whole",
        cli_type=int,
    ),
    Override(
        "array_parallelism",
        "--array-parallelism",
        "At most N children running.",
        edit="array",
        path="parallelism",
        value="whole",
        cli_type=int,
    ),
    Override(
        "sequential",
        "--sequential",
        "Array children run one after another.",
        edit="array",
        path="sequential",
        is_flag=True,
    ),
    Override(
        "depends_on",
        "--depends-on",
        "N_TO_N or afterany.",
        edit="append",
        path="depends_on",
        metavar="JOB[:TYPE]",
        multiple=True,
    ),
    Override(
        "nodes",
        "--nodes",
        "Multi-node: number of nodes.",
        edit="nodes",
        value="whole",
        cli_type=int,
    ),
    Override(
        "vcpus",
        "--vcpus",
        "vCPUs per task (per node for multinode).",
        edit="every",
        path="resources.vcpus",
        value="number",
        cli_type=float,
    ),
    Override(
        "memory",
        "--memory",
        "Memory per task, e.g. 512MiB.",
        edit="every",
        path="resources.memory",
    ),
    Override(
        "gpus",
        "--gpus",
        "GPUs per task (per node for multinode).",
        edit="every",
        path="resources.gpus",
        value="whole",
        cli_type=int,
    ),
    Override(
        "cpu_bind",
        "--cpu-bind",
        "CPU binding: cores (each task pinned to ceil(vcpus) cores of its own) or none (default).",
        edit="every",
        path="resources.cpu_bind",
        metavar="cores|none",
    ),
    Override(
        "attempts",
        "--attempts",
        "Attempts (1..10).",
        path="retry.attempts",
        value="whole",
        cli_type=int,
    ),
    Override(
        "timeout",
        "--timeout",
        "Per-attempt time limit, e.g. 90s, 2h.",
        path="timeout.attempt_duration",
    ),
    Override(
        "tasks_per_node",
        "--tasks-per-node",
        "Multi-node: tasks per node.",
        edit="every",
        path="tasks_per_node",
        value="whole",
        cli_type=int,
    ),
    Override(
        "mpi",
        "--mpi",
        "Multi-node: pmi starts each task as an MPI rank (PMI-1, MPICH ABI; no mpiexec), "
        "every group one MPI_COMM_WORLD; none (default) runs the command as it is.",
        edit="every",
        path="mpi",
        metavar="pmi|none",
    ),
    Override("cwd", "--cwd", "Working directory on the nodes (default: here).", path="cwd"),
    Override(
        "python_env",
        "--python-env",
        "Python environment whose bin/ tasks find first on PATH "
        "(default: the active venv/conda environment; none: the hosts' own PATH).",
        path="python_env",
        metavar="PATH|none",
    ),
    Override(
        "image",
        "--image",
        "Run the tasks in this container image (podman, docker or apptainer).",
        edit="container",
        path="image",
        metavar="IMAGE",
    ),
    Override(
        "mounts",
        "--mount",
        "Bind mount into the container, HOST:CONTAINER[:ro] (absolute paths).",
        edit="container",
        path="mounts",
        metavar="SPEC",
        multiple=True,
    ),
)

BY_NAME: dict[str, Override] = {o.name: o for o in OVERRIDES}
