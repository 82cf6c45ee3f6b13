"""Durations and memory sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mnp.spec.units import format_duration, format_memory, parse_duration, parse_memory

GiB = 1 << 30
MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("10m", 600),
        ("1d", 86400),
        ("1d2h3m4s", 93784),
        ("90", 90),
        ("1.5", 1.5),
        (" 7 ", 7),
        ("2H", 7200),
        ("1:30", 90),
        ("1:30:00", 5400),
        ("2-00:00:01", 172801),
        (0, 0),
        (45, 45),
        (2.5, 2.5),
        ("0", 0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "  ", "-5s", "-1", -1, -0.5, "abc", "5x", "1h1h", "1e3", "h", "10 minutes", "1:60",
     "1:61:00", "2-1:30", "99999d", float("inf"), float("nan"), True, "5s-", "s5"],
)  # fmt: skip
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(ValueError) as e:
        parse_duration(text)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_duration_message_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r'"abc" is not a duration; use seconds .* 1h30m'):
        parse_duration("abc")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * MiB),
        ("2GiB", 2 * GiB),
        ("1.5GB", 1_500_000_000),
        ("100M", 100 * MiB),
        ("64k", 64 * 1024),
        ("64KB", 64_000),
        ("1.5GiB", 3 * GiB // 2),
        ("2 GiB", 2 * GiB),
        ("2gi", 2 * GiB),
        ("1T", 1 << 40),
        ("100B", 100),
        ("100", 100 * MiB),
        (100, 100 * MiB),
        (0, 0),
        ("0", 0),
    ],
)
def test_parse_memory(text: str | int, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize(
    "text",
    ["", "-1", -1, "1.5", 1.5, "lots", "12XB", "GiB", "1e9", True, "2 G B", "9" * 40 + "PiB"],
)
def test_parse_memory_refuses(text: object) -> None:
    with pytest.raises(ValueError) as e:
        parse_memory(text)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 512 * MiB, 3 * GiB // 2, 5 << 40, 12345678])
def test_format_memory_round_trips(size: int) -> None:
    assert parse_memory(format_memory(size)) == size


@pytest.mark.parametrize("seconds", [0, 0.5, 1, 59, 60, 90, 3600, 5400, 86400, 93784, 1.25])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.text(max_size=30))
def test_parse_duration_only_raises_value_error(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError as e:
        assert "\n" not in str(e)
    else:
        assert value >= 0


@given(st.text(max_size=30) | st.integers() | st.floats())
def test_parse_memory_only_raises_value_error(value: str | int | float) -> None:
    try:
        size = parse_memory(value)  # type: ignore[arg-type]
    except ValueError as e:
        assert "\n" not in str(e)
    else:
        assert size >= 0
