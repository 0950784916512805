"""The hospital's reading store in PostgreSQL, for several ingest nodes writing one database.

The same rows as :mod:`hospital.store` (a Fernet token per reading, the same plaintext codec,
the same row key for idempotence on (device, counter)), with one change that concurrent
writers need: **one hash chain per writer**. Each ingest node has a writer id; it links only
its own rows, and keeps its own head::

    readings(seq       BIGINT identity   arrival order across writers (gaps allowed)
             writer    TEXT              the ingest node that stored the row
             wseq      BIGINT            1, 2, 3, ... without gaps within the writer
             row_key   BYTEA UNIQUE      HMAC(row-key, device_id || counter)
             key_version, token          as in SQLite
             chain     BYTEA)            HMAC(chain-key, prev || wseq || row_key || SHA-256(pt))
    heads(writer PRIMARY KEY, head)      the writer's head, as SQLite's (version, wseq, chain, MAC)

A writer's chain starts from a genesis value bound to its id, so a row (or a whole chain)
moved to another writer does not verify. Writers take their own head row ``FOR UPDATE``:
writers never wait for each other except on the same row key, and a misconfigured pair of
nodes sharing one writer id is serialised, not corrupted. Why this design, and what it does
not catch, is in docs/scaling.md.

A node may anchor its own writer's head in a local file (``anchor_path``,
:class:`hospital.anchor.HeadAnchor`), as the SQLite store does: then a rollback of that
writer's rows, or the removal of its whole chain, is detected by ``verify`` on that node.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from hospital.anchor import AnchorRecord, HeadAnchor
from hospital.chain import (
    ANCHOR_PROBLEMS,
    GENESIS,
    CheckedRow,
    Head,
    RecordedHead,
    VerifyProblem,
    VerifyReport,
    anchor_problems,
    best_anchor,
    describe_problem,
    head_problems,
    recorded_problems,
    row_problems,
)
from hospital.config import WRITER_ID
from hospital.keyring import ChainKeys, InvalidToken, Keyring
from hospital.rowcodec import decode_plaintext, encode_plaintext
from hospital.store import (
    DEFAULT_ITER_BATCH,
    ROTATE_BATCH,
    ChainChecker,
    PlaintextScans,
    ReadingStore,
    RotationReport,
    StoreError,
    StoreResult,
    check_scan_arguments,
)
from pacegate.errors import ConfigError
from pacegate.ingest import IngestItem
from pacegate.layout import SECRET_DIR_MODE

SCHEMA_VERSION = 1
# A batch whose row keys another writer inserted between our duplicate check and our insert
# is retried from the start (it then sees those rows as duplicates). Each retry means another
# writer committed overlapping readings, so a handful always ends it.
MAX_BATCH_ATTEMPTS = 8
# How long a writer waits for a lock (another writer's same row key, rotate-key's final
# check) before the batch fails without an ACK and the gateway sends it again.
LOCK_TIMEOUT_MS = 30_000
# Initialising the schema takes this transaction-level advisory lock, so that nodes started
# together do not race on CREATE TABLE.
_SCHEMA_LOCK = 0x70616365  # "pace"

log = logging.getLogger("pacegate.hospital.pgstore")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS readings ("
    " seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " writer TEXT NOT NULL,"
    " wseq BIGINT NOT NULL,"
    " row_key BYTEA NOT NULL UNIQUE,"
    " key_version INTEGER NOT NULL,"
    " token BYTEA NOT NULL,"
    " chain BYTEA NOT NULL,"
    " UNIQUE (writer, wseq))",
    "CREATE TABLE IF NOT EXISTS heads (writer TEXT PRIMARY KEY, head BYTEA NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BYTEA NOT NULL)",
)


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    parts.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def writer_genesis(keys: ChainKeys, writer: str) -> bytes:
    """Where ``writer``'s chain starts: bound to the writer id, so that a chain relabelled
    to another writer breaks at its first row."""
    return keys.chain_link(GENESIS, 0, b"pacegate-writer:" + writer.encode(), b"")


def _decode_head(raw: object) -> Head | None:
    if not isinstance(raw, bytes) or len(raw) != 4 + 8 + 32 + 32:
        return None
    return Head(
        int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:12], "big"), raw[12:44], raw[44:]
    )


class _Raced(Exception):
    """Another writer committed one of this batch's row keys after we looked: start over."""


@dataclass
class PgVerifyReport(VerifyReport):
    """:class:`VerifyReport` plus every writer's head. ``last_seq``/``head_chain``/
    ``head_token`` are those of the store's own writer (what its anchor and a recorded head
    are compared with); ``writers`` holds each writer's ``VERSION:WSEQ:CHAIN``."""

    writers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["writers"] = dict(sorted(self.writers.items()))
        return out


class PostgresChainScan:
    """Every row, writer by writer in chain order, decrypted and checked, in one
    REPEATABLE READ snapshot on a connection of its own. Runs once; ``report`` is complete
    when the iteration ends."""

    def __init__(
        self, store: PostgresReadingStore, batch_size: int, expect: RecordedHead | None
    ) -> None:
        self._store = store
        self._batch_size = batch_size
        self._expect = expect
        self._started = False
        self.report = PgVerifyReport()

    def __iter__(self) -> Iterator[list[CheckedRow]]:
        if self._started:
            raise RuntimeError("a chain scan runs once")
        self._started = True
        store, report = self._store, self.report
        with store._lock:
            store.keyring.refresh()
        kr = store.keyring
        # the anchor first, the snapshot second (see hospital.store.ChainScan)
        records = store.anchor.records() if store.anchor is not None else None
        with store._connect() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            version = kr.mac_version_of(bytes(meta.get("keyring", b"")))
            keys = kr.integrity(version) if version is not None else None
            if keys is None:
                report.problems.append(
                    VerifyProblem(
                        None,
                        "unknown_integrity_key",
                        "the keyring holds none of this database's integrity keys: rows "
                        "cannot be checked against the chain",
                    )
                )
            heads = {
                w: _decode_head(bytes(h)) for w, h in conn.execute("SELECT writer, head FROM heads")
            }
            writers = sorted(
                set(heads)
                | {w for (w,) in conn.execute("SELECT DISTINCT writer FROM readings")}
                | {store.writer}
            )
            own_best = own_chain_at_anchor = None
            chain_at_expect: bytes | None = None
            for writer in writers:
                genesis = writer_genesis(keys, writer) if keys is not None else GENESIS
                prev_wseq, prev_chain = 0, genesis
                own = writer == store.writer
                best = best_anchor(records or [], kr, version) if own else None
                anchor_wseq = best.seq if best is not None else -1
                chain_at_anchor = genesis if anchor_wseq == 0 else None
                expect_wseq = self._expect.seq if own and self._expect is not None else -1
                if expect_wseq == 0:
                    chain_at_expect = genesis
                cur = conn.cursor(name=f"scan_{len(writer)}_{abs(hash(writer))}")
                cur.execute(
                    "SELECT seq, wseq, row_key, token, chain FROM readings WHERE writer = %s "
                    "ORDER BY wseq",
                    (writer,),
                    binary=True,
                )
                while rows := cur.fetchmany(self._batch_size):
                    out = []
                    for seq, wseq, row_key, token, chain in rows:
                        row_key, token, chain = bytes(row_key), bytes(token), bytes(chain)
                        out.append(
                            self._row(
                                keys,
                                writer,
                                prev_wseq,
                                prev_chain,
                                seq,
                                wseq,
                                row_key,
                                token,
                                chain,
                            )
                        )
                        prev_wseq, prev_chain = wseq, chain
                        if wseq == anchor_wseq:
                            chain_at_anchor = chain
                        if wseq == expect_wseq:
                            chain_at_expect = chain
                    report.rows += len(rows)
                    yield out
                cur.close()
                head = heads.get(writer)
                if head is None and (prev_wseq > 0 or writer in heads):
                    report.problems.append(
                        VerifyProblem(
                            None,
                            "head_mismatch",
                            f"writer {writer}: the chain head is missing or damaged",
                        )
                    )
                elif head is not None:
                    if keys is not None and head.version != keys.version:
                        report.problems.append(
                            VerifyProblem(
                                None,
                                "head_mismatch",
                                f"writer {writer}: the head is under integrity key "
                                f"{head.version}, the database under {keys.version}",
                            )
                        )
                    else:
                        report.problems += [
                            dataclasses.replace(p, detail=f"writer {writer}: {p.detail}")
                            for p in head_problems(head, keys, prev_wseq, prev_chain)
                        ]
                    report.writers[writer] = f"{head.version}:{head.seq}:{head.chain.hex()}"
                if own:
                    report.last_seq, report.head_chain = prev_wseq, prev_chain
                    own_best, own_chain_at_anchor = best, chain_at_anchor
            conn.execute("COMMIT")
        report.head_version = version or 0
        if store.anchor is not None:
            report.problems += anchor_problems(
                store.anchor, records, own_best, version, report.last_seq, own_chain_at_anchor
            )
        if self._expect is not None:
            report.problems += recorded_problems(
                self._expect, version, report.last_seq, chain_at_expect
            )

    def _row(
        self,
        keys: ChainKeys | None,
        writer: str,
        prev_wseq: int,
        prev_chain: bytes,
        seq: int,
        wseq: int,
        row_key: bytes,
        token: bytes,
        chain: bytes,
    ) -> CheckedRow:
        problems = []
        if wseq != prev_wseq + 1:
            span = (
                f"row {prev_wseq + 1}"
                if wseq == prev_wseq + 2
                else f"rows {prev_wseq + 1}-{wseq - 1}"
            )
            problems.append(VerifyProblem(seq, "missing_rows", f"writer {writer}: {span} deleted"))
        try:
            plaintext = self._store.keyring.decrypt(token)
            record = decode_plaintext(plaintext)
        except (InvalidToken, ValueError, KeyError, TypeError):
            problems.append(
                VerifyProblem(
                    seq, "undecryptable", f"writer {writer}: token altered, or its key is not held"
                )
            )
            self.report.problems += problems
            return CheckedRow(seq, None, tuple(problems))
        if keys is not None:
            problems += [
                dataclasses.replace(p, seq=seq, detail=f"writer {writer} row {wseq}: {p.detail}")
                for p in row_problems(keys, prev_chain, wseq, row_key, chain, plaintext, record)
            ]
        self.report.problems += problems
        return CheckedRow(seq, record, tuple(problems))


class _PgChainCursor:
    """Checks the rows of a seq-ordered scan against their writers' chains, each writer
    from its row before the first one seen (``iter_reading_values(check_chain=True)``)."""

    def __init__(self, store: PostgresReadingStore) -> None:
        self._store = store
        self._keys = store._chain_keys(store._db_mac_version())
        self._at: dict[str, tuple[int, bytes]] = {}

    def check(self, page: list[tuple[int, bytes, bytes, bytes, str, int]], objs: list[Any]) -> None:
        keys = self._keys
        for (seq, plaintext, row_key, chain, writer, wseq), obj in zip(page, objs, strict=True):
            at = self._at.get(writer)
            if at is None:
                at = self._before(writer, wseq, seq)
            if wseq != at[0] + 1:
                raise self._damaged(
                    VerifyProblem(
                        seq, "missing_rows", f"writer {writer}: rows {at[0] + 1}-{wseq - 1} deleted"
                    )
                )
            if keys.row_key(str(obj["device_id"]), int(obj["counter"])) != row_key:
                raise self._damaged(
                    VerifyProblem(seq, "row_key_mismatch", "token moved here from another row")
                )
            if keys.chain_link(at[1], wseq, row_key, plaintext) != chain:
                raise self._damaged(
                    VerifyProblem(
                        seq, "chain_mismatch", "this row or its predecessor was modified or moved"
                    )
                )
            self._at[writer] = (wseq, chain)

    def _before(self, writer: str, wseq: int, seq: int) -> tuple[int, bytes]:
        if wseq <= 1:
            return 0, writer_genesis(self._keys, writer)
        store = self._store
        with store._lock:
            row = store._conn.execute(
                "SELECT chain FROM readings WHERE writer = %s AND wseq = %s", (writer, wseq - 1)
            ).fetchone()
        if row is None:
            raise self._damaged(
                VerifyProblem(seq, "missing_rows", f"writer {writer}: row {wseq - 1} deleted")
            )
        return wseq - 1, bytes(row[0])

    def _damaged(self, problem: VerifyProblem) -> StoreError:
        return StoreError(
            f"{self._store.name}: {describe_problem(problem)}: the chain does not verify; "
            "run 'pacegate hospital verify'"
        )


class PostgresReadingStore(PlaintextScans):
    """The :class:`hospital.store.ReadingStore` of several ingest nodes writing one
    PostgreSQL database; each node opens it with its own ``writer`` id. Thread-safe (one
    connection behind a lock; scans use connections of their own)."""

    def __init__(
        self, dsn: str, keyring: Keyring, writer: str, anchor_path: Path | None = None
    ) -> None:
        if not WRITER_ID.fullmatch(writer):
            raise ConfigError(
                None,
                "store.writer",
                f"{writer!r} is not a writer id",
                fix="1-64 characters of letters, digits, '.', '_' or '-', one per ingest node",
            )
        self.dsn = dsn
        self.name = f"PostgreSQL ({redact_dsn(dsn)})"
        self.keyring = keyring
        self.writer = writer
        self.anchor = HeadAnchor(anchor_path) if anchor_path is not None else None
        self._lock = threading.Lock()
        self._anchored: tuple[int, bytes] | None = None
        self._head_version = 0  # the integrity-key version of the last head we wrote
        self._conn: psycopg.Connection[Any] = self._connect()
        try:
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    @classmethod
    def open(
        cls, dsn: str, keyring_path: Path, writer: str, anchor_path: Path | None = None
    ) -> PostgresReadingStore:
        """Open the database with its keyring; a new keyring is made only for a new store."""
        if keyring_path.exists():
            keyring = Keyring.load(keyring_path)
        else:
            with psycopg.connect(dsn, autocommit=True) as conn:
                exists = conn.execute("SELECT to_regclass('readings') IS NOT NULL").fetchone()
                has = exists
                if exists is not None and exists[0]:
                    has = conn.execute("SELECT EXISTS (SELECT 1 FROM readings)").fetchone()
            if has is not None and has[0]:
                raise ConfigError(
                    keyring_path,
                    "",
                    f"keyring not found, but {redact_dsn(dsn)} holds readings",
                    fix="copy this database's keyring to the node (without it the readings "
                    "are lost)",
                )
            keyring = Keyring.create(keyring_path)
        return cls(dsn, keyring, writer, anchor_path)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self.dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"{self.name}: cannot connect: {str(exc).strip()}; check the DSN in "
                "'store.dsn_file' and that the server runs"
            ) from None
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        return conn

    def _init_schema(self) -> None:
        c = self._conn
        with c.transaction():
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                c.execute(statement)
            meta = dict(c.execute("SELECT name, value FROM meta").fetchall())
            if "schema_version" not in meta:
                keys = self.keyring.integrity(self.keyring.current_mac_version)
                self._set_meta("schema_version", SCHEMA_VERSION.to_bytes(4, "big"))
                self._set_meta("keyring", keys.fingerprint())
                version: int | None = keys.version
            else:
                if int.from_bytes(meta["schema_version"], "big") != SCHEMA_VERSION:
                    raise StoreError(f"{self.name}: unsupported schema version")
                version = self.keyring.mac_version_of(bytes(meta.get("keyring", b"")))
            if version is None:
                raise ConfigError(
                    self.keyring.path,
                    "mac_keys",
                    f"this keyring does not belong to the database {self.name}",
                    fix="point 'store.keyring' at a copy of the keyring this database was "
                    "created with",
                )
            keys = self.keyring.integrity(version)
            new_writer = c.execute(
                "INSERT INTO heads(writer, head) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (self.writer, self._head(keys, 0, writer_genesis(keys, self.writer)).encode()),
            ).rowcount
        # a new writer's anchor starts at its genesis; an existing writer whose anchor is
        # gone is left so: verify names it (anchor_missing), and only --reanchor accepts it
        if self.anchor is not None and new_writer:
            self.anchor.path.parent.mkdir(parents=True, exist_ok=True, mode=SECRET_DIR_MODE)
            with self.anchor.locked(LOCK_TIMEOUT_MS / 1000):
                self.anchor.replace(self._anchor_record(keys, 0, writer_genesis(keys, self.writer)))

    def _set_meta(self, name: str, value: bytes) -> None:
        self._conn.execute(
            "INSERT INTO meta(name, value) VALUES (%s, %s) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    @staticmethod
    def _head(keys: ChainKeys, wseq: int, chain: bytes) -> Head:
        return Head(keys.version, wseq, chain, keys.head_mac(wseq, chain))

    @staticmethod
    def _anchor_record(keys: ChainKeys, wseq: int, chain: bytes) -> AnchorRecord:
        return AnchorRecord(keys.version, wseq, chain, keys.anchor_mac(wseq, chain))

    def _chain_keys(self, version: int) -> ChainKeys:
        if not self.keyring.has_mac_version(version):
            self.keyring.refresh()
        return self.keyring.integrity(version)

    def _db_mac_version(self) -> int:
        with self._lock:
            return self._db_mac_version_locked()

    def _db_mac_version_locked(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'keyring'").fetchone()
        version = self.keyring.mac_version_of(bytes(row[0])) if row is not None else None
        if version is None:
            self.keyring.refresh()
            version = self.keyring.mac_version_of(bytes(row[0])) if row is not None else None
        if version is None:
            raise StoreError(f"{self.name}: the keyring holds no integrity key of this database")
        return version

    def _own_head(self) -> Head:
        """This writer's head, locked for the transaction; refuses to go on with a keyring
        older than the newest Fernet key any node's rotate-key recorded in the database."""
        row = self._conn.execute(
            "SELECT h.head, (SELECT value FROM meta WHERE name = 'fernet_version') "
            "FROM heads h WHERE h.writer = %s FOR UPDATE OF h",
            (self.writer,),
        ).fetchone()
        head = _decode_head(bytes(row[0])) if row is not None else None
        if row is None or head is None:
            raise StoreError(
                f"{self.name}: writer {self.writer}: the chain head is missing or damaged "
                "(run verify)"
            )
        wanted = int.from_bytes(bytes(row[1]), "big") if row[1] is not None else 0
        if self.keyring.current_version < wanted:
            self.keyring.refresh()
            if self.keyring.current_version < wanted:
                raise StoreError(
                    f"{self.name}: writer {self.writer}: the database's readings are under "
                    f"Fernet key version {wanted}, but {self.keyring.path} holds up to "
                    f"{self.keyring.current_version}: copy the rotated keyring to this node; "
                    "nothing stored (the gateway sends the batch again)"
                )
        return head

    # -- ingest ---------------------------------------------------------------------------------
    def store_batch(self, items: Sequence[IngestItem]) -> StoreResult:
        """Store ``items`` in one transaction on this writer's chain; returns once it is
        committed (and, with an anchor, the new head anchored): what the ACK promises.

        Within a batch, new rows are chained in row-key order: two writers inserting
        overlapping batches then meet the same keys in the same order and cannot deadlock."""
        if not items:
            return StoreResult(0, 0)
        with self._lock:
            self.keyring.refresh()
            # a reading twice in one batch: the first is the one stored
            first: dict[tuple[str, int], tuple[IngestItem, bytes, bytes]] = {}
            repeats: list[tuple[tuple[str, int], bytes]] = []
            for item in items:
                key = (item.device_id, item.counter)
                plaintext = encode_plaintext(item)
                if key in first:
                    repeats.append((key, plaintext))
                else:
                    first[key] = (item, plaintext, self.keyring.encrypt(plaintext))
            prepared = list(first.values())
            for _attempt in range(MAX_BATCH_ATTEMPTS):
                try:
                    result, head = self._store_once(prepared, repeats)
                except (_Raced, pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                    continue
                if self.anchor is not None and (result.stored or self._anchored != head):
                    keys = self._chain_keys(self._head_version)
                    with self.anchor.locked(LOCK_TIMEOUT_MS / 1000):
                        self.anchor.append(self._anchor_record(keys, *head))
                    self._anchored = head
                return result
            raise StoreError(
                f"{self.name}: writer {self.writer}: other writers kept committing this "
                f"batch's readings ({MAX_BATCH_ATTEMPTS} attempts); not acknowledged, the "
                "gateway sends it again"
            )

    def _store_once(
        self,
        prepared: list[tuple[IngestItem, bytes, bytes]],
        repeats: list[tuple[tuple[str, int], bytes]],
    ) -> tuple[StoreResult, tuple[int, bytes]]:
        c = self._conn
        with c.transaction():
            head = self._own_head()
            version = self.keyring.current_version
            # rotate-key may have replaced the keyring while we encrypted: with our head
            # locked, make sure no row lands under a key older than the newest
            if self.keyring.refresh() and self.keyring.current_version != version:
                version = self.keyring.current_version
                prepared[:] = [(i, pt, self.keyring.encrypt(pt)) for i, pt, _ in prepared]
            version = self.keyring.current_version
            keys = self._chain_keys(head.version)
            self._head_version = head.version
            keyed = [(keys.row_key(i.device_id, i.counter), i, pt, tok) for i, pt, tok in prepared]
            stored_tokens = dict(
                (bytes(k), bytes(t))
                for k, t in c.execute(
                    "SELECT row_key, token FROM readings WHERE row_key = ANY(%b)",
                    ([k for k, *_ in keyed],),
                )
            )
            new = sorted((r for r in keyed if r[0] not in stored_tokens), key=lambda r: r[0])
            wseq, chain = head.seq, head.chain
            rows = []
            for row_key, _item, plaintext, token in new:
                wseq += 1
                chain = keys.chain_link(chain, wseq, row_key, plaintext)
                rows.append((wseq, row_key, token, chain))
            if rows:
                # one round trip: the rows, and the head only if every row went in (%b: the
                # binary format, which spares escaping every byte of every token)
                done = c.execute(
                    "WITH ins AS ("
                    " INSERT INTO readings(writer, wseq, row_key, key_version, token, chain)"
                    " SELECT %s, w, k, %s, t, ch FROM unnest("
                    " %b::bigint[], %b::bytea[], %b::bytea[], %b::bytea[]) AS u(w, k, t, ch)"
                    " ORDER BY w ON CONFLICT (row_key) DO NOTHING RETURNING 1),"
                    " n AS (SELECT count(*) AS n FROM ins)"
                    " UPDATE heads SET head = %b FROM n WHERE writer = %s AND n.n = %s"
                    " RETURNING n.n",
                    (
                        self.writer,
                        version,
                        [r[0] for r in rows],
                        [r[1] for r in rows],
                        [r[2] for r in rows],
                        [r[3] for r in rows],
                        self._head(keys, wseq, chain).encode(),
                        self.writer,
                        len(rows),
                    ),
                ).fetchone()
                if done is None:
                    raise _Raced  # leaves the transaction: rolled back, nothing half-chained
            conflicts = 0
            plain_of = {(i.device_id, i.counter): pt for _, i, pt, _ in keyed}
            for row_key, _item, plaintext, _ in keyed:
                if row_key in stored_tokens and not self._same(stored_tokens[row_key], plaintext):
                    conflicts += 1
            for key, plaintext in repeats:
                if plaintext != plain_of[key]:
                    conflicts += 1
            duplicates = len(keyed) - len(new) + len(repeats)
        return StoreResult(len(new), duplicates, conflicts), (wseq, chain)

    def _same(self, token: bytes, plaintext: bytes) -> bool:
        try:
            return self.keyring.decrypt(token) == plaintext
        except InvalidToken:
            return False

    # -- reading --------------------------------------------------------------------------------
    def count(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT count(*) FROM readings").fetchone()
        return int(row[0]) if row is not None else 0

    def seq_bounds(self) -> tuple[int, int]:
        """``(first, last)`` row sequence numbers, ``(0, 0)`` when empty. Across writers
        ``seq`` has gaps (a rolled-back batch consumes numbers), so ranges are bounds, not
        counts."""
        with self._lock:
            row = self._conn.execute("SELECT min(seq), max(seq) FROM readings").fetchone()
        return (int(row[0]), int(row[1])) if row is not None and row[0] is not None else (0, 0)

    def _plaintext_pages(
        self,
        since: datetime | None,
        until: datetime | None,
        batch_size: int,
        seq_range: tuple[int, int] | None,
    ) -> Iterator[list[tuple[int, bytes, bytes, bytes, str, int]]]:
        """``(seq, plaintext, row_key, chain, writer, wseq)`` in arrival order, a query of
        ``batch_size`` rows at a time (no transaction held between them)."""
        check_scan_arguments(since, until, batch_size)
        lo, stop = seq_range if seq_range is not None else (1, 2**63 - 1)
        last = max(lo - 1, 0)
        while True:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT seq, token, row_key, chain, writer, wseq FROM readings "
                    "WHERE seq > %s AND seq < %s ORDER BY seq LIMIT %s",
                    (last, stop, batch_size),
                    binary=True,  # bytea as is, not hex to decode
                ).fetchall()
                self.keyring.refresh()
            if not rows:
                return
            last = rows[-1][0]
            page = []
            for seq, token, row_key, chain, writer, wseq in rows:
                try:
                    plaintext = self.keyring.decrypt(bytes(token))
                except InvalidToken:
                    raise self._undecryptable(seq, "InvalidToken") from None
                page.append((seq, plaintext, bytes(row_key), bytes(chain), writer, wseq))
            yield page

    def _chain_cursor(self, seq_range: tuple[int, int] | None) -> ChainChecker:
        return _PgChainCursor(self)  # each row is checked against its own writer's chain

    def _undecryptable(self, seq: int, why: str) -> StoreError:
        return StoreError(
            f"{self.name}: row {seq} does not decrypt under the keyring {self.keyring.path} "
            f"({why}); run 'pacegate hospital verify'"
        )

    # -- integrity ------------------------------------------------------------------------------
    def scan(
        self, batch_size: int = DEFAULT_ITER_BATCH, *, expect: RecordedHead | None = None
    ) -> PostgresChainScan:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        return PostgresChainScan(self, batch_size, expect)

    def verify(
        self, batch_size: int = DEFAULT_ITER_BATCH, *, expect: RecordedHead | None = None
    ) -> PgVerifyReport:
        """Every writer's chain, head and (for this writer) anchor, over one snapshot."""
        scan = self.scan(batch_size, expect=expect)
        for _ in scan:
            pass
        return scan.report

    def check_head(self) -> int:
        """Cheaply: every writer's head MAC and that it names its writer's last row, and
        this writer's anchor. Returns the highest ``seq`` those heads vouch for."""
        records = self.anchor.records() if self.anchor is not None else None
        version = self._db_mac_version()
        keys = self._chain_keys(version)
        problems: list[VerifyProblem] = []
        with self._connect() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            heads = {
                w: _decode_head(bytes(h)) for w, h in conn.execute("SELECT writer, head FROM heads")
            }
            lasts = {
                w: (int(s), int(ws), bytes(ch))
                for w, s, ws, ch in conn.execute(
                    "SELECT DISTINCT ON (writer) writer, seq, wseq, chain FROM readings "
                    "ORDER BY writer, wseq DESC"
                )
            }
            best = best_anchor(records or [], self.keyring, version)
            at = None
            if best is not None:
                if best.seq == 0:
                    at = writer_genesis(keys, self.writer)
                else:
                    row = conn.execute(
                        "SELECT chain FROM readings WHERE writer = %s AND wseq = %s",
                        (self.writer, best.seq),
                    ).fetchone()
                    at = bytes(row[0]) if row is not None else None
            conn.execute("COMMIT")
        for writer in sorted(set(heads) | set(lasts)):
            _, wseq, chain = lasts.get(writer, (0, 0, writer_genesis(keys, writer)))
            problems += [
                dataclasses.replace(p, detail=f"writer {writer}: {p.detail}")
                for p in head_problems(heads.get(writer), keys, wseq, chain)
            ]
        if self.anchor is not None:
            own = lasts.get(self.writer, (0, 0, writer_genesis(keys, self.writer)))
            problems += anchor_problems(self.anchor, records, best, version, own[1], at)
        if problems:
            raise StoreError(
                f"{self.name}: {describe_problem(problems[0])}; run 'pacegate hospital verify'"
            )
        return max((s for s, _, _ in lasts.values()), default=0)

    def reanchor(self) -> tuple[VerifyReport, list[AnchorRecord] | None]:
        """Accept this writer's current head as its anchor (after a deliberate restore or a
        lost anchor file); refused unless every chain inside the database verifies."""
        if self.anchor is None:
            raise StoreError(f"{self.name}: writer {self.writer} keeps no anchor file")
        before = self.anchor.records()
        report = self.verify()
        inside = [p for p in report.problems if p.kind not in ANCHOR_PROBLEMS]
        if inside:
            raise StoreError(
                f"{self.name}: the chains inside the database do not verify "
                f"({len(inside)} problem(s), first: {describe_problem(inside[0])}); not re-anchored"
            )
        keys = self._chain_keys(report.head_version)
        with self.anchor.locked(LOCK_TIMEOUT_MS / 1000):
            self.anchor.replace(self._anchor_record(keys, report.last_seq, report.head_chain))
        return report, before

    # -- maintenance ----------------------------------------------------------------------------
    def rotate_key(
        self, *, batch_size: int = ROTATE_BATCH, retire_old: bool = True, integrity: bool = False
    ) -> RotationReport:
        """Add a Fernet key, re-encrypt every row under it in short transactions while every
        writer goes on ingesting, then look at every row once more with all writers' heads
        locked (ingest waits for that pass only), re-encrypting the rows stored meanwhile,
        before the older keys are retired. The new version is recorded in the database
        first: from then on a node whose keyring lacks it is refused (no ACK) instead of
        storing rows under a key about to be retired. Copy the keyring to every node."""
        with self._lock:
            self.keyring.refresh()
            new_version = self.keyring.add_key()
            self.keyring.save()
            self._set_meta("fernet_version", new_version.to_bytes(4, "big"))
        reencrypted, last = 0, 0
        while True:
            with self._lock, self._conn.transaction():
                rows = self._conn.execute(
                    "SELECT seq, key_version, token FROM readings WHERE seq > %s "
                    "ORDER BY seq LIMIT %s FOR UPDATE",
                    (last, batch_size),
                ).fetchall()
                reencrypted += self._reencrypt(rows, new_version)
            if not rows:
                break
            last = rows[-1][0]
        retired: list[int] = []
        with self._lock, self._conn.transaction():
            # every writer's head: no batch of any node commits during the final check
            self._conn.execute("SELECT writer FROM heads ORDER BY writer FOR UPDATE").fetchall()
            stragglers = self._conn.execute(
                "SELECT seq, key_version, token FROM readings ORDER BY seq"
            ).fetchall()
            reencrypted += self._reencrypt(stragglers, new_version)
            if retire_old:
                retired = self.keyring.retire_older_than(new_version)
                self.keyring.save()
        report = RotationReport(new_version, reencrypted, retired)
        if integrity:
            report.new_mac_version, report.retired_mac = self._rekey(batch_size, retire_old)
        return report

    def _rekey(self, batch_size: int, retire_old: bool) -> tuple[int, list[int]]:
        """Re-key every writer's row keys and chain under a new integrity key in **one**
        transaction holding every writer's head (ingest on every node waits for it; past
        :data:`LOCK_TIMEOUT_MS` its batch fails without ACK and is sent again). Refused, with
        nothing changed, when any chain, head or this writer's anchor does not verify:
        re-keying a damaged chain would make the damage verify. Other nodes' anchors are
        under the old key until their next batch (compared by row number only)."""
        kr = self.keyring
        with self._lock:
            kr.refresh()
            new_version = kr.add_mac_key()
            kr.save()  # both keys held: every node's ingest can follow the switch
        new = kr.integrity(new_version)
        records = self.anchor.records() if self.anchor is not None else None
        c = self._conn
        with self._lock:
            with c.transaction():
                heads = {
                    w: _decode_head(bytes(h))
                    for w, h in c.execute(
                        "SELECT writer, head FROM heads ORDER BY writer FOR UPDATE"
                    ).fetchall()
                }
                old_version = self._db_mac_version_locked()
                old = self._chain_keys(old_version)
                writers = sorted(
                    set(heads)
                    | {w for (w,) in c.execute("SELECT DISTINCT writer FROM readings").fetchall()}
                )
                own_last, own_new_chain = 0, writer_genesis(new, self.writer)
                best = best_anchor(records or [], kr, old_version)
                for writer in writers:
                    last, prev_old, prev_new, at = self._rekey_writer(
                        writer, old, new, batch_size, best.seq if best is not None else -1
                    )
                    head = heads.get(writer)
                    damage = head_problems(head, old, last, prev_old)
                    if head is not None and head.version != old.version:
                        damage.append(VerifyProblem(None, "head_mismatch", "head key version"))
                    if damage:
                        raise self._not_rekeyed(writer, damage[0].seq, damage[0].kind)
                    if writer == self.writer:
                        if self.anchor is not None:
                            anchored = anchor_problems(
                                self.anchor, records, best, old_version, last, at
                            )
                            if anchored:
                                raise self._not_rekeyed(writer, anchored[0].seq, anchored[0].kind)
                        own_last, own_new_chain = last, prev_new
                    c.execute(
                        "UPDATE heads SET head = %s WHERE writer = %s",
                        (self._head(new, last, prev_new).encode(), writer),
                    )
                self._set_meta("keyring", new.fingerprint())
            # committed: this writer's anchor follows
            if self.anchor is not None:
                with self.anchor.locked(LOCK_TIMEOUT_MS / 1000):
                    self.anchor.replace(self._anchor_record(new, own_last, own_new_chain))
                self._anchored = (own_last, own_new_chain)
            retired: list[int] = []
            if retire_old:
                kr.refresh()
                retired = kr.retire_mac_older_than(new_version)
                kr.save()
        return new_version, retired

    def _rekey_writer(
        self, writer: str, old: ChainKeys, new: ChainKeys, batch_size: int, anchor_wseq: int
    ) -> tuple[int, bytes, bytes, bytes | None]:
        """One writer's rows, checked under ``old`` and re-keyed under ``new`` (inside the
        caller's transaction): ``(last wseq, last old chain, last new chain, old chain at
        the anchored row)``."""
        c, kr = self._conn, self.keyring
        prev_old, prev_new = writer_genesis(old, writer), writer_genesis(new, writer)
        at = prev_old if anchor_wseq == 0 else None
        last = 0
        while rows := c.execute(
            "SELECT seq, wseq, row_key, token, chain FROM readings WHERE writer = %s "
            "AND wseq > %s ORDER BY wseq LIMIT %s",
            (writer, last, batch_size),
        ).fetchall():
            updates = []
            for seq, wseq, row_key, token, chain in rows:
                row_key, chain = bytes(row_key), bytes(chain)
                try:
                    plaintext = kr.decrypt(bytes(token))
                    record = decode_plaintext(plaintext)
                except (InvalidToken, ValueError, KeyError, TypeError):
                    raise self._not_rekeyed(writer, seq, "undecryptable") from None
                if wseq != last + 1:
                    raise self._not_rekeyed(writer, seq, "missing_rows")
                bad = row_problems(old, prev_old, wseq, row_key, chain, plaintext, record)
                if bad:
                    raise self._not_rekeyed(writer, seq, bad[0].kind)
                fresh_key = new.row_key(record.device_id, record.counter)
                fresh_chain = new.chain_link(prev_new, wseq, fresh_key, plaintext)
                updates.append((fresh_key, fresh_chain, seq))
                if wseq == anchor_wseq and writer == self.writer:
                    at = chain
                prev_old, prev_new, last = chain, fresh_chain, wseq
            with c.cursor() as cur:
                cur.executemany(
                    "UPDATE readings SET row_key = %s, chain = %s WHERE seq = %s", updates
                )
        return last, prev_old, prev_new, at

    def _not_rekeyed(self, writer: str, seq: int | None, kind: str) -> StoreError:
        where = f"row {seq}" if seq is not None else "the head"
        return StoreError(
            f"{self.name}: writer {writer}: {where}: {kind}: the chain does not verify, so it "
            "was not re-keyed under a new integrity key (that would make the damage verify); "
            "nothing changed. Run 'pacegate hospital verify'"
        )

    def _reencrypt(self, rows: list[tuple[int, int, bytes]], new_version: int) -> int:
        n = 0
        for seq, version, token in rows:
            token = bytes(token)
            if self.keyring.decrypts_under_newest(token):
                if version != new_version:
                    self._conn.execute(
                        "UPDATE readings SET key_version = %s WHERE seq = %s", (new_version, seq)
                    )
                continue
            try:
                fresh = self.keyring.reencrypt(token)
            except InvalidToken:
                raise StoreError(
                    f"{self.name}: row {seq} does not decrypt under any key of "
                    f"{self.keyring.path}; nothing retired. Run 'pacegate hospital verify'"
                ) from None
            self._conn.execute(
                "UPDATE readings SET token = %s, key_version = %s WHERE seq = %s",
                (fresh, new_version, seq),
            )
            n += 1
        return n


def _conforms(store: PostgresReadingStore) -> ReadingStore:
    return store  # mypy checks here that the whole ReadingStore protocol is implemented
