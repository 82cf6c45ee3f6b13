"""Durations and memory sizes as users write them.

Both parsers raise ``ValueError`` whose message says what is allowed; callers
wrap it in a :class:`~mnp.errors.SpecError` that names the file and field.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_DURATION = 3650 * 86400.0
"""Ten years: anything longer is a typo, and timers misbehave far beyond it."""
MAX_MEMORY = 1 << 60
"""One EiB."""

_DURATION_UNITS: dict[str, Fraction] = {
    "d": Fraction(86400), "h": Fraction(3600), "m": Fraction(60), "s": Fraction(1),
    "ms": Fraction(1, 1000),
}  # fmt: skip
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|d|h|m|s)", re.I | re.A)
_CLOCK = re.compile(r"(?:(\d{1,4})-)?(?:(\d{1,6}):)?(\d{1,6}):(\d{1,2})", re.A)
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+", re.A)
_DURATION_HELP = (
    "use seconds (90, 1.5) or units d, h, m, s, ms (90s, 10m, 1h30m, 2d, 500ms) or [D-]H:MM:SS"
)

_MIB = 1 << 20
_MEMORY_UNITS = {
    "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40, "tb": 10**12,
    "p": 1 << 50, "pi": 1 << 50, "pib": 1 << 50, "pb": 10**15,
}  # fmt: skip
_MEMORY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.I | re.A)
_MEMORY_HELP = "use a size like 512MiB, 2GiB, 1.5GB, 100M, 64k, or a bare whole number of MiB"


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: a bare number is seconds; text may be ``90``, ``1.5``,
    ``90s``, ``10m``, ``2h``, ``1d``, ``500ms``, combinations such as ``1h30m`` or
    ``1h 30m`` (each unit once), or Slurm's clock form ``[D-]H:MM:SS`` / ``M:SS``.

    Units are case-insensitive (``m`` is always minutes). Negative, empty and
    non-finite values, and durations above ten years, are refused.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got a boolean; {_DURATION_HELP}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}")
        if value < 0:
            raise ValueError("negative durations are not allowed; use 0 or more seconds")
        if value > MAX_DURATION:
            raise ValueError("longer than ten years (3650d); use a shorter duration")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration; {_DURATION_HELP}")
    text = value.strip()
    if not text:
        raise ValueError(f"empty duration; {_DURATION_HELP}")
    if len(text) > 64:
        raise ValueError(f"not a duration (too long); {_DURATION_HELP}")
    if text.startswith("-"):
        raise ValueError("negative durations are not allowed; use 0 or more seconds")
    total = _parse_duration_text(text)
    if total is None:
        raise ValueError(f"{_quote(text)} is not a duration; {_DURATION_HELP}")
    if total > MAX_DURATION:
        raise ValueError("longer than ten years (3650d); use a shorter duration")
    return float(total)


def _parse_duration_text(text: str) -> Fraction | None:
    if _NUMBER.fullmatch(text):
        return Fraction(text)
    clock = _CLOCK.fullmatch(text)
    if clock:
        d, h, mm, ss = clock.groups()
        if d is not None and h is None:
            return None  # "D-M:SS" is not a form anyone means
        days, hours, minutes, seconds = int(d or 0), (int(h) if h else None), int(mm), int(ss)
        if seconds >= 60 or (hours is not None and minutes >= 60):
            return None
        return Fraction(((days * 24 + (hours or 0)) * 60 + minutes) * 60 + seconds)
    total = Fraction(0)
    seen: set[str] = set()
    pos = 0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            return None
        unit = m.group(2).lower()
        if unit in seen:
            return None
        seen.add(unit)
        total += Fraction(m.group(1)) * _DURATION_UNITS[unit]
        pos = m.end()
    return total


def parse_memory(value: str | int) -> int:
    """Bytes in ``value``.

    A bare whole number (``4096`` or ``"4096"``) is **MiB**, as in AWS Batch's
    ``memory`` and Slurm's ``--mem``. Units are case-insensitive:
    ``B``; ``K``/``Ki``/``KiB`` = 1024 and ``KB`` = 1000, and likewise M, G, T, P —
    a single letter is binary, as in Slurm, Docker and Java; ``MB``/``GB`` are SI.
    Fractions (``1.5GiB``) are rounded down to whole bytes. Negative values and
    sizes above 1 EiB are refused; ``0`` means "not accounted".
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a memory size, got a boolean; {_MEMORY_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative memory sizes are not allowed")
        if value > MAX_MEMORY // _MIB:
            raise ValueError("larger than 1 EiB; use a smaller size")
        return value * _MIB
    if isinstance(value, float):
        raise ValueError(f"{value!r} is not a whole number of MiB; {_MEMORY_HELP}")
    if not isinstance(value, str):
        raise ValueError(f"expected a memory size; {_MEMORY_HELP}")
    text = value.strip()
    if not text:
        raise ValueError(f"empty memory size; {_MEMORY_HELP}")
    if text.startswith("-"):
        raise ValueError("negative memory sizes are not allowed")
    m = _MEMORY.fullmatch(text) if len(text) <= 64 else None
    if not m:
        raise ValueError(f"{_quote(text)} is not a memory size; {_MEMORY_HELP}")
    number, unit = m.group(1), m.group(2).lower()
    if unit:
        mult = _MEMORY_UNITS.get(unit)
        if mult is None:
            raise ValueError(f"unknown unit {_quote(m.group(2))}; {_MEMORY_HELP}")
    elif "." in number:
        raise ValueError(f"{_quote(text)} is not a whole number of MiB; {_MEMORY_HELP}")
    else:
        mult = _MIB
    size = int(Fraction(number) * mult)
    if size > MAX_MEMORY:
        raise ValueError("larger than 1 EiB; use a smaller size")
    return size


def format_memory(size: int) -> str:
    """The shortest exact spelling of ``size`` bytes that :func:`parse_memory` reads back."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % mult == 0:
            return f"{size // mult}{unit}"
    return f"{size}B"


def format_duration(seconds: float) -> str:
    """A readable spelling of ``seconds`` that :func:`parse_duration` reads back exactly."""
    if seconds != int(seconds):
        return repr(seconds)
    s = int(seconds)
    if s == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts)


def _quote(text: str) -> str:
    shown = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f'"{shown}"'
