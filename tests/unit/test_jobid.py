"""The one job-id grammar (mnp.jobid): every form, malformed text, round trips, and the
rules the rest of mnp derives from it (the agent's job_part, jobref.split)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mnp import jobref
from mnp.agent.proc import job_part
from mnp.jobid import JobId, JobIdError, split, top_of

# text, parts (root, index, node, task), canonical spelling
FORMS = [
    ("42", (42, None, None, None), "42"),
    ("42:7", (42, 7, None, None), "42:7"),
    ("42#3", (42, None, 3, None), "42#3"),
    ("42#3.1", (42, None, 3, 1), "42#3.1"),
    ("42:7#3", (42, 7, 3, None), "42:7#3"),
    ("42:7#3.1", (42, 7, 3, 1), "42:7#3.1"),
    ("0", (0, None, None, None), "0"),
    ("007", (7, None, None, None), "7"),
    ("42:007#03.01", (42, 7, 3, 1), "42:7#3.1"),
    ("1" * 18, (int("1" * 18), None, None, None), "1" * 18),
    ("1:" + "9" * 9, (1, 999999999, None, None), "1:" + "9" * 9),
]

MALFORMED = [
    "",
    "x",
    "train",
    "train:7",
    "42:",
    "42#",
    "42#3.",
    "42.3",
    "42:x",
    "2:-1",
    "3#-1",
    "3#1.1.1",
    "42#3:7",
    "42::7",
    ":7",
    "#3",
    " 42",
    "42 ",
    "+42",
    "4_2",
    "1" * 19,
    "1" * 30,
    "1:" + "9" * 10,
    "٤٢",  # Arabic-Indic digits are not digits of an id
    "42\n",
    "../../etc/passwd",
]


@pytest.mark.parametrize(("text", "parts", "canonical"), FORMS)
def test_forms(text: str, parts: tuple[int | None, ...], canonical: str) -> None:
    jid = JobId.parse(text)
    assert (jid.root, jid.index, jid.node, jid.task) == parts
    assert str(jid) == canonical
    assert JobId.parse(canonical) == jid  # round trip
    assert str(JobId.parse(str(jid))) == canonical
    assert jid.top == str(parts[0])
    assert JobId(*parts) == jid and hash(JobId(*parts)) == hash(jid)


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed(text: str) -> None:
    with pytest.raises(JobIdError) as e:
        JobId.parse(text)
    assert "\n" not in str(e.value).replace(repr(text), "")  # one line
    assert isinstance(e.value, ValueError)
    assert JobId.parse_or_none(text) is None


@pytest.mark.parametrize(
    "parts",
    [(-1,), (1, -1), (1, None, -2), (1, None, 0, -1), (1, None, None, 0), ("1",), (1.0,)],
)
def test_bad_parts(parts: tuple[object, ...]) -> None:
    with pytest.raises(JobIdError):
        JobId(*parts)  # type: ignore[arg-type]


def test_helpers() -> None:
    top = JobId(42)
    assert str(top.child(7)) == "42:7"
    assert str(top.at_node(3)) == "42#3"
    assert str(top.child(7).at_node(3).at_task(1)) == "42:7#3.1"
    assert top.child(7).at_node(3).at_task(1).job == top.child(7)
    assert top.at_node(3).job == top
    with pytest.raises(JobIdError, match="only a node has tasks"):
        top.at_task(1)
    with pytest.raises(AttributeError):
        top.root = 1  # type: ignore[misc]
    assert repr(top.at_node(3)) == "JobId.parse('42#3')"
    assert JobId(1) != "1" and JobId(1) != (1, None, None, None)


@pytest.mark.parametrize(
    ("inner", "outer", "within"),
    [
        ("42", "42", True),
        ("42:7", "42", True),
        ("42#3.1", "42", True),
        ("42:7#3.1", "42:7", True),
        ("42:7#3.1", "42:7#3", True),
        ("42#3.1", "42#3", True),
        ("42#3", "42#3", True),
        ("42#3", "42#3.1", False),
        ("42:7#3", "42#3", False),
        ("42#3", "42:7", False),
        ("42:8", "42:7", False),
        ("420", "42", False),
        ("42#31", "42#3", False),
        ("42", "42:7", False),
    ],
)
def test_within(inner: str, outer: str, within: bool) -> None:
    assert JobId.parse(inner).within(JobId.parse(outer)) is within


@pytest.mark.parametrize(
    ("rest", "parts"),
    [
        ("", (None, None, None)),
        (":7", (7, None, None)),
        ("#3.1", (None, 3, 1)),
        (":7#3", (7, 3, None)),
    ],
)
def test_suffix(rest: str, parts: tuple[int | None, ...]) -> None:
    assert JobId.parse_suffix(rest) == parts


@pytest.mark.parametrize("rest", [":", "#", ".1", ":x", "#3.", "x", ":7:8"])
def test_bad_suffix(rest: str) -> None:
    with pytest.raises(JobIdError):
        JobId.parse_suffix(rest)


# one rule for "the top-level part": the agent's job_part, jobref.split (names too), and
# the parsed id's top all agree on every well-formed id and reference
@pytest.mark.parametrize(
    "text", [t for t, _, _ in FORMS] + ["train", "train:7", "train#3", "train#3.1", "a-b_c:7#0"]
)
def test_one_top_rule(text: str) -> None:
    top, rest = split(text)
    assert top + rest == text
    assert job_part(text) == top_of(text) == top == jobref.split(text)[0]
    parsed = JobId.parse_or_none(text)
    if parsed is not None:
        assert str(int(top)) == parsed.top
        assert (parsed.index, parsed.node, parsed.task) == JobId.parse_suffix(rest)


def test_agent_module_runs_on_its_own() -> None:
    """The agent ships jobid.py in its bundle: standard library only, first in MODULES."""
    from mnp.agent import MODULES

    assert MODULES[0] == "jobid"
    path = Path(__file__).parents[2] / "mnp" / "agent" / "jobid.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('jobid', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert str(m.JobId.parse('42:007#3.1')) == '42:7#3.1'\n"
        "assert 'typing' not in sys.modules and 'dataclasses' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-S", "-c", code], check=True)
