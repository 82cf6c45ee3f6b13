"""The agent's bootstrap, shared by the transports that start it on another machine (ssh,
srun): one ``python -c`` line (``bootstrap(cache)``) that

1. runs ``mnp.agent`` if it imports there (mnp installed on the host);
2. else runs the agent from the host's cache, ``<cache>/agent-<digest>/_mnp_agent/``,
   when an earlier start left it there: a package of plain files Python imports (and
   compiles once into ``__pycache__``) -- the agent is shipped once per host and agent
   version, not on every connection;
3. else asks for the modules on stdin (``SOURCE_REQUEST``), reads ``agent_blob()``,
   writes them to the cache (a temporary directory renamed into place, so hosts sharing a
   home never see half of one) and runs them; where the cache cannot be written (no
   home, read-only, not ours) it runs them from memory, as before there was a cache;
   a cached folder missing a module is shipped past the same way.

``<cache>`` is the inventory's ``[ssh] agent_cache`` (``~`` expanded on the host), by
default ``$XDG_CACHE_HOME/mnp`` or ``~/.cache/mnp``; ``"none"`` turns caching off. A
cache directory is used only when it belongs to the agent's user and no one else may
write to it. ``<digest>`` covers every module's source, so a new mnp never runs an old
agent from the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib

SOURCE_REQUEST = b"mnp-agent: send source\n"

_BOOTSTRAP = """\
import sys
try:
    import mnp.agent
except ImportError:
    import os
    _D, _C = %(digest)s, %(cache)s
    def _ours(p):
        try:
            s = os.stat(p)
        except OSError:
            return False
        return s.st_uid == os.getuid() and not s.st_mode & 0o022
    def _source():
        os.write(1, b"mnp-agent: send source\\n")
        h = b""
        while h[-1:] != b"\\n":
            c = os.read(0, 1)
            if not c:
                sys.exit(3)
            h += c
        n, b = int(h), b""
        while len(b) < n:
            c = os.read(0, n - len(b))
            if not c:
                sys.exit(3)
            b += c
        import zlib
        return eval(zlib.decompress(b))
    def _store(base, root, mods):
        tmp = "%%s.%%d.tmp" %% (root, os.getpid())
        try:
            os.makedirs(base, 0o700, exist_ok=True)
            os.mkdir(tmp, 0o700)
            os.mkdir(os.path.join(tmp, "_mnp_agent"), 0o700)
            for name, text in [("__init__", "")] + mods:
                fd = os.open(os.path.join(tmp, "_mnp_agent", name + ".py"),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
            os.rename(tmp, root)
        except OSError:
            for d, _, fs in os.walk(tmp, topdown=False):
                for f in fs:
                    os.unlink(os.path.join(d, f))
                os.rmdir(d)
    _root = None
    if _C != "none":
        _base = os.path.expanduser(_C or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or "~/.cache", "mnp"))
        _root = os.path.join(_base, "agent-" + _D)
    _main = None
    if _root and _ours(_root) and _ours(os.path.join(_root, "_mnp_agent", "main.py")):
        sys.path.insert(0, _root)
        try:
            from _mnp_agent.main import run as _main
        except ImportError:  # a module gone from the cache: shipped again, run from memory
            sys.path.remove(_root)
            for _k in [k for k in sys.modules if k.split(".")[0] == "_mnp_agent"]:
                del sys.modules[_k]
            _root = None
    if _main is None:
        _mods = _source()
        if _root and (_ours(_base) or not os.path.exists(_base)):
            _store(_base, _root, _mods)
        if _root and _ours(_root):
            sys.path.insert(0, _root)
            from _mnp_agent.main import run as _main
        else:
            exec(%(loader)s)
            _main = _load(_mods).run
    _main()
else:
    import runpy
    runpy.run_module("mnp.agent", run_name="__main__", alter_sys=True)
"""


@functools.cache
def _modules() -> tuple[tuple[str, str], ...]:
    from mnp.agent import agent_sources  # the agent package is imported only when shipped

    return tuple(agent_sources())


@functools.cache
def agent_digest() -> str:
    """16 hex digits of SHA-256 over every agent module's name and source."""
    return hashlib.sha256(repr(_modules()).encode()).hexdigest()[:16]


@functools.cache
def bootstrap(cache: str = "") -> str:
    """The ``python -c`` argument: one line without single quotes (json.dumps writes
    valid Python string literals). ``cache``: the host's cache folder, "" for the
    default, "none" for none."""
    from mnp.agent import LOADER  # the package's __init__ only: strings and MODULES

    code = _BOOTSTRAP % {
        "digest": json.dumps(agent_digest()),
        "cache": json.dumps(cache),
        "loader": json.dumps(LOADER),
    }
    return "exec(" + json.dumps(code) + ")"


@functools.cache
def agent_blob() -> bytes:
    """The modules ``[(name, source), ...]`` as a Python literal, compressed, with its
    length line: what the bootstrap reads after ``SOURCE_REQUEST``."""
    data = zlib.compress(repr(list(_modules())).encode(), 9)
    return b"%d\n" % len(data) + data
