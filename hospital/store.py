"""The hospital's reading store: one Fernet token per reading in SQLite (WAL), idempotent on
(device, counter), hash-chained so that deleting or reordering rows is detectable, with the
chain head anchored outside the database so that a rollback is detectable too.

What a row holds (everything else is inside the token; see docs/hospital.md)::

    seq          INTEGER PRIMARY KEY  arrival order, 1, 2, 3, ... without gaps
    row_key      BLOB UNIQUE          HMAC(row-key, device_id || counter): the idempotence key
    key_version  INTEGER              which Fernet key encrypted the token (a hint only: it
                                      is not authenticated, and rotation never trusts it)
    token        BLOB                 Fernet(newest key, padded JSON of the reading + metadata)
    chain        BLOB                 HMAC(chain-key, prev chain || seq || row_key || SHA-256(pt))

Row key and chain key derive from the integrity key whose version the head names. The chain
head (integrity-key version, last seq, last chain, and a MAC over them) lives in the ``meta``
table, so a removed tail is detected; after each commit it is also appended to the anchor
log beside the database (:mod:`hospital.anchor`), so a truncated WAL or an older copy of
the database is detected. Re-encryption (``rotate-key``) changes ``token`` and
``key_version`` only; ``rotate-key --integrity`` re-keys ``row_key`` and ``chain`` of every
row in one transaction.

This module owns the :class:`ReadingStore` protocol, the one store type the rest of the
hospital sees, and its embedded SQLite implementation. What every backend shares lives beside
it, pure: the plaintext codec in :mod:`hospital.rowcodec`, the chain's rules and the verify
reports in :mod:`hospital.chain`. The PostgreSQL backend is :mod:`hospital.pgstore`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from hospital.anchor import AnchorRecord, HeadAnchor
from hospital.chain import (
    ANCHOR_PROBLEMS,
    GENESIS,
    CheckedRow,
    Head,
    RecordedHead,
    RowScan,
    VerifyProblem,
    VerifyReport,
    anchor_problems,
    best_anchor,
    describe_problem,
    head_problems,
    recorded_problems,
    row_problems,
)
from hospital.keyring import ChainKeys, InvalidToken, Keyring
from hospital.rowcodec import StoredReading, decode_plaintext, encode_plaintext, in_period
from pacegate.dbcheck import check_integrity
from pacegate.errors import ConfigError, PacegateError
from pacegate.ingest import IngestItem
from pacegate.layout import SECRET_DIR_MODE, SECRET_FILE_MODE
from pacegate.reading import Reading
from pacegate.sqlite import open_database

if TYPE_CHECKING:
    from hospital.config import HospitalConfig

# 2: the head names its integrity-key version, and is anchored outside the database
SCHEMA_VERSION = 2
# Rows re-encrypted per transaction during rotation: short transactions let ingest
# interleave, so rotation never stalls it for long.
ROTATE_BATCH = 200
DEFAULT_ITER_BATCH = 1000
# How long a writer waits for the other writer (ingest vs rotate-key) before failing.
BUSY_TIMEOUT_MS = 30_000

log = logging.getLogger("pacegate.hospital.store")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS readings ("
    " seq INTEGER PRIMARY KEY,"
    " row_key BLOB NOT NULL UNIQUE,"
    " key_version INTEGER NOT NULL,"
    " token BLOB NOT NULL,"
    " chain BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
)


class StoreError(PacegateError):
    """The store cannot do what was asked (wrong keyring, undecryptable row, ...)."""


def default_anchor(db_path: Path) -> Path:
    """Where the chain head is anchored when hospital.yaml does not say (``store.anchor``)."""
    return db_path.with_name(db_path.name + "-anchor")


@dataclass(frozen=True, slots=True)
class StoreResult:
    stored: int
    duplicates: int
    # duplicates whose content differs from the stored reading (a subset of duplicates):
    # the same (device, counter) carrying another reading is a forgery or a device bug
    conflicts: int = 0


@runtime_checkable
class ReadingStore(Protocol):
    """Everything the hospital does with its store: ingest (the service), analytics, verify,
    rotation, export. The only store type outside this module: callers get one from
    :func:`open_store` and never name a backend (SQLite here, :mod:`hospital.pgstore`)."""

    @property
    def name(self) -> str:
        """What messages call the store: the database file, or the redacted DSN."""
        ...

    @property
    def anchor(self) -> HeadAnchor | None:
        """The chain-head anchor outside the database (None: this node keeps none)."""
        ...

    def store_batch(self, items: Sequence[IngestItem]) -> StoreResult:
        """Store new readings and absorb duplicates, durably, in one transaction."""
        ...

    def count(self) -> int: ...

    def iter_readings(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        batch_size: int = DEFAULT_ITER_BATCH,
    ) -> Iterator[list[Reading]]: ...

    def iter_records(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        batch_size: int = DEFAULT_ITER_BATCH,
        *,
        seq_range: tuple[int, int] | None = None,
    ) -> Iterator[list[StoredReading]]: ...

    def seq_bounds(self) -> tuple[int, int]: ...

    def iter_reading_values(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        batch_size: int = DEFAULT_ITER_BATCH,
        *,
        seq_range: tuple[int, int] | None = None,
        check_chain: bool = False,
    ) -> Iterator[tuple[list[int], list[int]]]: ...

    # -- integrity: the chain, its anchor outside the store, key rotation ---------------------
    def verify(
        self, batch_size: int = DEFAULT_ITER_BATCH, *, expect: RecordedHead | None = None
    ) -> VerifyReport:
        """Every row against the chain, the head, and the anchor (rollback); and, given a
        head recorded earlier off the host, against that too."""
        ...

    def scan(
        self, batch_size: int = DEFAULT_ITER_BATCH, *, expect: RecordedHead | None = None
    ) -> RowScan:
        """:meth:`verify` row by row, each row with its reading and its problems."""
        ...

    def check_head(self) -> int:
        """The head and the anchor, cheaply; the last row they vouch for."""
        ...

    def reanchor(self) -> tuple[VerifyReport, list[AnchorRecord] | None]: ...

    def rotate_key(
        self, *, batch_size: int = ROTATE_BATCH, retire_old: bool = True, integrity: bool = False
    ) -> RotationReport: ...

    def close(self) -> None: ...

    def __enter__(self) -> ReadingStore: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass
class RotationReport:
    new_version: int
    reencrypted: int
    retired: list[int]
    new_mac_version: int | None = None  # set when the integrity key was rotated too
    retired_mac: list[int] = field(default_factory=list)


class ChainScan:
    """One pass over every row, each decrypted and checked against the chain, in one read
    snapshot on a connection of its own (so a long export never holds the store's lock).
    Runs once; ``report`` is complete when the iteration ends."""

    def __init__(
        self, store: SqliteReadingStore, batch_size: int, expect: RecordedHead | None = None
    ) -> None:
        self._store = store
        self._expect = expect
        self._batch_size = batch_size
        self._started = False
        self._keys: ChainKeys | None = None
        self.report = VerifyReport()

    def __iter__(self) -> Iterator[list[CheckedRow]]:
        if self._started:
            raise RuntimeError("a ChainScan runs once")
        self._started = True
        store = self._store
        with store._lock:
            store.keyring.refresh()
        # the anchor first, the snapshot second: ingest anchors a head only after its
        # commit, so an anchor read now never names a row the snapshot cannot hold
        records = store.anchor.records()
        conn = _read_only(store.db_path)
        try:
            conn.execute("BEGIN")  # one read snapshot for the whole walk
            head = _head_of(conn)
            version = head.version if head is not None else _db_mac_version(conn, store.keyring)
            self._keys = (
                store.keyring.integrity(version)
                if version is not None and store.keyring.has_mac_version(version)
                else None
            )
            if self._keys is None:
                self.report.problems.append(
                    VerifyProblem(
                        None,
                        "unknown_integrity_key",
                        f"the keyring holds no integrity key version {version}: rows cannot "
                        "be checked against the chain",
                    )
                )
            best = best_anchor(records or [], store.keyring, version)
            anchor_seq = best.seq if best is not None else -1
            chain_at_anchor = GENESIS if anchor_seq == 0 else None
            expect_seq = self._expect.seq if self._expect is not None else -1
            chain_at_expect = GENESIS if expect_seq == 0 else None
            prev_seq, prev_chain = 0, GENESIS
            cur = conn.execute("SELECT seq, row_key, token, chain FROM readings ORDER BY seq")
            while rows := cur.fetchmany(self._batch_size):
                out = []
                for seq, row_key, token, chain in rows:
                    out.append(self._check(prev_seq, prev_chain, seq, row_key, token, chain))
                    prev_seq, prev_chain = seq, chain
                    if seq == anchor_seq:
                        chain_at_anchor = chain
                    if seq == expect_seq:
                        chain_at_expect = chain
                self.report.rows += len(rows)
                yield out
            conn.execute("COMMIT")
        finally:
            conn.close()
        self._check_head(head, prev_seq, prev_chain)
        self.report.problems += anchor_problems(
            store.anchor, records, best, version, prev_seq, chain_at_anchor
        )
        self.report.head_version = version or 0
        if self._expect is not None:
            self.report.problems += recorded_problems(
                self._expect, version, prev_seq, chain_at_expect
            )

    def _check(
        self, prev_seq: int, prev_chain: bytes, seq: int, row_key: bytes, token: bytes, chain: bytes
    ) -> CheckedRow:
        kr, keys = self._store.keyring, self._keys
        problems = []
        if seq != prev_seq + 1:
            span = (
                f"row {prev_seq + 1}" if seq == prev_seq + 2 else f"rows {prev_seq + 1}-{seq - 1}"
            )
            problems.append(VerifyProblem(seq, "missing_rows", f"{span} deleted"))
        try:
            plaintext = kr.decrypt(token)
            record = decode_plaintext(plaintext)
        except (InvalidToken, ValueError, KeyError, TypeError):
            problems.append(
                VerifyProblem(seq, "undecryptable", "token altered, or its key is not held")
            )
            self.report.problems += problems
            return CheckedRow(seq, None, tuple(problems))
        if keys is not None:
            problems += row_problems(keys, prev_chain, seq, row_key, chain, plaintext, record)
        self.report.problems += problems
        return CheckedRow(seq, record, tuple(problems))

    def _check_head(self, head: Head | None, last_seq: int, last_chain: bytes) -> None:
        report = self.report
        report.last_seq, report.head_chain = last_seq, last_chain
        report.problems += head_problems(head, self._keys, last_seq, last_chain)


def _read_only(db_path: Path) -> sqlite3.Connection:
    return open_database(db_path, mode="ro")


def _db_mac_version(conn: sqlite3.Connection, keyring: Keyring) -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE name = 'keyring'").fetchone()
    return keyring.mac_version_of(row[0]) if row is not None else None


def _head_of(conn: sqlite3.Connection) -> Head | None:
    """The head in ``meta``; None when missing or malformed."""
    row = conn.execute("SELECT value FROM meta WHERE name = 'head'").fetchone()
    return Head.decode(row[0] if row is not None else None)


class _ChainCursor:
    """Checks consecutive pages of a scan against the chain (see
    :meth:`SqliteReadingStore.iter_reading_values`), starting from the row before the range,
    under the integrity key the head names when the scan starts."""

    def __init__(self, store: SqliteReadingStore, seq_range: tuple[int, int] | None) -> None:
        self._store = store
        lo = seq_range[0] if seq_range is not None else 1
        with store._lock:
            head = store._read_head()
            prev = None
            if lo > 1:
                prev = store._conn.execute(
                    "SELECT chain FROM readings WHERE seq = ?", (lo - 1,)
                ).fetchone()
        self._keys = store._chain_keys(head.version)
        if lo > 1 and prev is None:
            raise self._damaged(VerifyProblem(lo, "missing_rows", f"row {lo - 1} deleted"))
        self._seq, self._chain = lo - 1, (prev[0] if prev is not None else GENESIS)

    def check(self, page: list[tuple[int, bytes, bytes, bytes]], objs: list[Any]) -> None:
        keys = self._keys
        for (seq, plaintext, row_key, chain), obj in zip(page, objs, strict=True):
            if seq != self._seq + 1:
                raise self._damaged(
                    VerifyProblem(seq, "missing_rows", f"rows {self._seq + 1}-{seq - 1} deleted")
                )
            if keys.row_key(str(obj["device_id"]), int(obj["counter"])) != row_key:
                raise self._damaged(
                    VerifyProblem(seq, "row_key_mismatch", "token moved here from another row")
                )
            if keys.chain_link(self._chain, seq, row_key, plaintext) != chain:
                raise self._damaged(
                    VerifyProblem(
                        seq, "chain_mismatch", "this row or its predecessor was modified or moved"
                    )
                )
            self._seq, self._chain = seq, chain

    def _damaged(self, problem: VerifyProblem) -> StoreError:
        return StoreError(
            f"{self._store.db_path}: {describe_problem(problem)}: the chain does not verify; "
            "run 'pacegate hospital verify'"
        )


class PlaintextScans:
    """The read scans both backends share, written once over what each provides:
    :meth:`_plaintext_pages` (``(seq, plaintext, row_key, chain, ...)`` rows in arrival
    order, decrypted, one list per query), :meth:`_undecryptable` (the error naming a row)
    and :meth:`_chain_cursor` (the chain check of ``check_chain``); and closing, over the
    lock and the connection (SQLite's or PostgreSQL's) each backend opens."""

    _lock: threading.Lock
    _conn: Any  # each backend annotates its own connection type

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _plaintext_pages(
        self,
        since: datetime | None,
        until: datetime | None,
        batch_size: int,
        seq_range: tuple[int, int] | None,
    ) -> Iterator[Sequence[tuple[Any, ...]]]:
        raise NotImplementedError

    def _undecryptable(self, seq: int, why: str) -> StoreError:
        raise NotImplementedError

    def _chain_cursor(self, seq_range: tuple[int, int] | None) -> ChainChecker:
        raise NotImplementedError

    def iter_records(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        batch_size: int = DEFAULT_ITER_BATCH,
        *,
        seq_range: tuple[int, int] | None = None,
    ) -> Iterator[list[StoredReading]]:
        """Stream every stored reading in arrival order, ``batch_size`` rows per query.

        Timestamps are not in clear in the database, so ``since`` (inclusive) and ``until``
        (exclusive) are applied after decryption: a filtered scan costs a full scan. Memory
        stays bounded by one batch; no read transaction is held between batches.
        ``seq_range=(lo, hi)`` limits the scan to rows ``lo <= seq < hi`` (several
        processes can each decrypt a slice; see :meth:`seq_bounds`).
        """
        for page in self._plaintext_pages(since, until, batch_size, seq_range):
            out = []
            for seq, plaintext, *_ in page:
                try:
                    record = decode_plaintext(plaintext)
                except (ValueError, KeyError, TypeError) as exc:
                    raise self._undecryptable(seq, type(exc).__name__) from None
                ts = record.reading.timestamp
                if (since is None or ts >= since) and (until is None or ts < until):
                    out.append(record)
            if out:
                yield out

    def iter_readings(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        batch_size: int = DEFAULT_ITER_BATCH,
        *,
        seq_range: tuple[int, int] | None = None,
    ) -> Iterator[list[Reading]]:
        for batch in self.iter_records(since, until, batch_size, seq_range=seq_range):
            yield [r.reading for r in batch]

    def iter_reading_values(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        batch_size: int = DEFAULT_ITER_BATCH,
        *,
        seq_range: tuple[int, int] | None = None,
        check_chain: bool = False,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """``(ages, heart_rates)`` of the same rows as :meth:`iter_readings`, per batch of
        rows, for analytics: the JSON of a whole batch is parsed in one call and no
        :class:`Reading` is built, which makes a scan ~25 % cheaper. Timestamps are parsed
        only when ``since``/``until`` filter. A row that does not decrypt or parse raises
        :class:`StoreError` naming it, as in :meth:`iter_records`.

        ``check_chain``: every row of the range (filtered by time or not) is also checked
        against the chain, from the row before the range on, as :meth:`verify` does; the
        first damaged row raises :class:`StoreError` naming it. Together with
        :meth:`check_head` and a range from row 1 to its result, nothing :meth:`verify`
        would flag passes."""
        chain = self._chain_cursor(seq_range) if check_chain else None
        for page in self._plaintext_pages(since, until, batch_size, seq_range):
            plaintexts = [row[1] for row in page]
            try:
                objs = json.loads(b"[" + b",".join(plaintexts) + b"]")
                readings = [o["reading"] for o in objs]
                ages = [int(r["age"]) for r in readings]
                rates = [int(r["heart_rate_bpm"]) for r in readings]
                if chain is not None:
                    chain.check(page, objs)
                if since is not None or until is not None:
                    keep = [in_period(r["timestamp"], since, until) for r in readings]
                    ages = [a for a, k in zip(ages, keep, strict=True) if k]
                    rates = [h for h, k in zip(rates, keep, strict=True) if k]
            except (ValueError, KeyError, TypeError):
                for seq, plaintext, *_ in page:
                    try:  # find the culprit, and say which row it is
                        decode_plaintext(plaintext)
                    except (ValueError, KeyError, TypeError) as exc:
                        raise self._undecryptable(seq, type(exc).__name__) from None
                raise
            if ages:
                yield ages, rates


class ChainChecker(Protocol):
    """Checks each page of a scan against the chain (``iter_reading_values(check_chain=)``)."""

    def check(self, page: Any, objs: list[Any]) -> None: ...  # (each backend its rows)


def check_scan_arguments(since: datetime | None, until: datetime | None, batch_size: int) -> None:
    """What every scan refuses before it reads a row: a batch under one row, a naive time."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    for bound in (since, until):
        if bound is not None and bound.tzinfo is None:
            raise ValueError("since/until must be timezone-aware")


class SqliteReadingStore(PlaintextScans):
    """The embedded :class:`ReadingStore`. Thread-safe (one connection behind a lock)."""

    def __init__(self, db_path: Path, keyring: Keyring, anchor_path: Path | None = None) -> None:
        self.db_path = db_path
        self.name = str(db_path)
        self.keyring = keyring
        self.anchor = HeadAnchor(
            anchor_path if anchor_path is not None else default_anchor(db_path)
        )
        self._lock = threading.Lock()
        # the last head this object anchored (None: not known to be anchored)
        self._anchored: tuple[int, bytes] | None = None
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=SECRET_DIR_MODE)
        self.anchor.path.parent.mkdir(parents=True, exist_ok=True, mode=SECRET_DIR_MODE)
        try:
            self._conn: sqlite3.Connection = open_database(
                db_path,
                synchronous_full=True,  # an ACK means the batch survives a power cut
                secure_delete=True,  # no token under a retired key lingers in free pages
                temp_in_memory=True,
                busy_timeout_ms=BUSY_TIMEOUT_MS,
            )
        except sqlite3.DatabaseError as exc:
            check_integrity(db_path)  # a damaged file is named as corruption, not as "error"
            raise StoreError(f"{db_path}: cannot open the reading database: {exc}") from None
        try:
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            check_integrity(db_path)
            raise StoreError(f"{db_path}: cannot open the reading database: {exc}") from None
        except ConfigError:
            self._conn.close()
            # a damaged page can read as another keyring's fingerprint: rule corruption
            # out before blaming the keyring
            check_integrity(db_path)
            raise
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open(
        cls, db_path: Path, keyring_path: Path, anchor_path: Path | None = None
    ) -> SqliteReadingStore:
        """Open the database with its keyring; a new keyring is made only for a new store."""
        for directory in {db_path.parent, keyring_path.parent}:
            directory.mkdir(parents=True, exist_ok=True, mode=SECRET_DIR_MODE)
        if keyring_path.exists():
            keyring = Keyring.load(keyring_path)
        elif _has_readings(db_path):
            raise ConfigError(
                keyring_path,
                "",
                f"keyring not found, but {db_path} holds readings",
                fix="restore the keyring from its backup (without it the readings are lost)",
            )
        else:
            keyring = Keyring.create(keyring_path)
        return cls(db_path, keyring, anchor_path)

    def _init_schema(self) -> None:
        with self.anchor.locked(BUSY_TIMEOUT_MS / 1000), self._write():
            for statement in _SCHEMA:
                self._conn.execute(statement)
            meta = dict(self._conn.execute("SELECT name, value FROM meta").fetchall())
            if "schema_version" not in meta:
                keys = self.keyring.integrity(self.keyring.current_mac_version)
                self._set_meta("schema_version", SCHEMA_VERSION.to_bytes(4, "big"))
                self._set_meta("keyring", keys.fingerprint())
                self._set_meta("anchored", b"\x01")
                self._write_head(keys, 0, GENESIS)
                self.anchor.replace(self._anchor_record(keys, 0, GENESIS))
                return
            if int.from_bytes(meta["schema_version"], "big") not in (1, SCHEMA_VERSION):
                raise StoreError(f"{self.db_path}: unsupported schema version")
            version = self.keyring.mac_version_of(meta.get("keyring", b""))
            head = _head_of(self._conn)
            if version is None or (head is not None and head.version != version):
                raise ConfigError(
                    self.keyring.path,
                    "mac_keys",
                    f"this keyring does not belong to the database {self.db_path}",
                    fix="point 'store.keyring' at the keyring created with this database (a "
                    "database restored from before an integrity-key rotation needs the "
                    "keyring of that time)",
                )
            if "anchored" not in meta:
                # a store from before the anchor existed: anchor its current head now
                keys = self.keyring.integrity(version)
                if head is not None:
                    self.anchor.replace(self._anchor_record(keys, head.seq, head.chain))
                self._set_meta("schema_version", SCHEMA_VERSION.to_bytes(4, "big"))
                self._set_meta("anchored", b"\x01")
                log.info("%s: chain head anchored in %s", self.db_path, self.anchor.path)

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front: the head we read cannot move under us.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _set_meta(self, name: str, value: bytes) -> None:
        self._conn.execute(
            "INSERT INTO meta(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def _read_head(self) -> Head:
        head = _head_of(self._conn)
        if head is None:
            raise StoreError(f"{self.db_path}: the chain head is missing or damaged (run verify)")
        return head

    def _write_head(self, keys: ChainKeys, seq: int, chain: bytes) -> None:
        self._set_meta("head", Head(keys.version, seq, chain, keys.head_mac(seq, chain)).encode())

    @staticmethod
    def _anchor_record(keys: ChainKeys, seq: int, chain: bytes) -> AnchorRecord:
        return AnchorRecord(keys.version, seq, chain, keys.anchor_mac(seq, chain))

    def _chain_keys(self, version: int) -> ChainKeys:
        """The keys of the version the database is under (reloading the keyring once, in
        case rotate-key added it since)."""
        if not self.keyring.has_mac_version(version):
            self.keyring.refresh()
        return self.keyring.integrity(version)

    # -- ingest ---------------------------------------------------------------------------------
    def store_batch(self, items: Sequence[IngestItem]) -> StoreResult:
        """Store ``items`` in one transaction, then anchor the new head outside the
        database; returns once both are fsynced (what the ACK promises)."""
        if not items:
            return StoreResult(0, 0)
        with self._lock:
            self.keyring.refresh()
            prepared = [self._prepare(item) for item in items]
            version = self.keyring.current_version
            stored = duplicates = conflicts = 0
            # the anchor lock spans commit and anchor record: no other writer's (older)
            # head can be appended after ours
            with self.anchor.locked(BUSY_TIMEOUT_MS / 1000):
                with self._write():
                    # rotate-key may have replaced the keyring while we encrypted: with the
                    # write lock held, make sure no row lands under a key older than the newest
                    if self.keyring.refresh() and self.keyring.current_version != version:
                        version = self.keyring.current_version
                        prepared = [
                            (item, pt, self.keyring.encrypt(pt)) for item, pt, _ in prepared
                        ]
                    head = self._read_head()
                    keys = self._chain_keys(head.version)
                    seq, chain = head.seq, head.chain
                    for item, plaintext, token in prepared:
                        row_key = keys.row_key(item.device_id, item.counter)
                        link = keys.chain_link(chain, seq + 1, row_key, plaintext)
                        cur = self._conn.execute(
                            "INSERT INTO readings(seq, row_key, key_version, token, chain) "
                            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(row_key) DO NOTHING",
                            (seq + 1, row_key, version, token, link),
                        )
                        if cur.rowcount == 1:
                            seq, chain = seq + 1, link
                            stored += 1
                        else:
                            duplicates += 1
                            if not self._same_as_stored(row_key, plaintext):
                                conflicts += 1
                    if stored:
                        self._write_head(keys, seq, chain)
                # also when nothing was new but the head is not known to be anchored: a
                # batch whose anchor append failed after its commit (disk full) comes back
                # as duplicates, and is acknowledged only once its head is anchored
                if stored or self._anchored != (seq, chain):
                    self.anchor.append(self._anchor_record(keys, seq, chain))
                    self._anchored = (seq, chain)
            return StoreResult(stored, duplicates, conflicts)

    def _prepare(self, item: IngestItem) -> tuple[IngestItem, bytes, bytes]:
        # the Fernet encryption, the costly part, outside the write transaction; the row
        # key inside it, under the integrity key the database is under at that moment
        plaintext = encode_plaintext(item)
        return item, plaintext, self.keyring.encrypt(plaintext)

    def _same_as_stored(self, row_key: bytes, plaintext: bytes) -> bool:
        row = self._conn.execute(
            "SELECT token FROM readings WHERE row_key = ?", (row_key,)
        ).fetchone()
        try:
            return row is not None and self.keyring.decrypt(row[0]) == plaintext
        except InvalidToken:
            return False

    # -- reading --------------------------------------------------------------------------------
    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM readings").fetchone()[0])

    def seq_bounds(self) -> tuple[int, int]:
        """``(first, last)`` row sequence numbers, ``(0, 0)`` when empty. Cheap (the primary
        key's b-tree ends), unlike :meth:`count`: lets callers split a scan into
        ``seq_range`` slices, e.g. one per process."""
        with self._lock:
            lo, hi = self._conn.execute("SELECT min(seq), max(seq) FROM readings").fetchone()
        return (int(lo), int(hi)) if lo is not None else (0, 0)

    def _chain_cursor(self, seq_range: tuple[int, int] | None) -> ChainChecker:
        return _ChainCursor(self, seq_range)

    def _plaintext_pages(
        self,
        since: datetime | None,
        until: datetime | None,
        batch_size: int,
        seq_range: tuple[int, int] | None,
    ) -> Iterator[list[tuple[int, bytes, bytes, bytes]]]:
        """``(seq, plaintext, row_key, chain)`` of the rows ``seq_range`` selects (all when
        None), in arrival order, one list per query of ``batch_size`` rows; the lock is
        held per query only. Checks the arguments both public scans share
        (``since``/``until`` only for a timezone: the callers filter). A token that does
        not decrypt raises :class:`StoreError` naming its row."""
        check_scan_arguments(since, until, batch_size)
        lo, stop = seq_range if seq_range is not None else (1, None)
        last = max(lo - 1, 0)
        while True:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT seq, token, row_key, chain FROM readings WHERE seq > ? AND seq < ? "
                    "ORDER BY seq LIMIT ?",
                    (last, stop if stop is not None else 2**63 - 1, batch_size),
                ).fetchall()
                self.keyring.refresh()
            if not rows:
                return
            last = rows[-1][0]
            page = []
            for seq, token, row_key, chain in rows:
                try:
                    page.append((seq, self.keyring.decrypt(token), row_key, chain))
                except InvalidToken:
                    raise self._undecryptable(seq, "InvalidToken") from None
            yield page

    def _undecryptable(self, seq: int, why: str) -> StoreError:
        return StoreError(
            f"{self.db_path}: row {seq} does not decrypt under the keyring "
            f"{self.keyring.path} ({why}); run 'pacegate hospital verify'"
        )

    # -- maintenance ----------------------------------------------------------------------------
    def rotate_key(
        self, *, batch_size: int = ROTATE_BATCH, retire_old: bool = True, integrity: bool = False
    ) -> RotationReport:
        """Add a Fernet key, re-encrypt every row under it in short transactions while
        ingest continues, then (``retire_old``) drop the older keys from the keyring.
        ``integrity``: then also re-key row keys and chain under a new integrity key
        (:meth:`_rekey`)."""
        with _exclusive(self.keyring.path.with_name(self.keyring.path.name + ".lock")):
            with self._lock:
                self.keyring.refresh()
                new_version = self.keyring.add_key()
                self.keyring.save()  # from here on, a running service encrypts under it
            # Every row is looked at, whatever its key_version says: that column is not
            # authenticated (set high on one row, it would make a rotation that trusts it
            # skip the row and then retire the only key that decrypts it).
            reencrypted, last = 0, 0
            while True:
                with self._lock, self._write():
                    rows = self._conn.execute(
                        "SELECT seq, key_version, token FROM readings WHERE seq > ? "
                        "ORDER BY seq LIMIT ?",
                        (last, batch_size),
                    ).fetchall()
                    for seq, version, token in rows:
                        fresh = self._under_newest(seq, token)
                        if fresh is not None:
                            reencrypted += 1
                            self._conn.execute(
                                "UPDATE readings SET token = ?, key_version = ? WHERE seq = ?",
                                (fresh, new_version, seq),
                            )
                        elif version != new_version:
                            self._conn.execute(
                                "UPDATE readings SET key_version = ? WHERE seq = ?",
                                (new_version, seq),
                            )
                if not rows:
                    break
                last = rows[-1][0]
            retired: list[int] = []
            with self._lock, self._write():
                # the rows ingest added since the last batch were encrypted under the newest
                # key (store_batch checks inside its transaction); check it, token by token,
                # before the older keys go
                for seq, token in self._conn.execute(
                    "SELECT seq, token FROM readings WHERE seq > ?", (last,)
                ).fetchall():
                    if not self.keyring.decrypts_under_newest(token):
                        raise StoreError(
                            f"{self.db_path}: row {seq} is not under key version "
                            f"{new_version}; nothing retired. Run 'pacegate hospital rotate-key' "
                            "again"
                        )
                if retire_old:
                    retired = self.keyring.retire_older_than(new_version)
                    self.keyring.save()
            with self._lock:
                # old tokens still sit in the WAL until it is checkpointed and truncated
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            report = RotationReport(new_version, reencrypted, retired)
            if integrity:
                report.new_mac_version, report.retired_mac = self._rekey(batch_size, retire_old)
            return report

    def _rekey(self, batch_size: int, retire_old: bool) -> tuple[int, list[int]]:
        """Re-key every row (row key and chain link) under a new integrity key, in **one**
        transaction: a crash leaves the store wholly under the old key or wholly under the
        new one, never a mix that verify could not tell from tampering. Ingest waits for it
        (up to the busy timeout; past it, the batch fails without ACK and the gateway sends
        it again). Refused, with nothing changed, when the chain or its anchor does not
        verify: re-keying a damaged chain would make the damage verify."""
        kr = self.keyring
        with self._lock:
            kr.refresh()
            new_version = kr.add_mac_key()
            kr.save()  # both keys held: a service reloads it, and can follow the switch
        new = kr.integrity(new_version)
        with self._lock, self.anchor.locked(BUSY_TIMEOUT_MS / 1000):
            records = self.anchor.records()
            with self._write():
                head = self._read_head()
                old = self._chain_keys(head.version)
                best = best_anchor(records or [], kr, head.version)
                anchor_seq = best.seq if best is not None else -1
                chain_at_anchor = GENESIS if anchor_seq == 0 else None
                prev_old = prev_new = GENESIS
                last = 0
                while rows := self._conn.execute(
                    "SELECT seq, row_key, token, chain FROM readings WHERE seq > ? "
                    "ORDER BY seq LIMIT ?",
                    (last, batch_size),
                ).fetchall():
                    updates = []
                    for seq, row_key, token, chain in rows:
                        try:
                            plaintext = kr.decrypt(token)
                            record = decode_plaintext(plaintext)
                        except (InvalidToken, ValueError, KeyError, TypeError):
                            raise self._not_rekeyed(seq, "undecryptable") from None
                        if seq != last + 1:
                            raise self._not_rekeyed(seq, "missing_rows")
                        bad = row_problems(old, prev_old, seq, row_key, chain, plaintext, record)
                        if bad:
                            raise self._not_rekeyed(seq, bad[0].kind)
                        fresh_key = new.row_key(record.device_id, record.counter)
                        fresh_chain = new.chain_link(prev_new, seq, fresh_key, plaintext)
                        updates.append((fresh_key, fresh_chain, seq))
                        if seq == anchor_seq:
                            chain_at_anchor = chain
                        prev_old, prev_new, last = chain, fresh_chain, seq
                    self._conn.executemany(
                        "UPDATE readings SET row_key = ?, chain = ? WHERE seq = ?", updates
                    )
                damage = head_problems(head, old, last, prev_old) + anchor_problems(
                    self.anchor, records, best, head.version, last, chain_at_anchor
                )
                if damage:
                    raise self._not_rekeyed(damage[0].seq, damage[0].kind)
                self._write_head(new, last, prev_new)
                self._set_meta("keyring", new.fingerprint())
            # committed: the anchor follows (a crash before this line leaves an anchor under
            # the old key, which verify compares by row number only)
            self.anchor.replace(self._anchor_record(new, last, prev_new))
        retired: list[int] = []
        with self._lock:
            if retire_old:
                kr.refresh()
                retired = kr.retire_mac_older_than(new_version)
                kr.save()
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return new_version, retired

    def _not_rekeyed(self, seq: int | None, kind: str) -> StoreError:
        where = f"row {seq}" if seq is not None else "the head"
        return StoreError(
            f"{self.db_path}: {where}: {kind}: the chain does not verify, so it was not "
            "re-keyed under a new integrity key (that would make the damage verify); nothing "
            "changed. Run 'pacegate hospital verify'"
        )

    def reanchor(self) -> tuple[VerifyReport, list[AnchorRecord] | None]:
        """Accept the database's current head as its anchor, after a deliberate restore
        (or a lost anchor file). Refused unless the chain *inside* the database verifies.
        Ingest goes on meanwhile: the head anchored is the one verified (rows stored since
        are anchored by their own commits, and by this). Returns the report and the anchor
        records it replaced."""
        before = self.anchor.records()
        report = self.verify()
        inside = [p for p in report.problems if p.kind not in ANCHOR_PROBLEMS]
        if inside:
            raise StoreError(
                f"{self.db_path}: the chain inside the database does not verify "
                f"({len(inside)} problem(s), first: {describe_problem(inside[0])}); not re-anchored"
            )
        with self._lock, self.anchor.locked(BUSY_TIMEOUT_MS / 1000):
            head = self._read_head()
            row = self._conn.execute(
                "SELECT chain FROM readings WHERE seq = ?", (report.last_seq,)
            ).fetchone()
            at = GENESIS if report.last_seq == 0 else (row[0] if row is not None else None)
            if head.version != report.head_version or at != report.head_chain:
                raise StoreError(f"{self.db_path}: the chain changed during the check; try again")
            keys = self._chain_keys(head.version)
            self.anchor.replace(self._anchor_record(keys, report.last_seq, report.head_chain))
            # ingest stored rows since the check: anchor the newest head too, so that a
            # rollback below it still shows
            if head.seq > report.last_seq:
                self.anchor.append(self._anchor_record(keys, head.seq, head.chain))
        return report, before

    def check_head(self) -> int:
        """The last row of the store after checking, cheaply, what a scan of rows cannot
        see: the head's MAC, that the head is the last row, and the anchor outside the
        database (no rollback). Raises :class:`StoreError` naming the problem. With a scan
        that checks every row's link (``check_chain=True``) from row 1 up to this row, it
        covers what :meth:`verify` does."""
        records = self.anchor.records()  # first: see ChainScan
        with self._lock:
            self.keyring.refresh()
            self._conn.execute("BEGIN")
            try:
                head = _head_of(self._conn)
                last = self._conn.execute(
                    "SELECT seq, chain FROM readings ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                version = head.version if head is not None else None
                best = best_anchor(records or [], self.keyring, version)
                at = None
                if best is not None:
                    row = self._conn.execute(
                        "SELECT chain FROM readings WHERE seq = ?", (best.seq,)
                    ).fetchone()
                    at = GENESIS if best.seq == 0 else (row[0] if row is not None else None)
            finally:
                self._conn.execute("COMMIT")
        last_seq, last_chain = (int(last[0]), last[1]) if last is not None else (0, GENESIS)
        keys = self._chain_keys(version) if version is not None else None
        problems = head_problems(head, keys, last_seq, last_chain) + anchor_problems(
            self.anchor, records, best, version, last_seq, at
        )
        if problems:
            raise StoreError(
                f"{self.db_path}: {describe_problem(problems[0])}; run 'pacegate hospital verify'"
            )
        return last_seq

    def _under_newest(self, seq: int, token: bytes) -> bytes | None:
        """None when ``token`` already decrypts under the newest key alone; else the same
        plaintext re-encrypted under it. Raises :class:`StoreError` naming the row when no
        key of the keyring decrypts it (then nothing may be retired)."""
        if self.keyring.decrypts_under_newest(token):
            return None
        try:
            return self.keyring.reencrypt(token)
        except InvalidToken:
            raise StoreError(
                f"{self.db_path}: row {seq} does not decrypt under any key of "
                f"{self.keyring.path}; nothing retired. Run 'pacegate hospital verify'"
            ) from None

    def verify(
        self, batch_size: int = DEFAULT_ITER_BATCH, *, expect: RecordedHead | None = None
    ) -> VerifyReport:
        """Walk the chain over one consistent snapshot and report every break."""
        scan = self.scan(batch_size, expect=expect)
        for _ in scan:
            pass
        return scan.report

    def scan(
        self, batch_size: int = DEFAULT_ITER_BATCH, *, expect: RecordedHead | None = None
    ) -> ChainScan:
        """Every row in arrival order, each checked against the chain, over one read
        snapshot of its own (ingest may go on meanwhile; the scan does not see it).
        Iterate it for batches of :class:`CheckedRow`; once exhausted, ``scan.report``
        is what :meth:`verify` returns."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        return ChainScan(self, batch_size, expect)

    def checkpoint(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _has_readings(db_path: Path) -> bool:
    if not db_path.exists():
        return False
    try:
        with contextlib.closing(open_database(db_path, mode="ro")) as conn:
            row = conn.execute("SELECT count(*) FROM readings").fetchone()
    except sqlite3.DatabaseError:
        return db_path.stat().st_size > 0
    return bool(row[0])


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, SECRET_FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"another 'rotate-key' holds {lock_path}; wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)


def open_store(cfg: HospitalConfig) -> ReadingStore:
    """The store that hospital.yaml's ``store:`` section names (``backend: sqlite``, the
    default, or ``postgresql``), with its keyring and anchor: what the service, analytics,
    verify, rotate-key and export open."""
    if cfg.postgres is not None:
        # imported here: psycopg is loaded only by nodes that use it (and pgstore imports
        # this module)
        from hospital.pgstore import PostgresReadingStore

        return PostgresReadingStore.open(
            cfg.postgres.read_dsn(), cfg.keyring, cfg.postgres.writer, cfg.anchor
        )
    return SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring, cfg.anchor)


def _conforms(store: SqliteReadingStore) -> ReadingStore:
    return store  # mypy checks here that the whole ReadingStore protocol is implemented
