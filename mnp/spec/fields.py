"""Reading TOML tables field by field, with one-line errors that name the field.

Every check in ``mnp.spec`` goes through :class:`Table` or :func:`fail`, so every
problem a user can make in a file comes out as a :class:`~mnp.errors.SpecError`
whose ``str()`` is ``file:field.path: what is wrong; what is allowed`` on a
single line, whatever odd characters the file holds.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

from mnp.errors import SpecError
from mnp.files import NotARegularFile, read_regular

T = TypeVar("T")

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""Job, queue and compute environment names (AWS Batch's rule)."""
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_FILE_BYTES = 16 * 1024 * 1024
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MAX_SHOWN = 60
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def oneline(text: str) -> str:
    """``text`` with every non-printable character (newlines included) escaped."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def show(value: object) -> str:
    """A short, single-line rendering of a value from a file, for messages."""
    if isinstance(value, str):
        text = oneline(value)
        if len(text) > _MAX_SHOWN:
            text = text[: _MAX_SHOWN - 3] + "..."
        return f'"{text}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        # str() of a huge int raises ValueError (int_max_str_digits) and helps nobody
        return str(value) if abs(value) < 10**30 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    return kind(value)


def kind(value: object) -> str:
    """``value``'s TOML type, with an article: ``a string``, ``an array``..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if value is None:
        return "nothing"
    return "a date/time" if hasattr(value, "isoformat") else "a value of an unknown type"


def got(value: object) -> str:
    """``a string ("4")``: the type of a wrong value, and the value when it is short."""
    if isinstance(value, str | int | float):
        return f"{kind(value)} ({show(value)})"
    return kind(value)


def key_path(parent: str, key: object) -> str:
    """``parent.key``, quoting keys that are not plain words so the path stays one line."""
    k = key if isinstance(key, str) else str(key)
    part = k if _PLAIN_KEY.fullmatch(k) else show(k)
    return f"{parent}.{part}" if parent else part


def index_path(parent: str, i: int) -> str:
    return f"{parent}[{i}]"


def fail(source: str, field: str, message: str) -> NoReturn:
    raise SpecError(oneline(source), oneline(field), oneline(message))


def one_of(choices: Iterable[str]) -> str:
    return ", ".join(f'"{c}"' for c in choices)


class Table:
    """One TOML table being read; refuses keys it does not know.

    ``allowed`` lists the valid keys, in the order the error message shows them.
    """

    def __init__(
        self, source: str, path: str, data: object, allowed: Sequence[str], what: str = "a table"
    ) -> None:
        self.source = source
        self.path = path
        if not isinstance(data, dict):
            fail(source, path, f"expected {what}, got {got(data)}")
        self.data: dict[Any, Any] = data
        for key in data:
            if key not in allowed:
                k = key if isinstance(key, str) else str(key)
                hint = difflib.get_close_matches(k, allowed, n=1)
                did = f' (did you mean "{hint[0]}"?)' if hint else ""
                fail(
                    source,
                    key_path(path, k),
                    f"unknown field{did}; valid fields: {', '.join(allowed)}",
                )

    def field(self, key: str) -> str:
        return key_path(self.path, key)

    def fail(self, key: str, message: str) -> NoReturn:
        fail(self.source, self.field(key), message)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> object:
        return self.data.get(key)

    def convert(self, key: str, default: T, func: Callable[[Any], T]) -> T:
        """``func(value)`` (which may raise ValueError with the message), or ``default``."""
        if key not in self.data:
            return default
        try:
            return func(self.data[key])
        except ValueError as e:
            self.fail(key, str(e))

    def string(
        self, key: str, default: T, *, pattern: re.Pattern[str] | None = None, rule: str = ""
    ) -> str | T:
        if key not in self.data:
            return default
        return check_string(
            self.source, self.field(key), self.data[key], pattern=pattern, rule=rule
        )

    def integer(self, key: str, default: T, lo: int, hi: int) -> int | T:
        if key not in self.data:
            return default
        return check_int(self.source, self.field(key), self.data[key], lo, hi)

    def number(
        self, key: str, default: T, lo: float, hi: float, *, lo_open: bool = False
    ) -> float | T:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"expected a number, got {got(value)}")
        bad = (
            (isinstance(value, float) and not math.isfinite(value))
            or value > hi
            or (value <= lo if lo_open else value < lo)
        )
        if bad:
            low = f"more than {lo:g}" if lo_open else f"{lo:g}"
            self.fail(key, f"{show(value)} is out of range; allowed {low} up to {hi:g}")
        return float(value)

    def boolean(self, key: str, default: T) -> bool | T:
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {got(value)}")
        return value

    def choice(self, key: str, default: T, choices: Sequence[str]) -> str | T:
        """One of ``choices``, matched case-insensitively, returned as spelled in ``choices``."""
        if key not in self.data:
            return default
        return check_choice(self.source, self.field(key), self.data[key], choices)

    def strings(
        self,
        key: str,
        *,
        single_ok: bool = False,
        pattern: re.Pattern[str] | None = None,
        rule: str = "",
    ) -> tuple[str, ...] | None:
        """A list of strings (or one string when ``single_ok``), or None when absent."""
        if key not in self.data:
            return None
        value = self.data[key]
        if single_ok and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            wanted = "a string or an array of strings" if single_ok else "an array of strings"
            self.fail(key, f"expected {wanted}, got {got(value)}")
        return tuple(
            check_string(self.source, index_path(self.field(key), i), v, pattern=pattern, rule=rule)
            for i, v in enumerate(value)
        )

    def table(self, key: str, allowed: Sequence[str]) -> Table | None:
        if key not in self.data:
            return None
        return Table(self.source, self.field(key), self.data[key], allowed)

    def mapping(self, key: str) -> dict[Any, Any] | None:
        """A sub-table whose keys are user-chosen names (checked by the caller)."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {got(value)}")
        return value


def check_string(
    source: str,
    field: str,
    value: object,
    *,
    pattern: re.Pattern[str] | None = None,
    rule: str = "",
) -> str:
    if not isinstance(value, str):
        fail(source, field, f"expected a string, got {got(value)}")
    if "\x00" in value:
        fail(source, field, "contains a NUL character, which no command or file name can hold")
    if pattern is not None and not pattern.fullmatch(value):
        fail(source, field, f"{show(value)} is not allowed; {rule}")
    return value


def check_int(source: str, field: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(source, field, f"expected an integer {lo}..{hi}, got {got(value)}")
    if not lo <= value <= hi:
        fail(source, field, f"{show(value)} is out of range; allowed {lo}..{hi}")
    return value


def check_choice(source: str, field: str, value: object, choices: Sequence[str]) -> str:
    if isinstance(value, str):
        for c in choices:
            if value.lower() == c.lower():
                return c
        fail(source, field, f"{show(value)} is not allowed; use one of {one_of(choices)}")
    fail(source, field, f"expected one of {one_of(choices)}, got {got(value)}")


MAX_ARG_BYTES = 131_071
"""The longest argument or environment entry Linux takes (MAX_ARG_STRLEN less the NUL)."""
MAX_ARGV_BYTES = 1 << 20
"""The most bytes a command may have in all: half of Linux's usual ARG_MAX (2 MiB), the
rest left to the environment."""


def check_arg_size(source: str, field: str, value: str) -> None:
    n = len(value.encode("utf-8", "surrogateescape"))
    if n > MAX_ARG_BYTES:
        fail(
            source,
            field,
            f"{n:,} bytes; an argument or environment value can have at most "
            f"{MAX_ARG_BYTES:,} (Linux MAX_ARG_STRLEN); pass big data in a file",
        )


def env_value(source: str, field: str, value: object) -> str:
    """A string for the environment or a parameter; numbers and booleans are spelled as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) >= 10**30:
            fail(source, field, "integer too large; write it as a string")
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if not isinstance(value, str):
        fail(source, field, f"expected a string, got {got(value)}")
    check_arg_size(source, field, value)
    return check_string(source, field, value)


RESERVED_ENV_PREFIXES = ("MNP_", "AWS_BATCH_")
"""Variables mnp sets for every task; a definition cannot set them."""


def check_env_name(source: str, field: str, name: object) -> str:
    if not isinstance(name, str) or not ENV_NAME_RE.fullmatch(name):
        fail(
            source,
            field,
            "not a valid environment variable name; use letters, digits and _, "
            "not starting with a digit",
        )
    if name.startswith(RESERVED_ENV_PREFIXES):
        fail(
            source,
            field,
            "names starting with MNP_ or AWS_BATCH_ are reserved for the variables mnp sets",
        )
    return name


def string_map(
    source: str, field: str, data: object, check_key: Callable[[str, str, object], str]
) -> dict[str, str]:
    """A table of name → string (environment, parameters)."""
    if not isinstance(data, dict):
        fail(source, field, f"expected a table, got {got(data)}")
    out: dict[str, str] = {}
    for k, v in data.items():
        f = key_path(field, k)
        out[check_key(source, f, k)] = env_value(source, f, v)
    return out


def array_of(source: str, field: str, value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        fail(source, field, f"expected {what}, got {got(value)}")
    return value


def read_toml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """Parse a TOML file: ``(data, source)``; any failure is a SpecError, never a traceback."""
    source = os.fspath(path)
    try:
        raw = read_regular(source, MAX_FILE_BYTES)
    except FileNotFoundError:
        fail(source, "", "no such file")
    except NotARegularFile as e:
        fail(source, "", f"is {e.kind}; expected a TOML file")
    except PermissionError:
        fail(source, "", "permission denied")
    except OSError as e:
        fail(source, "", f"cannot read: {e.strerror or e}")
    if len(raw) > MAX_FILE_BYTES:
        fail(source, "", f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; not a job file")
    return parse_toml(raw, source), source


_TOML_AT = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.S)


def parse_toml(raw: bytes, source: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        fail(
            source,
            f"{line}:{col}",
            f"not UTF-8 text (byte 0x{raw[e.start]:02x}); TOML files must be UTF-8",
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_AT.match(msg)
        if m:
            fail(source, f"{m.group(2)}:{m.group(3)}", f"invalid TOML: {m.group(1)}")
        fail(source, "", f"invalid TOML: {msg}")
    except RecursionError:
        fail(source, "", "invalid TOML: nested too deeply")
