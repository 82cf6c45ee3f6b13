"""Rows in and out of the store: field checks, JSON columns, event keys. No SQL here.

JSON columns: ``jobs.definition`` (an object; NULL for array children, which
share their parent's), ``jobs.depends_on`` (a list; NULL when empty, read back
as ``[]``), ``attempts.hosts`` (a list), ``attempts.usage`` (an object by tid, or
NULL). ``timed_out`` reads back as a bool.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from mnp.jobid import JobId, JobIdError, top_of
from mnp.jsonline import dumps as dumps  # compact JSON, its encoder made once
from mnp.store.schema import ATTEMPT_COLUMNS, JOB_COLUMNS, NODE_COLUMNS

# mnp.model's JobState values, spelt out so that a reader (`mnp list`) does not
# import the model; tests/unit/test_store.py checks that they agree.
FINISHED_STATES = ("FAILED", "SUCCEEDED")
UNFINISHED_STATES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")

Row = dict[str, Any]

_JOB_FIELDS = frozenset(JOB_COLUMNS)
_UPDATE_FIELDS = _JOB_FIELDS - {"id", "seq"}
_ATTEMPT_FIELDS = frozenset(ATTEMPT_COLUMNS) - {"job_id", "number"}
_NODE_FIELDS = frozenset(NODE_COLUMNS) - {"job_id", "attempt", "node_index"}
_REF_KEYS = frozenset({"file", "env"})


def _check_fields(kind: str, fields: Mapping[str, Any], allowed: frozenset[str]) -> None:
    if fields.keys() <= allowed:  # the hot path allocates nothing
        return
    unknown = fields.keys() - allowed
    if unknown:
        raise ValueError(
            f"unknown {kind} field(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def check_job_fields(fields: Iterable[str]) -> None:
    """The fields of a new job row: known columns, ``id`` among them."""
    keys = dict.fromkeys(fields)
    _check_fields("job", keys, _JOB_FIELDS)
    if "id" not in keys:
        raise ValueError("a job row needs an id")


def encode_job(row: Mapping[str, Any]) -> Row:
    """A new job row with its JSON columns encoded (fields checked by ``check_job_fields``)."""
    out = dict(row)
    _encode_json(out)
    return out


# The three below take a caller's **kwargs dict, which is theirs to change.


def encode_job_update(fields: Row) -> Row:
    _check_fields("job", fields, _UPDATE_FIELDS)
    if "definition" in fields or "depends_on" in fields:
        _encode_json(fields)
    return fields


def encode_attempt(fields: Row) -> Row:
    _check_fields("attempt", fields, _ATTEMPT_FIELDS)
    if fields.get("hosts") is not None:
        fields["hosts"] = dumps(list(fields["hosts"]))
    if fields.get("usage") is not None:
        fields["usage"] = dumps(fields["usage"])
    return fields


def encode_node(fields: Row) -> Row:
    _check_fields("node", fields, _NODE_FIELDS)
    return fields


def _encode_json(out: Row) -> None:
    if "definition" in out:
        out["definition"] = encode_definition(out["definition"])
    if "depends_on" in out:
        deps = out["depends_on"]
        out["depends_on"] = dumps(list(deps)) if deps else None


def encode_definition(definition: Mapping[str, Any] | None) -> str | None:
    if definition is None:
        return None
    if not isinstance(definition, Mapping):
        raise ValueError(f"a job definition is stored as a mapping, not {type(definition)}")
    check_secret_refs(definition)
    return dumps(definition)


def check_secret_refs(definition: Mapping[str, Any]) -> None:
    """Refuse a definition whose ``secrets`` hold anything but references.

    Secrets are read by the controller at each launch (SPEC §7); what is stored
    is where to read them: ``{"file": PATH}`` or ``{"env": NAME}`` (the other
    key may be present as null, as ``dataclasses.asdict`` writes it). The
    message names the secret, never its value.
    """
    secrets = definition.get("secrets")
    if not secrets:
        return
    if not isinstance(secrets, Mapping):
        raise ValueError(
            "definition.secrets: must map names to references, not hold values; refused"
        )
    for name, ref in secrets.items():
        if not _is_ref(ref):
            raise ValueError(
                f"definition.secrets.{name}: only a reference "
                '({"file": PATH} or {"env": NAME}) may be stored, never a value; refused'
            )


def _is_ref(ref: object) -> bool:
    if not isinstance(ref, Mapping) or not ref.keys() <= _REF_KEYS:
        return False
    given = [v for v in ref.values() if v is not None]
    return len(given) == 1 and isinstance(given[0], str)


def decode_job(row: Row) -> Row:
    """In place: JSON columns decoded, ``timed_out`` as a bool."""
    definition = row.get("definition")
    if definition is not None:
        row["definition"] = json.loads(definition)
    deps = row["depends_on"]
    row["depends_on"] = json.loads(deps) if deps else []
    row["timed_out"] = bool(row["timed_out"])
    return row


def decode_attempt(row: Row) -> Row:
    hosts = row["hosts"]
    row["hosts"] = json.loads(hosts) if hosts else []
    usage = row.get("usage")  # absent in a file of version 2 or older
    row["usage"] = json.loads(usage) if usage else None
    return row


_KEYS: dict[tuple[Any, Any, Any], tuple[str | None, str | None]] = {}
_KEYS_MAX = 4096  # a job's events come together: a few thousand recent subjects suffice


def event_key(event: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The subject of an event and its top-level job, as stored for filtering.

    The subject is ``job_id`` as given (``42``, ``42:7``, ``42#3``), completed
    from ``array_index`` / ``node_index`` when the caller gave only the parent's
    id, so that ``42`` with ``node_index`` 3 is filed under ``42#3``.
    """
    job_id = event.get("job_id")
    if job_id is None:
        return None, None
    memo = (job_id, event.get("array_index"), event.get("node_index"))
    try:
        found = _KEYS.get(memo)
    except TypeError:  # an unhashable index: not one mnp gives out
        return _event_key(str(job_id), memo[1], memo[2])
    if found is None:
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()
        found = _KEYS[memo] = _event_key(str(job_id), memo[1], memo[2])
    return found


def _event_key(key: str, array_index: Any, node_index: Any) -> tuple[str | None, str | None]:
    subject = JobId.parse_or_none(key)
    if subject is None:  # not an id mnp gives out: filed as written
        return key, top_of(key)
    try:
        if array_index is not None and subject.index is None:
            subject = JobId(subject.root, int(array_index), subject.node, subject.task)
        if node_index is not None and subject.node is None:
            subject = subject.at_node(int(node_index))
    except (JobIdError, TypeError, ValueError):  # not an index mnp gives out: as written
        pass
    return str(subject), subject.top


def key(value: str) -> str | bytes:
    """A name or id given by a user, as a query parameter. One that is not valid Unicode
    (bytes that were not UTF-8, as surrogate escapes), which sqlite3 cannot bind as
    text, is bound as a BLOB: it equals no stored name, so the query finds nothing."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")
    return value


def scalar(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]
