"""The one way pacegate opens an SQLite database (the hospital store, the gateway's spool
and replay windows, the corruption check): each pragma a caller needs is a named parameter,
with the reason for it beside it.

Every connection is in autocommit mode (``isolation_level=None``: the callers write
``BEGIN``/``COMMIT`` themselves, so a transaction spans exactly what they say) and may be
used from any thread (``check_same_thread=False``: each caller serialises access with its
own lock or a single writer thread).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from pacegate.layout import SECRET_FILE_MODE

# Python's own default: how long a statement waits for another connection's lock.
DEFAULT_BUSY_TIMEOUT_MS = 5_000


def open_database(
    path: Path,
    *,
    mode: Literal["rw", "ro"] = "rw",
    synchronous_full: bool = True,
    secure_delete: bool = False,
    temp_in_memory: bool = False,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
) -> sqlite3.Connection:
    """Open ``path``.

    ``mode="rw"`` creates the file if needed, **owner-only** (0600, made before SQLite
    touches it: SQLite gives the ``-wal`` and ``-shm`` files the database file's mode, and
    every pacegate database holds something a stranger must not read), and switches it to
    WAL (readers never block the writer, and a commit is one append to the WAL); a
    filesystem that refuses WAL raises :class:`sqlite3.OperationalError`.

    ``mode="ro"`` opens an existing file read-only (``mode=ro`` URI): nothing can be written
    through it, and a missing file raises instead of being created.

    ``synchronous_full`` (rw): fsync the WAL at every commit, so that a commit acknowledged
    to a peer survives a power cut (NORMAL could lose the last transactions).
    ``secure_delete`` (rw): overwrite freed content, so that rows deleted or rewritten
    (tokens under a retired key) do not linger in free pages. False leaves SQLite's build
    default.
    ``temp_in_memory``: sorts and temporary tables stay in memory, never in a temporary
    file beside the database.
    ``busy_timeout_ms``: how long a statement waits for another connection's lock before
    failing with ``database is locked``.

    Raises :class:`sqlite3.DatabaseError` (the connection closed) when the file is not a
    database or a pragma fails: callers name the file and the fix.
    """
    timeout = busy_timeout_ms / 1000
    if mode == "ro":
        # the path percent-quoted: a '?' or '#' in a directory name would end the path
        uri = f"file:{quote(str(path))}?mode=ro"
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=timeout
        )
    else:
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, SECRET_FILE_MODE))
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    try:
        if mode == "rw":
            journal = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(journal).lower() != "wal":
                raise sqlite3.OperationalError(f"SQLite refused WAL mode (journal mode {journal})")
            if synchronous_full:
                conn.execute("PRAGMA synchronous=FULL")
            if secure_delete:
                conn.execute("PRAGMA secure_delete=ON")
        if temp_in_memory:
            conn.execute("PRAGMA temp_store=MEMORY")
    except BaseException:
        conn.close()
        raise
    return conn
