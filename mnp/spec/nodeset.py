"""Node sets (``node[01-16,20]``), node ranges (``1:3``) and Slurm CPU lists (``2(x3),1``).

Nodeset syntax, as in Slurm and ClusterShell:

- top-level items are separated by commas: ``a[1-2],b7``; commas inside
  brackets separate ranges: ``node[1-3,7]``;
- a bracket holds ranges ``A-B`` (inclusive), optionally with a step ``A-B/S``,
  and single numbers; a start written with leading zeros pads every number of
  that range to its width: ``node[08-10]`` → ``node08 node09 node10``;
- several bracket groups multiply, the first varying slowest:
  ``gpu-[1-2]-[0-1]`` → ``gpu-1-0 gpu-1-1 gpu-2-0 gpu-2-1``;
- names are made of letters, digits, ``.``, ``-`` and ``_``.

All parsers raise ``ValueError`` with a message saying what is allowed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

MAX_NAMES = 1_000_000
"""Refuse expansions larger than this, before building them."""

_LITERAL = re.compile(r"[A-Za-z0-9._-]*", re.A)
_RANGE = re.compile(r"(\d{1,18})(?:-(\d{1,18})(?:/(\d{1,18}))?)?", re.A)
_SPLIT_NUM = re.compile(r"^(.*?)(\d+)(\D*)$", re.S | re.A)
_HELP = "use names like node[01-16,20], gpu-[1-2]-[0-3] or a,b"


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets; check the brackets balance."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            if depth:
                raise ValueError(f"nested '[' at position {i + 1}; {_HELP}")
            depth = 1
        elif c == "]":
            if not depth:
                raise ValueError(f"']' without '[' at position {i + 1}; {_HELP}")
            depth = 0
        elif c == "," and not depth:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"'[' is never closed; {_HELP}")
    items.append(text[start:])
    return items


def _parse_bracket(body: str) -> list[str]:
    """The numbers a bracket stands for, as strings with their padding."""
    out: list[str] = []
    for part in body.split(","):
        part = part.strip()
        m = _RANGE.fullmatch(part)
        if not m:
            raise ValueError(f"[{body}] has a bad range {part!r}; use ranges like 1-4, 08-12, 7")
        first, last, step = m.group(1), m.group(2), m.group(3)
        lo = int(first)
        hi = int(last) if last is not None else lo
        inc = int(step) if step is not None else 1
        if hi < lo:
            raise ValueError(f"range {part} runs backwards; write the smaller number first")
        if inc < 1:
            raise ValueError(f"range {part} has step 0; use a step of 1 or more")
        count = (hi - lo) // inc + 1
        if len(out) + count > MAX_NAMES:
            raise ValueError(f"expands to more than {MAX_NAMES} names")
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1, inc))
    return out


def _expand_item(item: str) -> Iterable[str]:
    pieces: list[list[str]] = []
    count = 1
    pos = 0
    while pos < len(item):
        open_at = item.find("[", pos)
        literal = item[pos:] if open_at < 0 else item[pos:open_at]
        if not _LITERAL.fullmatch(literal):
            bad = next(c for c in literal if not _LITERAL.fullmatch(c))
            raise ValueError(f"{bad!r} is not allowed in a node name; {_HELP}")
        if literal:
            pieces.append([literal])
        if open_at < 0:
            break
        close_at = item.index("]", open_at)
        body = item[open_at + 1 : close_at]
        if not body.strip():
            raise ValueError(f"empty brackets []; {_HELP}")
        numbers = _parse_bracket(body)
        count *= len(numbers)
        if count > MAX_NAMES:
            raise ValueError(f"expands to more than {MAX_NAMES} names")
        pieces.append(numbers)
        pos = close_at + 1
    return ("".join(p) for p in itertools.product(*pieces))


def expand_nodeset(text: str) -> list[str]:
    """All names in ``text``, in order (duplicates kept; callers decide)."""
    if not isinstance(text, str):
        raise ValueError(f"expected a nodeset string; {_HELP}")
    if not text.strip():
        raise ValueError(f"empty nodeset; {_HELP}")
    names: list[str] = []
    for item in _split_top(text):
        item = item.strip()
        if not item:
            raise ValueError(f"empty name between commas; {_HELP}")
        expanded = list(_expand_item(item))
        if len(names) + len(expanded) > MAX_NAMES:
            raise ValueError(f"expands to more than {MAX_NAMES} names")
        names.extend(expanded)
    return names


def fold_nodeset(names: Iterable[str]) -> str:
    """A short nodeset for ``names`` (for display): ``node01,node02,node03`` → ``node[01-03]``.

    Best effort: only the last number of each name is folded, names are grouped
    by what surrounds that number (in order of first appearance) and sorted
    numerically within a group. ``expand_nodeset(fold_nodeset(x))`` holds the
    same names as ``x``.
    """
    # key (prefix, suffix, has a number): "node" and "node1" must not share a group
    groups: dict[tuple[str, str, bool], list[tuple[int, str]]] = {}
    for name in dict.fromkeys(names):
        m = _SPLIT_NUM.match(name)
        if m is None or len(m.group(2)) > 18:
            groups.setdefault((name, "", False), [])
            continue
        groups.setdefault((m.group(1), m.group(3), True), []).append((int(m.group(2)), m.group(2)))
    out = []
    for (prefix, suffix, numbered), numbers in groups.items():
        if not numbered:
            out.append(prefix)
            continue
        numbers.sort(key=lambda x: (x[0], len(x[1])))
        ranges = _runs(numbers)
        if len(numbers) == 1:
            out.append(f"{prefix}{numbers[0][1]}{suffix}")
        else:
            out.append(f"{prefix}[{','.join(ranges)}]{suffix}")
    return ",".join(out)


def _runs(numbers: Sequence[tuple[int, str]]) -> list[str]:
    ranges: list[str] = []
    start = prev = numbers[0]
    width = len(start[1])
    for cur in numbers[1:]:
        if cur[0] == prev[0] + 1 and cur[1] == str(cur[0]).zfill(width):
            prev = cur
            continue
        ranges.append(start[1] if start is prev else f"{start[1]}-{prev[1]}")
        start = prev = cur
        width = len(cur[1])
    ranges.append(start[1] if start is prev else f"{start[1]}-{prev[1]}")
    return ranges


def parse_node_range(text: str, num_nodes: int) -> tuple[int, int]:
    """``(start, end)``, inclusive, for AWS Batch's ``targetNodes`` syntax.

    ``"2"`` → node 2; ``"1:3"`` → 1..3; ``"4:"`` → 4..last; ``":3"`` → 0..3;
    ``":"`` → every node. Both ends must lie in ``0..num_nodes-1``.
    """
    if not isinstance(text, str):
        raise ValueError('expected a node range like "0", "1:3", "4:", ":3" or ":"')
    spec = text.strip()
    last = num_nodes - 1
    allowed = f"this job has nodes 0..{last}" if num_nodes > 0 else "this job has no nodes"
    if ":" in spec:
        left, _, right = spec.partition(":")
        start = _node_index(left, 0, text)
        end = _node_index(right, last, text)
    else:
        if not spec:
            raise ValueError('empty node range; use "0", "1:3", "4:", ":3" or ":"')
        start = end = _node_index(spec, 0, text)
    for n in (start, end):
        if not 0 <= n <= last:
            raise ValueError(f"node {n} is out of range; {allowed}")
    if end < start:
        raise ValueError(f"range {spec} runs backwards; write the smaller node first")
    return start, end


def _node_index(part: str, default: int, whole: str) -> int:
    part = part.strip()
    if not part:
        return default
    if not part.isascii() or not part.isdigit() or len(part) > 9:
        shown = whole if whole.isprintable() and len(whole) <= 40 else "this"
        raise ValueError(
            f'"{shown}" is not a node range; use "0", "1:3", "4:", ":3" or ":" (node indexes)'
        )
    return int(part)


def describe_nodes(nodes: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` → ``nodes 1..3, 7``."""
    parts: list[str] = []
    i = 0
    while i < len(nodes):
        j = i
        while j + 1 < len(nodes) and nodes[j + 1] == nodes[j] + 1:
            j += 1
        parts.append(str(nodes[i]) if i == j else f"{nodes[i]}..{nodes[j]}")
        i = j + 1
    word = "node" if len(nodes) == 1 else "nodes"
    return f"{word} {', '.join(parts)}"


_SLURM_CPUS = re.compile(r"(\d{1,9})(?:\(x(\d{1,9})\))?", re.A)


def expand_slurm_cpus(text: str) -> list[int]:
    """Slurm's ``SLURM_JOB_CPUS_PER_NODE``: ``"36(x2),72,8"`` → ``[36, 36, 72, 8]``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError('empty CPU list; expected a form like "36(x2),72"')
    out: list[int] = []
    for part in text.strip().split(","):
        m = _SLURM_CPUS.fullmatch(part.strip())
        if not m:
            raise ValueError(
                f'{part.strip()!r} is not a CPU count; expected forms like "36(x2),72"'
            )
        repeat = int(m.group(2)) if m.group(2) else 1
        if len(out) + repeat > MAX_NAMES:
            raise ValueError(f"more than {MAX_NAMES} nodes")
        out.extend([int(m.group(1))] * repeat)
    return out
