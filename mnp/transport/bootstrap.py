"""The agent's bootstrap, shared by the transports that start it on another machine (ssh,
srun): one ``python -c`` line that runs ``mnp.agent`` if it imports there, else asks for
its source on stdin (``SOURCE_REQUEST``) and reads ``agent_blob()`` (see ssh.py).
"""

from __future__ import annotations

import functools
import json
import zlib

SOURCE_REQUEST = b"mnp-agent: send source\n"

_BOOTSTRAP = """\
import sys
try:
    import mnp.agent
except ImportError:
    import os, zlib
    os.write(1, b"mnp-agent: send source\\n")
    _h = b""
    while _h[-1:] != b"\\n":
        _c = os.read(0, 1)
        if not _c:
            sys.exit(3)
        _h += _c
    _n = int(_h)
    _b = b""
    while len(_b) < _n:
        _c = os.read(0, _n - len(_b))
        if not _c:
            sys.exit(3)
        _b += _c
    _src = zlib.decompress(_b)
    del _h, _c, _n, _b
    exec(compile(_src, "<mnp.agent>", "exec"))
else:
    import runpy
    runpy.run_module("mnp.agent", run_name="__main__", alter_sys=True)
"""
# One line without single quotes: json.dumps writes a valid Python string literal.
BOOTSTRAP = "exec(" + json.dumps(_BOOTSTRAP) + ")"


@functools.cache
def agent_blob() -> bytes:
    """``bundle_source()``, compressed, with its length line: what the bootstrap reads."""
    from mnp.agent import bundle_source  # the agent package is imported only when shipped

    data = zlib.compress(bundle_source().encode(), 9)
    return b"%d\n" % len(data) + data
