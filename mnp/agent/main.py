"""`python3 -m mnp.agent --ctl TOKEN [--grace S] [--parent-death]`"""

from __future__ import annotations

import os
import signal
import sys

from .agent import Agent
from .proc import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, cloexec_inherited, prctl

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import List, NoReturn, Optional


USAGE = "usage: python3 -m mnp.agent --ctl TOKEN [--grace SECONDS] [--parent-death]\n"


class Options:
    def __init__(self) -> None:
        self.ctl = ""
        self.grace = 2.0
        self.parent_death = False


def parse(argv: List[str]) -> Options:
    """The command line; ValueError with a message on bad usage."""
    opts = Options()
    env_grace = os.environ.get("MNP_AGENT_GRACE")
    if env_grace:
        opts.grace = _seconds(env_grace, "MNP_AGENT_GRACE")
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in ("--ctl", "--grace") and not eq:
            if not args:
                raise ValueError("%s needs a value" % name)
            value = args.pop(0)
        if name == "--ctl":
            opts.ctl = value
        elif name == "--grace":
            opts.grace = _seconds(value, "--grace")
        elif arg == "--parent-death":
            opts.parent_death = True
        else:
            raise ValueError("unknown argument %r" % arg)
    if not opts.ctl or "\0" in opts.ctl:
        raise ValueError("--ctl TOKEN is required")
    return opts


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError("%s must be a number of seconds >= 0, not %r" % (what, text))
    return value


def main(argv: Optional[List[str]] = None) -> int:
    try:
        opts = parse(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        sys.stderr.write("mnp agent: %s\n%s" % (e, USAGE))
        return 2
    # descriptors 0-2 must exist, or a pipe opened later would take their number
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    parent = os.getppid()
    agent = Agent(opts.ctl, opts.grace)
    agent.start()  # `ready` first: prctl needs ctypes, a few ms to import
    if opts.parent_death:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before we asked
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the agent shuts down
    prctl(PR_SET_CHILD_SUBREAPER, 1)  # before the first spawn
    cloexec_inherited()  # after NVML too, which may have opened device files of its own
    agent.listen()
    return agent.run()


def run(argv: Optional[List[str]] = None) -> NoReturn:
    """`main`, then the process ends at once, without the interpreter's finalization
    (~10 ms of a one-task agent's 14 ms from stdin's end to its exit, measured: at
    the end of every job run by a cold `mnp run`, each host pays it). Everything the
    agent leaves is removed by `main` itself (its loop's `finally`), not at exit."""
    code = main(argv)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
