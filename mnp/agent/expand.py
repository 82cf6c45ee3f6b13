"""`$VAR` expansion of task arguments, as PROTOCOL.md specifies (pure)."""

from __future__ import annotations

import re

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; annotations are strings here
    from typing import Mapping, Optional


_PATTERN: Optional[re.Pattern[str]] = None


def _pattern() -> re.Pattern[str]:
    global _PATTERN
    if _PATTERN is None:
        # `$$`, `${NAME}`, `$NAME`; anything else after `$` (`$1`, `${` with no `}`,
        # `$(`) matches nothing and so stays as written.
        _PATTERN = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
    return _PATTERN


def expand(arg: str, env: Mapping[str, str]) -> str:
    """Replace `$NAME` and `${NAME}` with `env[NAME]` and `$$` with `$`, in one pass.

    A variable that is not set stays as written, and a substituted value is never
    scanned again, so a value that contains `$HOME` reaches the task unchanged.
    """
    if "$" not in arg:
        return arg

    def substitute(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return "$"
        name = m.group(2) if m.group(2) is not None else m.group(3)
        value = env.get(name)
        return m.group(0) if value is None else value

    return _pattern().sub(substitute, arg)
