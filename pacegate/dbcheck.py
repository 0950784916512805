"""Naming a damaged SQLite file as what it is: corruption, with SQLite's own diagnosis.

A corrupt page surfaces wherever a query first touches it, as ``database disk image is
malformed``, ``file is not a database``, or worse as a wrong value read from a damaged row
(the hospital once blamed the keyring for it). Before a caller blames anything else, it asks
:func:`integrity_problems`; a non-empty answer becomes :class:`DatabaseCorrupt`, with the
file, ``PRAGMA integrity_check``'s first lines and the fix.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from pacegate.errors import PacegateError
from pacegate.sqlite import open_database

# integrity_check lists every damaged page; the first few name the damage, the rest repeat.
MAX_PROBLEMS_SHOWN = 3


class DatabaseCorrupt(PacegateError):
    """An SQLite file fails ``PRAGMA integrity_check``."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f" (+{len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > 3 else ""
        super().__init__(
            f"{path}: the database is corrupt: PRAGMA integrity_check says: {shown}{more} "
            "(fix: stop the services using it and restore it from a backup)"
        )


def integrity_problems(path: Path) -> list[str]:
    """``PRAGMA integrity_check``'s complaints about ``path`` (read-only); empty if whole or
    absent. A file SQLite cannot even open as a database is one complaint."""
    if not path.exists():
        return []
    try:
        with contextlib.closing(open_database(path, mode="ro")) as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    answers = [str(r[0]) for r in rows]
    return [] if answers == ["ok"] else answers


def check_integrity(path: Path) -> None:
    """Raise :class:`DatabaseCorrupt` if ``path`` fails the integrity check."""
    problems = integrity_problems(path)
    if problems:
        raise DatabaseCorrupt(path, problems)


def first_corrupt(paths: Iterable[Path]) -> DatabaseCorrupt | None:
    for path in paths:
        problems = integrity_problems(path)
        if problems:
            return DatabaseCorrupt(path, problems)
    return None
