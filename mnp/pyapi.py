"""``mnp.Client``: mnp from Python, on the client layer the CLI uses (``mnp.client``).

::

    import mnp

    c = mnp.Client()                       # starts the home's controller if none runs
    job = c.submit(command=["sh", "-c", "echo hi"], name="hello")
    print(c.wait(job)["state"], c.logs(job))

Every error is the ``mnp.errors.MnpError`` the CLI would print (``str(e)`` is the
line after ``mnp:``, ``e.exit_code`` its exit code). Submitting, waiting and ending
jobs go through the controller's socket; ``describe``, ``list``, ``logs`` and
``events`` read the home's store and log files directly, as the CLI does, so they
need no controller. Blocking and not thread-safe: one ``Client`` per thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mnp import client as layer
from mnp.errors import InfraError

_WIRE = ("ok", "id", "end")  # the socket protocol's own fields


class Client:
    """The controller of ``home`` (``$MNP_HOME``, else ``~/.local/state/mnp``), started
    in the background with ``inventory`` (a file, ``local``, ``slurm``, ``pbs``,
    ``hostfile:PATH``, ``auto``; default ``$MNP_INVENTORY``, else local) when none
    runs, as ``mnp submit`` does. A running controller that serves another inventory
    than the one asked for is a ``UsageError``."""

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        inventory: str | None = None,
        *,
        local_nodes: int = layer.DEFAULT_LOCAL_NODES,
    ) -> None:
        self.home = Path(home) if home is not None else layer.default_home()
        self.inventory = inventory or os.environ.get("MNP_INVENTORY") or None
        self.local_nodes = local_nodes
        self.warnings: list[str] = []  # what the controller warned about at the last submit
        with self._connect(start=True) as c:
            layer.check_serves(c, self.home, self.inventory, self.local_nodes)

    def __repr__(self) -> str:
        return f"mnp.Client(home={str(self.home)!r}, inventory={self.inventory!r})"

    def _connect(self, *, start: bool = True) -> Any:
        return layer.connect(
            self.home, start=start, inventory=self.inventory, local_nodes=self.local_nodes
        )

    def submit(
        self,
        definition: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        command: Sequence[str] | None = None,
        **overrides: Any,
    ) -> str:
        """Queue a job; its id. ``definition``: a TOML file's path or the same as a
        dictionary; or ``command`` alone (argv). ``overrides`` are ``mnp submit``'s
        options by keyword (``mnp.overrides.OVERRIDES``: ``name``, ``queue``,
        ``nodes``, ``array_size``, ``attempts``, ``timeout``...); ``params`` and
        ``env`` take mappings, ``depends_on`` a list. ``definition`` may also name a
        registered definition, ``"NAME:REV"`` or ``"NAME"`` (its newest active
        revision), when no file of that name is here."""
        if layer.looks_registered(definition) and command is None:
            defn = layer.build_registered(self.home, str(definition), overrides)
        else:
            defn = layer.build_definition(definition, command, overrides)
        with self._connect() as c:
            job_id, self.warnings = layer.submit(c, defn)
        return job_id

    def register(self, path: str | os.PathLike[str]) -> str:
        """Register a definition file (``mnp definitions register``): ``"NAME:REV"``."""
        with self._connect() as c:
            name, revision = layer.register(c, path)
        return f"{name}:{revision}"

    def describe(self, job: str) -> dict[str, Any]:
        """Everything about ``job`` (an id or a name: the newest of that name), as
        ``mnp describe --json``."""
        return layer.describe_job(self.home, job)

    def list(
        self,
        queue: str | None = None,
        state: str | None = None,
        tag: str | None = None,
        *,
        children: bool = False,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs, oldest first, as ``mnp list --all --json`` (``limit``: the newest N);
        ``tag``: ``"K=V"``."""
        rows, _ = layer.list_jobs(
            self.home,
            queue=queue,
            state=state,
            tag=tag,
            parents_only=not children,
            newest=limit,
        )
        return rows

    def cancel(self, job: str, reason: str) -> dict[str, Any]:
        """SUBMITTED/PENDING/RUNNABLE → FAILED: ``{"job_id", "name", "state"}``."""
        with self._connect(start=False) as c:
            return layer.end_job(c, "cancel", job, reason)

    def terminate(self, job: str, reason: str) -> dict[str, Any]:
        """As ``cancel``, and STARTING/RUNNING jobs are killed too."""
        with self._connect(start=False) as c:
            return layer.end_job(c, "terminate", job, reason)

    def wait(self, job: str, timeout: float | None = None) -> dict[str, Any]:
        """Once ``job`` has ended: ``{"job_id", "state", "reason", "exit_code",
        "timings"}``; ``TimeoutError`` after ``timeout`` seconds (None: for ever)."""
        with self._connect(start=False) as c:
            c.timeout = timeout
            try:
                outcome = c.request("wait", job_id=job)
            except InfraError as e:
                if isinstance(e.__cause__, TimeoutError):
                    raise TimeoutError(f"job {job} did not end within {timeout:g}s") from None
                raise
        return {"job_id": job, **{k: v for k, v in outcome.items() if k not in _WIRE}}

    def logs(self, job: str, stream: str = "stdout") -> str:
        """What ``mnp logs JOB`` prints so far (``stream="stderr"``: ``--stderr``)."""
        return layer.read_logs(self.home, job, stream)

    def events(
        self,
        since: int = 0,
        follow: bool = False,
        *,
        job: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The events after ``since``, as ``mnp events`` prints them; ``follow``: and
        new ones as they come, until ``timeout`` seconds have passed (None: for ever)."""
        return layer.events(self.home, since, job=job, follow=follow, timeout=timeout)
