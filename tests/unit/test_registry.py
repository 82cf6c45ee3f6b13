"""Registered definitions in the store (``mnp.store.registry``, schema version 4)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mnp.errors import InfraError
from mnp.store import SCHEMA_VERSION, Store

BODY = {"name": "train", "command": ["true"]}


def test_revisions_count_up_per_name_and_are_never_reused(tmp_path: Path) -> None:
    with Store(tmp_path / "mnp.db") as s:
        assert s.register_definition("train", BODY, "a.toml") == 1
        assert s.register_definition("train", {**BODY, "queue": "q"}, "b.toml") == 2
        assert s.register_definition("eval", BODY, "c.toml") == 1
        assert s.deregister_definition("train", 2) == "ACTIVE"
        assert s.deregister_definition("train", 2) == "INACTIVE"  # again: no change
        assert s.deregister_definition("train", 9) is None
        assert s.register_definition("train", BODY, "d.toml") == 3  # 2 is not reused
        rows = [(r["name"], r["revision"], r["status"]) for r in s.definitions()]
        assert rows == [
            ("eval", 1, "ACTIVE"),
            ("train", 1, "ACTIVE"),
            ("train", 2, "INACTIVE"),
            ("train", 3, "ACTIVE"),
        ]
        assert [r["revision"] for r in s.definitions("eval")] == [1]
        assert s.definitions("nope") == []


def test_latest_active_revision_and_bodies(tmp_path: Path) -> None:
    with Store(tmp_path / "mnp.db") as s:
        s.register_definition("train", BODY, "a.toml")
        s.register_definition("train", {**BODY, "queue": "q"}, "b.toml")
        newest = s.definition("train")
        assert newest is not None and newest["revision"] == 2
        assert newest["definition"] == {**BODY, "queue": "q"} and newest["source"] == "b.toml"
        s.deregister_definition("train", 2)
        fallback = s.definition("train")
        assert fallback is not None and fallback["revision"] == 1
        old = s.definition("train", 2)  # an INACTIVE one stays readable by its revision
        assert old is not None and old["status"] == "INACTIVE"
        s.deregister_definition("train", 1)
        assert s.definition("train") is None and s.definition("train", 7) is None
    with Store(tmp_path / "mnp.db", readonly=True) as reader:  # committed at once
        assert len(reader.definitions("train")) == 2


def test_version_3_is_read_without_definitions_and_migrated(tmp_path: Path) -> None:
    db = tmp_path / "mnp.db"
    Store(db).close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE definitions")  # what version 3 had
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    with Store(db, readonly=True) as reader:
        assert reader.definitions() == [] and reader.definition("train") is None
    with Store(db) as writer:
        assert writer.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert writer.register_definition("train", BODY, "a.toml") == 1


def test_a_reader_cannot_register(tmp_path: Path) -> None:
    Store(tmp_path / "mnp.db").close()
    with Store(tmp_path / "mnp.db", readonly=True) as reader:
        with pytest.raises(InfraError, match="opened read-only; cannot write"):
            reader.register_definition("train", BODY, "a.toml")
