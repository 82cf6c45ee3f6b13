"""``mnp run [OPTIONS] -- CMD ARGS`` against a running controller, started quickly:
without click, ``mnp.spec`` or ``mnp.model`` (about half the imports of the full
command, ~30 ms of a warm ``mnp run`` here).

The client sends its command line as given, with its working directory, environment
and Python (``mnp.client.Submitter``); the controller builds the definition with the
``run`` command itself (``mnp.cli.jobs.definition_from_argv``), so the job is the one
the full command would have submitted. Where that is not certain, nothing is sent
and ``quick_run`` returns None for the full command to run from the start: no
controller running, one serving another inventory than ``MNP_INVENTORY`` names, a
definition file, a help or common option (``--home``, ``--inventory``,
``--local-nodes``, ``--debug``), a terminal to draw progress on. ``-v``/``--verbose``
is the client's own (the timings printed at the end, as the full command prints them
against a running controller): it is not sent.
A command line the controller refuses (anything wrong in it) also returns None
before any job was accepted: the full command then says what is wrong, in its words.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mnp.errors import MnpError

if TYPE_CHECKING:
    from pathlib import Path

    from mnp.api.client import ApiClient

NOT_QUICK = frozenset({"--help", "--home", "--inventory", "--local-nodes", "--debug"})
"""Options before ``--`` that leave the run to the full command (with ``-h`` and any
other short option but ``-v``)."""

VERBOSE = frozenset({"-v", "--verbose"})


def quick_run(argv: list[str]) -> int | None:
    """``mnp run ARGV`` (ARGV: what follows ``run``) through a running controller; its
    exit code, or None when the full command is to run it instead (nothing was
    submitted)."""
    if "--" not in argv or not argv[argv.index("--") + 1 :]:
        return None
    cut = argv.index("--")
    verbose = False
    if any(arg in VERBOSE for arg in argv[:cut]):
        from mnp.overrides import OVERRIDES

        takes_value = {o.flag for o in OVERRIDES if not o.is_flag}
        for before, arg in zip(["", *argv[:cut]], argv[:cut], strict=False):
            if arg in VERBOSE and before in takes_value:
                return None  # an option's value, as click reads it: the full command's
        verbose = True
        argv = [arg for arg in argv[:cut] if arg not in VERBOSE] + argv[cut:]
    for arg in argv[: argv.index("--")]:
        if arg.partition("=")[0] in NOT_QUICK or (arg.startswith("-") and arg[1:2] != "-"):
            return None
    from mnp.sink import wants_progress

    if wants_progress():
        return None
    from mnp import client as layer
    from mnp.api.client import ApiClient

    home = layer.default_home()
    api = None
    try:
        api = ApiClient.connect(home)
        if api is None or not layer.serves(api, os.environ.get("MNP_INVENTORY") or None):
            return None
        return _follow(api, home, argv, verbose)
    except MnpError:  # nothing sent yet: the controller went away while asked
        return None
    finally:
        if api is not None:
            api.close()


def _follow(api: ApiClient, home: Path, argv: list[str], verbose: bool) -> int | None:
    """Send the run; None if the controller refuses it (no job accepted), else the
    job's exit code, or that of what went wrong after it was accepted, said as the
    full command says it."""
    import sys

    from mnp.client import Submitter
    from mnp.runclient import run_through

    me = Submitter.here()
    submitter = {"cwd": me.cwd, "environ": dict(me.environ), "prefix": me.prefix}
    submitter["base_prefix"] = me.base_prefix
    try:
        fields = {"argv": argv, "submitter": submitter}
        return run_through(api, home, fields, verbose=verbose, refusal_returns=True)
    except MnpError as e:
        print(f"mnp: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
