"""The ``mnp`` program's start and end: ``entry_point`` (its console script and
``python -m mnp``) and ``exit_now``.

Apart from ``mnp.cli`` so that ``mnp run -- CMD`` against a running controller
(``mnp.quickrun``) starts without importing click, ``mnp.spec`` or ``mnp.model``;
every other command, and every ``mnp run`` the quick client leaves, is ``mnp.cli``'s.
"""

from __future__ import annotations

import codecs
import io
import sys
from typing import NoReturn


def _original_bytes(e: UnicodeError) -> tuple[bytes | str, int]:
    """Encoding error handler: a surrogate escape (U+DC80..U+DCFF) is written as the byte
    it stands for (``surrogateescape``), anything else that cannot be encoded as
    ``\\uNNNN`` (``backslashreplace``): printing never fails."""
    if not isinstance(e, UnicodeEncodeError):
        raise e
    out = bytearray()
    for c in e.object[e.start : e.end]:
        n = ord(c)
        if 0xDC80 <= n <= 0xDCFF:
            out.append(n - 0xDC00)
        else:
            out += c.encode("ascii", "backslashreplace")
    return bytes(out), e.end


def keep_bytes() -> None:
    """Bytes that are not UTF-8 (in task output, arguments, paths) are kept as surrogate
    escapes end to end; written out on stdout and stderr, they are the original bytes
    again."""
    codecs.register_error("mnp-bytes", _original_bytes)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="mnp-bytes")


def entry_point() -> NoReturn:
    """The ``mnp`` program: ``mnp run`` through the quick client where it can
    (``mnp.quickrun``), else ``mnp.cli.main``; then ``exit_now``. ``main`` itself ends
    in ``SystemExit``, as a caller in Python expects."""
    try:
        quick = None
        if sys.argv[1:2] == ["run"]:
            from mnp.quickrun import quick_run

            keep_bytes()
            quick = quick_run(sys.argv[2:])
        if quick is None:
            from mnp.cli import main

            main()
        sys.exit(quick)
    except SystemExit as e:
        code = 0 if e.code is None else e.code
        if not isinstance(code, int):
            raise
        exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Exit with ``code`` as Python would, less the interpreter's finalization: freeing
    every module and object took 25-35 ms of each command here (measured: a process that
    imported what ``mnp run`` does, from its ``atexit`` handlers to its end, 35 ms; with
    ``os._exit`` after them, 9 ms as for an empty program). The ``atexit`` handlers
    (logging's flush among them) run and the standard streams are flushed first. Where
    that is not all Python would do -- a thread still runs that it would wait for, a
    stream cannot be flushed -- it is the ordinary exit."""
    import atexit
    import os
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    main_thread = threading.main_thread()
    if run_exitfuncs is None or any(
        t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()
    ):
        sys.exit(code)
    run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except Exception:  # BrokenPipeError, a full disk: said and counted as Python does
        sys.exit(code)
    os._exit(code)
