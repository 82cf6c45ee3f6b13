"""The node agent: one per host, started by the controller, speaking PROTOCOL.md on
its stdin/stdout. Standard library only at top level (psutil is not needed; pynvml
is imported on hosts with an NVIDIA driver), Python 3.8+.

`python3 -m mnp.agent --ctl TOKEN` runs it where mnp is importable; elsewhere the
controller runs `python3 -c "$(bundle_source())" --ctl TOKEN`: the same modules in
one self-contained script, so the node needs nothing but python3.
"""

from __future__ import annotations

import os

# in dependency order: each module imports only those before it
MODULES = (
    "jobid",
    "expand",
    "proc",
    "jsonline",
    "loop",
    "facts",
    "request",
    "pmi",
    "ranks",
    "tasks",
    "spawn",
    "teardown",
    "gpu",
    "limits",
    "container",
    "containers",
    "sweep",
    "ops",
    "agent",
    "main",
)

# plain enough for any python to run: an old one says what is wrong (exit 1)
_VERSION_CHECK = """\
import sys
if sys.version_info < (3, 8):
    sys.exit("mnp agent: needs python >= 3.8, this is " + sys.version.split()[0])
"""

# `_load(sources)`: the modules as the package `_mnp_agent`, from memory; returns its main
# module (also what the SSH/srun bootstrap runs where the host cache cannot be used)
LOADER = """\
import sys, types
def _load(sources):
    pkg = types.ModuleType("_mnp_agent")
    pkg.__path__ = []
    sys.modules["_mnp_agent"] = pkg
    for name, source in sources:
        mod = types.ModuleType("_mnp_agent." + name)
        mod.__package__ = "_mnp_agent"
        mod.__file__ = "<mnp agent: %s.py>" % name
        sys.modules[mod.__name__] = mod
        setattr(pkg, name, mod)
        exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    return sys.modules["_mnp_agent.main"]
"""


def agent_sources() -> list[tuple[str, str]]:
    """Every module of the agent, ``(name, source)`` in ``MODULES`` order: what the
    bootstrap ships to a host without mnp (mnp/transport/bootstrap.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sources = []
    for name in MODULES:
        with open(os.path.join(here, name + ".py"), encoding="utf-8") as f:
            sources.append((name, f.read()))
    return sources


def bundle_source(compress: bool = True) -> str:
    """A self-contained Python script that runs the agent, for `python3 -c SCRIPT --ctl T`.

    Its modules become the package `_mnp_agent`, so it cannot clash with an mnp
    installed on the node. Compressed (zlib + base85) it is about 55 KB, well under
    the 128 KiB a single argument may take on Linux; `compress=False` gives a
    readable script (larger than that: run it from a file).
    """
    import base64  # here, not at the top: `python -m mnp.agent` imports this package
    import zlib

    inner = LOADER + "_load(%r).run()\n" % (agent_sources(),)
    if not compress:
        return "# mnp node agent (bundled)\n" + _VERSION_CHECK + inner
    packed = base64.b85encode(zlib.compress(inner.encode("utf-8"), 9)).decode("ascii")
    return (
        "# mnp node agent (bundled): see mnp/agent/__init__.py\n"
        + _VERSION_CHECK
        + "import base64, zlib\n"
        "exec(zlib.decompress(base64.b85decode(%r)).decode('utf-8'))\n" % packed
    )
