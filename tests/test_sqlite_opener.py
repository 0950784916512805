"""The one SQLite opener (pacegate/sqlite.py): real SQLite files, each pragma read back."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
from pathlib import Path

import pytest

from pacegate.dbcheck import integrity_problems
from pacegate.sqlite import open_database


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_database_and_its_wal_are_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    conn = open_database(db)
    try:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert _mode(db) == 0o600
        assert (tmp_path / "new.db-wal").exists()
        assert _mode(tmp_path / "new.db-wal") == 0o600
    finally:
        conn.close()


def test_the_pragmas_are_those_the_caller_asked_for(tmp_path: Path) -> None:
    strict = open_database(
        tmp_path / "a.db", synchronous_full=True, secure_delete=True, temp_in_memory=True
    )
    plain = open_database(tmp_path / "b.db", synchronous_full=False)
    try:
        assert strict.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert strict.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert strict.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert strict.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # autocommit: the callers' BEGIN ... COMMIT are the only transactions
        assert strict.isolation_level is None
    finally:
        strict.close()
        plain.close()


def test_read_only_cannot_write_and_never_creates_the_file(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with pytest.raises(sqlite3.OperationalError):
        open_database(db, mode="ro")
    assert not db.exists()
    writer = open_database(db)
    writer.execute("CREATE TABLE t (x)")
    reader = open_database(db, mode="ro")
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.execute("INSERT INTO t VALUES (1)")
    finally:
        reader.close()
        writer.close()


def test_read_only_opens_the_named_file_even_with_uri_characters_in_its_path(
    tmp_path: Path,
) -> None:
    odd = tmp_path / "what?mode=rwc#x%41"
    odd.mkdir()
    with contextlib.closing(open_database(odd / "db")) as conn:
        conn.execute("CREATE TABLE here (x)")
    reader = open_database(odd / "db", mode="ro")
    try:
        names = [r[0] for r in reader.execute("SELECT name FROM sqlite_master")]
    finally:
        reader.close()
    assert names == ["here"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [odd.name]  # nothing made beside


def test_a_file_that_is_not_a_database_is_refused_and_named_corrupt(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite file, it is " * 100)
    with pytest.raises(sqlite3.DatabaseError):
        open_database(junk)
    assert integrity_problems(junk) != []
    assert integrity_problems(tmp_path / "absent.db") == []
