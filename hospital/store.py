"""The hospital's reading store: one Fernet token per reading in SQLite (WAL), idempotent on
(device, counter), hash-chained so that deleting or reordering rows is detectable.

What a row holds (everything else is inside the token; see docs/hospital.md)::

    seq          INTEGER PRIMARY KEY  arrival order, 1, 2, 3, ... without gaps
    row_key      BLOB UNIQUE          HMAC(row-key, device_id || counter): the idempotence key
    key_version  INTEGER              which Fernet key encrypted the token (drives rotation)
    token        BLOB                 Fernet(newest key, padded JSON of the reading + metadata)
    chain        BLOB                 HMAC(chain-key, prev chain || seq || row_key || SHA-256(pt))

The chain head (last seq, last chain, and a MAC over both) lives in the ``meta`` table, so a
removed tail is detected too. Re-encryption (``rotate-key``) changes ``token`` and
``key_version`` only; the plaintext, hence the chain, is unchanged.

Storage sits behind :class:`ReadingStore` so that a PostgreSQL backend can take over.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from hospital.keyring import InvalidToken, Keyring
from pacegate.errors import ConfigError, PacegateError
from pacegate.ingest import IngestItem
from pacegate.layout import SECRET_DIR_MODE, SECRET_FILE_MODE
from pacegate.reading import Reading

SCHEMA_VERSION = 1
GENESIS = bytes(32)
# Plaintext is padded to a multiple of this, so token length does not reveal the length of
# a device id or of a timestamp's fraction. 256 covers every device id (<= 64 characters).
PLAINTEXT_BLOCK = 256
# Rows re-encrypted per transaction during rotation: short transactions let ingest
# interleave, so rotation never stalls it for long.
ROTATE_BATCH = 200
DEFAULT_ITER_BATCH = 1000
# How long a writer waits for the other writer (ingest vs rotate-key) before failing.
BUSY_TIMEOUT_MS = 30_000

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


@dataclass(frozen=True, slots=True)
class StoredReading:
    """A reading as stored: the reading plus who sent it and its flags."""

    device_id: str
    counter: int
    flags: int
    reading: Reading


@dataclass(frozen=True, slots=True)
class StoreResult:
    stored: int
    duplicates: int
    # duplicates whose content differs from the stored reading (a subset of duplicates):
    # the same (device, counter) carrying another reading is a forgery or a device bug
    conflicts: int = 0


class ReadingStore(Protocol):
    """What ingest and analytics need from storage; SQLite today, PostgreSQL tomorrow."""

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

    def close(self) -> None: ...


# -- the plaintext inside a token -------------------------------------------------------
def encode_plaintext(item: IngestItem) -> bytes:
    body = json.dumps(
        {
            "v": 1,
            "device_id": item.device_id,
            "counter": item.counter,
            "flags": item.flags,
            "reading": item.reading.to_json(),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    padded = -(-len(body) // PLAINTEXT_BLOCK) * PLAINTEXT_BLOCK
    return body + b" " * (padded - len(body))  # JSON ignores trailing whitespace


def decode_plaintext(plaintext: bytes) -> StoredReading:
    obj: Any = json.loads(plaintext)
    return StoredReading(
        device_id=str(obj["device_id"]),
        counter=int(obj["counter"]),
        flags=int(obj["flags"]),
        reading=Reading.from_json(obj["reading"]),
    )


# -- reports ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyProblem:
    seq: int | None
    kind: str  # missing_rows | undecryptable | row_key_mismatch | chain_mismatch | head_mismatch
    detail: str


@dataclass
class VerifyReport:
    rows: int = 0
    last_seq: int = 0
    head_chain: bytes = GENESIS
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "last_seq": self.last_seq,
            "head_chain": self.head_chain.hex(),
            "problems": [{"seq": p.seq, "kind": p.kind, "detail": p.detail} for p in self.problems],
        }


@dataclass(frozen=True)
class RotationReport:
    new_version: int
    reencrypted: int
    retired: list[int]


# -- the SQLite store -------------------------------------------------------------------------
class SqliteReadingStore:
    """The embedded :class:`ReadingStore`. Thread-safe (one connection behind a lock)."""

    def __init__(self, db_path: Path, keyring: Keyring) -> None:
        self.db_path = db_path
        self.keyring = keyring
        self._lock = threading.Lock()
        db_path.parent.mkdir(parents=True, exist_ok=True, mode=SECRET_DIR_MODE)
        if not db_path.exists():
            # SQLite gives -wal and -shm the database file's mode: make it 0600 first
            os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT, SECRET_FILE_MODE))
        self._conn = sqlite3.connect(
            db_path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        from pacegate.dbcheck import check_integrity

        try:
            self._configure()
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            check_integrity(db_path)  # a damaged file is named as corruption, not as "error"
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
    def open(cls, db_path: Path, keyring_path: Path) -> SqliteReadingStore:
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
        return cls(db_path, keyring)

    def _configure(self) -> None:
        c = self._conn
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.db_path}: SQLite refused WAL mode ({mode})")
        # FULL: the WAL is fsynced at every commit, so an ACK means the batch survives a
        # power cut (NORMAL could lose the last transactions).
        c.execute("PRAGMA synchronous=FULL")
        # Overwrite freed content, so tokens under a retired key do not linger in free pages.
        c.execute("PRAGMA secure_delete=ON")
        c.execute("PRAGMA temp_store=MEMORY")
        c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _init_schema(self) -> None:
        fingerprint = self.keyring.fingerprint()
        with self._write():
            for statement in _SCHEMA:
                self._conn.execute(statement)
            meta = dict(self._conn.execute("SELECT name, value FROM meta").fetchall())
            if "schema_version" not in meta:
                self._set_meta("schema_version", SCHEMA_VERSION.to_bytes(4, "big"))
                self._set_meta("keyring", fingerprint)
                self._write_head(0, GENESIS)
                return
        if int.from_bytes(meta["schema_version"], "big") != SCHEMA_VERSION:
            raise StoreError(f"{self.db_path}: unsupported schema version")
        if meta.get("keyring") != fingerprint:
            raise ConfigError(
                self.keyring.path,
                "mac_key",
                f"this keyring does not belong to the database {self.db_path}",
                fix="point 'store.keyring' at the keyring created with this database",
            )

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

    def _read_head(self) -> tuple[int, bytes, bytes]:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'head'").fetchone()
        if row is None or len(row[0]) != 8 + 32 + 32:
            raise StoreError(f"{self.db_path}: the chain head is missing or damaged (run verify)")
        raw: bytes = row[0]
        return int.from_bytes(raw[:8], "big"), raw[8:40], raw[40:]

    def _write_head(self, seq: int, chain: bytes) -> None:
        mac = self.keyring.head_mac(seq, chain)
        self._set_meta("head", seq.to_bytes(8, "big") + chain + mac)

    # -- ingest ---------------------------------------------------------------------------------
    def store_batch(self, items: Sequence[IngestItem]) -> StoreResult:
        if not items:
            return StoreResult(0, 0)
        with self._lock:
            self.keyring.refresh()
            prepared = [self._prepare(item) for item in items]
            version = self.keyring.current_version
            stored = duplicates = conflicts = 0
            with self._write():
                # rotate-key may have replaced the keyring while we encrypted: with the write
                # lock held, make sure no row lands under a key older than the newest
                if self.keyring.refresh() and self.keyring.current_version != version:
                    version = self.keyring.current_version
                    prepared = [(rk, pt, self.keyring.encrypt(pt)) for rk, pt, _ in prepared]
                seq, chain, _ = self._read_head()
                for row_key, plaintext, token in prepared:
                    link = self.keyring.chain_link(chain, seq + 1, row_key, plaintext)
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
                    self._write_head(seq, chain)
            return StoreResult(stored, duplicates, conflicts)

    def _prepare(self, item: IngestItem) -> tuple[bytes, bytes, bytes]:
        plaintext = encode_plaintext(item)
        return (
            self.keyring.row_key(item.device_id, item.counter),
            plaintext,
            self.keyring.encrypt(plaintext),
        )

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
            for seq, plaintext in page:
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
    ) -> Iterator[tuple[list[int], list[int]]]:
        """``(ages, heart_rates)`` of the same rows as :meth:`iter_readings`, per batch of
        rows, for analytics: the JSON of a whole batch is parsed in one call and no
        :class:`Reading` is built, which makes a scan ~25 % cheaper. Timestamps are parsed
        only when ``since``/``until`` filter. A row that does not decrypt or parse raises
        :class:`StoreError` naming it, as in :meth:`iter_records`."""
        for page in self._plaintext_pages(since, until, batch_size, seq_range):
            plaintexts = [plaintext for _, plaintext in page]
            try:
                objs = json.loads(b"[" + b",".join(plaintexts) + b"]")
                readings = [o["reading"] for o in objs]
                ages = [int(r["age"]) for r in readings]
                rates = [int(r["heart_rate_bpm"]) for r in readings]
                if since is not None or until is not None:
                    keep = [_in_period(r["timestamp"], since, until) for r in readings]
                    ages = [a for a, k in zip(ages, keep, strict=True) if k]
                    rates = [h for h, k in zip(rates, keep, strict=True) if k]
            except (ValueError, KeyError, TypeError):
                for seq, plaintext in page:
                    try:  # find the culprit, and say which row it is
                        decode_plaintext(plaintext)
                    except (ValueError, KeyError, TypeError) as exc:
                        raise self._undecryptable(seq, type(exc).__name__) from None
                raise
            if ages:
                yield ages, rates

    def _plaintext_pages(
        self,
        since: datetime | None,
        until: datetime | None,
        batch_size: int,
        seq_range: tuple[int, int] | None,
    ) -> Iterator[list[tuple[int, bytes]]]:
        """``(seq, plaintext)`` of the rows ``seq_range`` selects (all when None), in arrival
        order, one list per query of ``batch_size`` rows; the lock is held per query only.
        Checks the arguments both public scans share (``since``/``until`` only for a
        timezone: the callers filter). A token that does not decrypt raises
        :class:`StoreError` naming its row."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        for bound in (since, until):
            if bound is not None and bound.tzinfo is None:
                raise ValueError("since/until must be timezone-aware")
        lo, stop = seq_range if seq_range is not None else (1, None)
        last = max(lo - 1, 0)
        while True:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT seq, token FROM readings WHERE seq > ? AND seq < ? "
                    "ORDER BY seq LIMIT ?",
                    (last, stop if stop is not None else 2**63 - 1, batch_size),
                ).fetchall()
                self.keyring.refresh()
            if not rows:
                return
            last = rows[-1][0]
            page = []
            for seq, token in rows:
                try:
                    page.append((seq, self.keyring.decrypt(token)))
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
        self, *, batch_size: int = ROTATE_BATCH, retire_old: bool = True
    ) -> RotationReport:
        """Add a Fernet key, re-encrypt every row under it in short transactions while
        ingest continues, then (``retire_old``) drop the older keys from the keyring."""
        with _exclusive(self.keyring.path.with_name(self.keyring.path.name + ".lock")):
            with self._lock:
                self.keyring.refresh()
                new_version = self.keyring.add_key()
                self.keyring.save()  # from here on, a running service encrypts under it
            reencrypted, last = 0, 0
            while True:
                with self._lock, self._write():
                    rows = self._conn.execute(
                        "SELECT seq, token FROM readings WHERE seq > ? AND key_version < ? "
                        "ORDER BY seq LIMIT ?",
                        (last, new_version, batch_size),
                    ).fetchall()
                    for seq, token in rows:
                        try:
                            fresh = self.keyring.reencrypt(token)
                        except InvalidToken:
                            raise StoreError(
                                f"{self.db_path}: row {seq} does not decrypt under any key of "
                                f"{self.keyring.path}; nothing retired. Run "
                                "'pacegate hospital verify'"
                            ) from None
                        self._conn.execute(
                            "UPDATE readings SET token = ?, key_version = ? WHERE seq = ?",
                            (fresh, new_version, seq),
                        )
                if not rows:
                    break
                reencrypted += len(rows)
                last = rows[-1][0]
            retired: list[int] = []
            with self._lock, self._write():
                stale = self._conn.execute(
                    "SELECT count(*) FROM readings WHERE key_version < ?", (new_version,)
                ).fetchone()[0]
                if stale:
                    raise StoreError(f"{stale} rows still under an older key; nothing retired")
                if retire_old:
                    retired = self.keyring.retire_older_than(new_version)
                    self.keyring.save()
            with self._lock:
                # old tokens still sit in the WAL until it is checkpointed and truncated
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return RotationReport(new_version, reencrypted, retired)

    def verify(self, batch_size: int = DEFAULT_ITER_BATCH) -> VerifyReport:
        """Walk the chain over one consistent snapshot and report every break."""
        report = VerifyReport()
        kr = self.keyring
        with self._lock:
            kr.refresh()
            self._conn.execute("BEGIN")  # one read snapshot: ingest may go on meanwhile
            try:
                cur = self._conn.execute(
                    "SELECT seq, row_key, token, chain FROM readings ORDER BY seq"
                )
                prev_seq, prev_chain = 0, GENESIS
                while rows := cur.fetchmany(batch_size):
                    for seq, row_key, token, chain in rows:
                        report.rows += 1
                        self._verify_row(report, prev_seq, prev_chain, seq, row_key, token, chain)
                        prev_seq, prev_chain = seq, chain
                head_seq, head_chain, head_mac = self._read_head()
            finally:
                self._conn.execute("COMMIT")
        report.last_seq, report.head_chain = prev_seq, prev_chain
        if head_mac != kr.head_mac(head_seq, head_chain):
            report.problems.append(
                VerifyProblem(None, "head_mismatch", "the chain head was altered")
            )
        elif (head_seq, head_chain) != (prev_seq, prev_chain):
            report.problems.append(
                VerifyProblem(
                    head_seq,
                    "head_mismatch",
                    f"the head names row {head_seq} but the last row is {prev_seq}: "
                    "rows were removed from the end, or the chain rewritten",
                )
            )
        return report

    def _verify_row(
        self,
        report: VerifyReport,
        prev_seq: int,
        prev_chain: bytes,
        seq: int,
        row_key: bytes,
        token: bytes,
        chain: bytes,
    ) -> None:
        problems = report.problems
        if seq != prev_seq + 1:
            span = (
                f"row {prev_seq + 1}" if seq == prev_seq + 2 else f"rows {prev_seq + 1}-{seq - 1}"
            )
            problems.append(VerifyProblem(seq, "missing_rows", f"{span} deleted"))
        try:
            plaintext = self.keyring.decrypt(token)
            record = decode_plaintext(plaintext)
        except (InvalidToken, ValueError, KeyError, TypeError):
            problems.append(
                VerifyProblem(seq, "undecryptable", "token altered, or its key is not held")
            )
            return
        if self.keyring.row_key(record.device_id, record.counter) != row_key:
            problems.append(
                VerifyProblem(seq, "row_key_mismatch", "token moved here from another row")
            )
        if self.keyring.chain_link(prev_chain, seq, row_key, plaintext) != chain:
            problems.append(
                VerifyProblem(
                    seq,
                    "chain_mismatch",
                    "this row or its predecessor was modified, reordered or deleted",
                )
            )

    def checkpoint(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteReadingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_period(timestamp: str, since: datetime | None, until: datetime | None) -> bool:
    ts = datetime.fromisoformat(timestamp)
    if ts.tzinfo is None:  # as Reading.from_json
        ts = ts.replace(tzinfo=UTC)
    return (since is None or ts >= since) and (until is None or ts < until)


def _has_readings(db_path: Path) -> bool:
    if not db_path.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
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


# -- command line ---------------------------------------------------------------------------------
def open_from_config(config_path: Path) -> SqliteReadingStore:
    from hospital.config import load_hospital_config

    cfg = load_hospital_config(config_path)
    return SqliteReadingStore.open(cfg.database, cfg.keyring)


def cli_rotate_key(args: argparse.Namespace) -> int:
    """``pacegate hospital rotate-key -c FILE``: new key, every row re-encrypted, online."""
    with open_from_config(args.config) as store:
        report = store.rotate_key(retire_old=not getattr(args, "keep_old", False))
    retired = ", ".join(map(str, report.retired)) or "none"
    print(
        f"rotate-key: key version {report.new_version} now encrypts; "
        f"{report.reencrypted} rows re-encrypted; retired versions: {retired}",
        file=sys.stderr,
    )
    return 0


def cli_verify(args: argparse.Namespace) -> int:
    """``pacegate hospital verify -c FILE``: exit 0 if the chain is whole, 1 otherwise."""
    with open_from_config(args.config) as store:
        report = store.verify()
    if getattr(args, "json", False):
        print(json.dumps(report.to_json()))
    else:
        print(format_report(report, store.db_path), file=sys.stderr)
    return 0 if report.ok else 1


def format_report(report: VerifyReport, db_path: Path) -> str:
    if report.ok:
        return (
            f"verify: OK: {report.rows} rows in {db_path}, chain whole up to row "
            f"{report.last_seq}; head {report.head_chain.hex()} (record it elsewhere to detect "
            "a rollback of the whole database)"
        )
    lines = [f"verify: FAILED: {len(report.problems)} problem(s) in {db_path}:"]
    for p in report.problems:
        where = f"row {p.seq}" if p.seq is not None else "head"
        lines.append(f"  {where}: {p.kind}: {p.detail}")
    lines.append(
        "The store was altered outside pacegate: restore it from a backup and compare; "
        "do not trust readings near the reported rows."
    )
    return "\n".join(lines)
