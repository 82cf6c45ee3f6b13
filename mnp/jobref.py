"""Job references: a job is named by its id or by its name, everywhere a job is named.

``42``, ``42:7`` (array child 7), ``42#3`` (node 3) are ids; ``train``,
``train:7``, ``train#3`` name the **newest** top-level job called ``train``
(the highest id: names may repeat, and the job a user just submitted is the
one they mean). An id comes first: ``7`` is job 7 if there is one, and only
otherwise the newest job named ``7``. Pure: the lookups are the caller's (the
controller's memory and store, or the CLI's read-only store).
"""

from __future__ import annotations

from mnp import jobid


def split(ref: str) -> tuple[str, str]:
    """``("train", ":7")`` for ``train:7``: the top-level part, and the rest as written
    (``mnp.jobid``'s grammar: names and ids hold no separator, so the first one starts
    the rest)."""
    return jobid.split(ref)


def id_order(job_id: str) -> tuple[int, str]:
    """A sort key of top-level job ids in the order they were given out."""
    return (int(job_id), "") if job_id.isdigit() else (-1, job_id)
