"""Job ids, the one grammar: ``42``, ``42:7`` (array child 7), ``42#3`` (node 3),
``42#3.1`` (task 1 of node 3), ``42:7#3`` (node 3 of array child 7)::

    JOBID := TOP [":" INDEX] ["#" NODE ["." TASK]]

TOP is the job's number; in a job reference it may be a job's name instead
(``train:7``, ``mnp.jobref``), which holds none of the separators, so the
first ``:``, ``#`` or ``.`` always ends the top. Parsed and rendered only here
(like flux-core's ``JobID``): ``JobId.parse(text)`` and ``str(job_id)``.

Standard library only and Python 3.8: the node agent ships this module
(``mnp.agent.MODULES``); ``mnp.jobid`` re-exports it for the rest of mnp.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False
if TYPE_CHECKING:  # the agent does not import typing (milliseconds); annotations are strings
    from typing import Any, Optional, Tuple

SEPARATORS = ":#."

_ROOT = r"(\d{1,18})"
_SUFFIX = r"(?::(\d{1,9}))?(?:#(\d{1,9})(?:\.(\d{1,9}))?)?"
_ID = _ROOT + _SUFFIX  # compiled on first use (re caches it): `mnp list` never parses one


class JobIdError(ValueError):
    """Text that is not a job id; the message is one line."""


def split(text: str) -> Tuple[str, str]:
    """``("42", ":7#3")`` for ``42:7#3``, ``("train", "#0")`` for ``train#0``: the top
    and the rest as written. Lenient: any text splits, at its first separator."""
    end = len(text)
    for sep in SEPARATORS:
        i = text.find(sep)
        if 0 <= i < end:
            end = i
    return text[:end], text[end:]


def top_of(text: str) -> str:
    """``42`` for ``42``, ``42:7``, ``42#3`` and ``42#3.1``: the text before the first
    separator (lenient, like ``split``)."""
    return text.partition(":")[0].partition("#")[0].partition(".")[0]


class JobId:
    """One job, array child, node or task of a node, by number. Immutable; compares and
    hashes by its parts. Every part is >= 0, and ``task`` is set only with ``node``.
    (A plain class, not a dataclass: the agent does not import dataclasses/inspect.)"""

    __slots__ = ("root", "index", "node", "task")

    root: int
    index: Optional[int]
    node: Optional[int]
    task: Optional[int]

    def __init__(
        self,
        root: int,
        index: Optional[int] = None,
        node: Optional[int] = None,
        task: Optional[int] = None,
    ) -> None:
        parts = (root, index, node, task)
        if (
            type(root) is not int
            or any(p is not None and (type(p) is not int or p < 0) for p in parts)
            or root < 0
        ):
            raise JobIdError("a job id's parts are whole numbers >= 0, not %r" % (parts,))
        if task is not None and node is None:
            raise JobIdError("job %d: only a node has tasks" % root)
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "task", task)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("JobId is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("JobId is immutable")

    def _parts(self) -> Tuple[int, Optional[int], Optional[int], Optional[int]]:
        return (self.root, self.index, self.node, self.task)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobId) and self._parts() == other._parts()

    def __hash__(self) -> int:
        return hash(self._parts())

    def __repr__(self) -> str:
        return "JobId.parse(%r)" % str(self)

    @classmethod
    def parse(cls, text: str) -> JobId:
        """The id ``text`` spells (leading zeros allowed), else ``JobIdError``."""
        m = re.fullmatch(_ID, text, re.A)
        if m is None:
            raise JobIdError(
                f"{text!r} is not a job id: write JOB, JOB:INDEX, JOB#NODE or JOB#NODE.TASK"
            )
        root, index, node, task = (None if g is None else int(g) for g in m.groups())
        assert root is not None  # the pattern requires it
        return cls(root, index, node, task)

    @classmethod
    def parse_or_none(cls, text: str) -> Optional[JobId]:
        try:
            return cls.parse(text)
        except JobIdError:
            return None

    @staticmethod
    def parse_suffix(rest: str) -> Tuple[Optional[int], Optional[int], Optional[int]]:
        """``(index, node, task)`` of the part after the top (``:7``, ``#3.1``, ``""``),
        for a reference whose top is a name; else ``JobIdError``."""
        m = re.fullmatch(_SUFFIX, rest, re.A)
        if m is None:
            raise JobIdError(f"{rest!r} is not a job id suffix: write :INDEX, #NODE or #NODE.TASK")
        index, node, task = (None if g is None else int(g) for g in m.groups())
        return index, node, task

    def __str__(self) -> str:
        text = str(self.root)
        if self.index is not None:
            text += ":%d" % self.index
        if self.node is not None:
            text += "#%d" % self.node
            if self.task is not None:
                text += ".%d" % self.task
        return text

    @property
    def top(self) -> str:
        """The top-level job's id as text: the folder of its logs, its row in the store."""
        return str(self.root)

    @property
    def job(self) -> JobId:
        """The job itself (the top-level job or array child), without node or task."""
        return JobId(self.root, self.index)

    def child(self, index: int) -> JobId:
        """Array child ``index`` of this top-level job."""
        return JobId(self.root, index)

    def at_node(self, node: int) -> JobId:
        """Node ``node`` of this job (or array child)."""
        return JobId(self.root, self.index, node)

    def at_task(self, task: int) -> JobId:
        """Task ``task`` of this node."""
        if self.node is None:
            raise JobIdError(f"{self} is not a node: only a node has tasks")
        return JobId(self.root, self.index, self.node, task)

    def within(self, outer: JobId) -> bool:
        """Whether this id is ``outer`` or lies inside it: ``42:7#3.1`` is within ``42``,
        ``42:7`` and ``42:7#3``; ``42:7#3`` is not within ``42#3``."""
        mine, theirs = self._parts(), outer._parts()
        n = len(theirs)
        while n > 1 and theirs[n - 1] is None:
            n -= 1
        return mine[:n] == theirs[:n]
