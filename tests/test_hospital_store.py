"""The hospital's reading store: exactly-once, nothing in clear, rotation online, hash chain.

Everything here runs against real SQLite files in WAL mode and real Fernet keys.
"""

from __future__ import annotations

import json
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from hospital.keyring import Keyring
from hospital.rowcodec import PLAINTEXT_BLOCK, decode_plaintext
from hospital.store import SqliteReadingStore, StoreError
from pacegate.errors import ConfigError
from pacegate.ingest import FLAG_IMPLAUSIBLE, IngestItem
from pacegate.reading import Reading

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def make_items(n: int, *, devices: int = 5, start: int = 0) -> list[IngestItem]:
    out = []
    for i in range(start, start + n):
        dev = f"pm-{i % devices:04d}"
        reading = Reading(
            age=40 + i % 50,
            heart_rate_bpm=55 + i % 60,
            sensor_id=7_000_000 + i % devices,
            timestamp=T0 + timedelta(seconds=i, microseconds=123_457),
        )
        out.append(IngestItem(dev, counter=i // devices + 1, reading=reading))
    return out


@pytest.fixture
def hdir(tmp_path: Path) -> Path:
    return tmp_path / "hospital"


@pytest.fixture
def store(hdir: Path) -> Iterator[SqliteReadingStore]:
    s = SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json")
    try:
        yield s
    finally:
        s.close()


def all_records(s: SqliteReadingStore) -> list[tuple[str, int, Reading]]:
    return [(r.device_id, r.counter, r.reading) for b in s.iter_records() for r in b]


def raw(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None)


# -- exactly once ------------------------------------------------------------------------------
def test_duplicate_batch_is_absorbed_and_stored_once(store: SqliteReadingStore) -> None:
    items = make_items(60)
    first = store.store_batch(items)
    again = store.store_batch(items)
    assert (first.stored, first.duplicates) == (60, 0)
    assert (again.stored, again.duplicates, again.conflicts) == (0, 60, 0)
    assert store.count() == 60
    assert sorted(all_records(store), key=str) == sorted(
        [(i.device_id, i.counter, i.reading) for i in items], key=str
    )


def test_duplicate_inside_one_batch_is_stored_once(store: SqliteReadingStore) -> None:
    items = make_items(10)
    result = store.store_batch([*items, items[3], items[3]])
    assert (result.stored, result.duplicates) == (10, 2)
    assert store.count() == 10


def test_partly_new_batch_stores_only_the_new_readings(store: SqliteReadingStore) -> None:
    store.store_batch(make_items(20))
    result = store.store_batch(make_items(30, start=10))
    assert (result.stored, result.duplicates) == (20, 10)
    assert store.count() == 40


def test_same_counter_with_another_reading_is_a_conflict_not_stored(
    store: SqliteReadingStore,
) -> None:
    item = make_items(1)[0]
    store.store_batch([item])
    forged = IngestItem(item.device_id, item.counter, Reading(30, 180, 1, T0))
    result = store.store_batch([forged])
    assert (result.stored, result.duplicates, result.conflicts) == (0, 1, 1)
    assert all_records(store) == [(item.device_id, item.counter, item.reading)]


def test_readings_survive_reopening_the_database(hdir: Path) -> None:
    with SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json") as s:
        s.store_batch(make_items(25))
    with SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json") as s:
        assert s.count() == 25
        assert s.store_batch(make_items(25)).duplicates == 25


def test_flags_are_kept_inside_the_token(store: SqliteReadingStore) -> None:
    item = IngestItem("pm-0001", 1, Reading(50, 300, 1, T0), FLAG_IMPLAUSIBLE)
    store.store_batch([item])
    [[record]] = list(store.iter_records())
    assert record.flags == FLAG_IMPLAUSIBLE


# -- streaming for the analytics -----------------------------------------------------------------
def test_iter_readings_streams_every_reading_in_bounded_batches(
    store: SqliteReadingStore,
) -> None:
    items = make_items(257)
    store.store_batch(items[:200])
    store.store_batch(items[200:])
    batches = list(store.iter_readings(batch_size=50))
    assert all(0 < len(b) <= 50 for b in batches)
    assert [r for b in batches for r in b] == [i.reading for i in items]


def test_iter_readings_filters_by_time_since_inclusive_until_exclusive(
    store: SqliteReadingStore,
) -> None:
    items = make_items(100)
    store.store_batch(items)
    since, until = items[10].reading.timestamp, items[20].reading.timestamp
    got = [r for b in store.iter_readings(since, until, batch_size=7) for r in b]
    assert got == [i.reading for i in items[10:20]]


def test_iter_readings_refuses_naive_bounds(store: SqliteReadingStore) -> None:
    with pytest.raises(ValueError, match="timezone"):
        next(store.iter_readings(since=datetime(2025, 1, 1)))


# -- nothing in clear --------------------------------------------------------------------------
def test_no_file_in_the_hospital_dir_holds_a_reading_in_clear(
    store: SqliteReadingStore, hdir: Path
) -> None:
    items = make_items(40)
    store.store_batch(items)  # WAL not checkpointed: the -wal file holds the pages
    needles: set[bytes] = {b"heart_rate_bpm", b"sensor_id", b"device_id", b"pm-000"}
    for item in items:
        needles.add(item.reading.timestamp.isoformat().encode())
        needles.add(json.dumps(item.reading.to_json()).encode())
        needles.add(item.reading.to_bytes())  # the wire encoding, too
    files = [p for p in hdir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"readings.db", "readings.db-wal", "keyring.json"}
    for path in files:
        data = path.read_bytes()
        found = [n for n in needles if n in data]
        assert not found, f"{path.name} holds {found[:3]}"


def test_database_wal_and_keyring_are_owner_only(store: SqliteReadingStore, hdir: Path) -> None:
    store.store_batch(make_items(3))
    for name in ("readings.db", "readings.db-wal", "keyring.json"):
        mode = stat.S_IMODE((hdir / name).stat().st_mode)
        assert mode & 0o077 == 0, f"{name} has mode {mode:o}"


def test_tokens_do_not_reveal_when_or_how_long(store: SqliteReadingStore, hdir: Path) -> None:
    store.store_batch(
        [
            IngestItem("a", 1, Reading(1, 60, 1, T0)),
            IngestItem(
                "a-much-longer-device-identifier-" + "x" * 31, 2**60, make_items(1)[0].reading
            ),
        ]
    )
    with raw(hdir / "readings.db") as c:
        tokens = [t for (t,) in c.execute("SELECT token FROM readings")]
    assert len({len(t) for t in tokens}) == 1  # padded to PLAINTEXT_BLOCK
    assert all(_token_time(t) == 0 for t in tokens)  # Fernet time field: fixed, not now
    assert PLAINTEXT_BLOCK == 256


def _token_time(token: bytes) -> int:
    import base64

    return int.from_bytes(base64.urlsafe_b64decode(token)[1:9], "big")


def test_plaintext_round_trips(store: SqliteReadingStore) -> None:
    from hospital.rowcodec import encode_plaintext

    item = make_items(1)[0]
    rec = decode_plaintext(encode_plaintext(item))
    assert (rec.device_id, rec.counter, rec.reading) == (item.device_id, item.counter, item.reading)


# -- keyring ------------------------------------------------------------------------------------
def test_group_readable_keyring_is_refused(store: SqliteReadingStore, hdir: Path) -> None:
    (hdir / "keyring.json").chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        Keyring.load(hdir / "keyring.json")


def test_store_refuses_a_keyring_from_another_database(
    store: SqliteReadingStore, hdir: Path, tmp_path: Path
) -> None:
    store.store_batch(make_items(2))
    other = Keyring.create(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="does not belong"):
        SqliteReadingStore(hdir / "readings.db", other)


def test_missing_keyring_for_a_database_with_readings_is_an_error_not_a_new_key(
    store: SqliteReadingStore, hdir: Path
) -> None:
    store.store_batch(make_items(2))
    store.close()
    (hdir / "keyring.json").unlink()
    with pytest.raises(ConfigError, match="restore the keyring"):
        SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json")
    assert not (hdir / "keyring.json").exists()


def test_damaged_keyring_names_the_key(hdir: Path) -> None:
    hdir.mkdir()
    path = hdir / "keyring.json"
    ring = Keyring.create(path)
    data = json.loads(path.read_text())
    data["fernet_keys"][0]["key"] = "not-a-key"
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"fernet_keys\[0\]\.key"):
        Keyring.load(path)
    assert ring.versions == [1]


# -- rotation ----------------------------------------------------------------------------------
def test_after_rotate_key_every_row_reads_under_the_new_key_alone(
    store: SqliteReadingStore, hdir: Path
) -> None:
    items = make_items(450)
    store.store_batch(items)
    report = store.rotate_key(batch_size=100, retire_old=False)
    assert (report.new_version, report.reencrypted, report.retired) == (2, 450, [])
    # remove the old key by hand: the store must still read every row
    ring_path = hdir / "keyring.json"
    data = json.loads(ring_path.read_text())
    data["fernet_keys"] = [k for k in data["fernet_keys"] if k["version"] == 2]
    ring_path.write_text(json.dumps(data))
    store.close()
    with SqliteReadingStore.open(hdir / "readings.db", ring_path) as fresh:
        assert fresh.keyring.versions == [2]
        assert [r for b in fresh.iter_readings() for r in b] == [i.reading for i in items]
        assert fresh.verify().ok


def test_rotate_key_retires_the_old_key_by_default(store: SqliteReadingStore, hdir: Path) -> None:
    store.store_batch(make_items(30))
    old_key = json.loads((hdir / "keyring.json").read_text())["fernet_keys"][0]["key"]
    report = store.rotate_key()
    assert report.retired == [1]
    assert Keyring.load(hdir / "keyring.json").versions == [2]
    with raw(hdir / "readings.db") as c:
        tokens = [t for (t,) in c.execute("SELECT token FROM readings")]
        versions = {v for (v,) in c.execute("SELECT key_version FROM readings")}
    assert versions == {2}
    from cryptography.fernet import InvalidToken

    with pytest.raises(InvalidToken):
        Fernet(old_key.encode()).decrypt(tokens[0])
    assert store.count() == 30
    assert store.verify().ok


def test_rotation_runs_while_ingest_continues(hdir: Path) -> None:
    """A service (one connection) ingests while rotate-key (another) re-encrypts."""
    db, ring = hdir / "readings.db", hdir / "keyring.json"
    service = SqliteReadingStore.open(db, ring)
    service.store_batch(make_items(600))
    errors: list[BaseException] = []
    stop = threading.Event()

    def ingest() -> None:
        start = 600
        try:
            while not stop.is_set() or start < 1000:
                service.store_batch(make_items(20, start=start))
                start += 20
                if start >= 2000:
                    return
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        with SqliteReadingStore.open(db, ring) as operator:
            report = operator.rotate_key(batch_size=50)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not errors
    assert report.retired == [1]
    total = service.count()
    assert total >= 1000
    with raw(db) as c:
        assert {v for (v,) in c.execute("SELECT key_version FROM readings")} == {2}
    service.close()
    with SqliteReadingStore.open(db, ring) as check:
        assert check.keyring.versions == [2]
        assert sum(len(b) for b in check.iter_readings()) == total
        assert check.verify().ok


def test_service_picks_up_a_rotated_keyring_without_restart(hdir: Path) -> None:
    db, ring = hdir / "readings.db", hdir / "keyring.json"
    with SqliteReadingStore.open(db, ring) as service:
        service.store_batch(make_items(5))
        with SqliteReadingStore.open(db, ring) as operator:
            operator.rotate_key()
        service.store_batch(make_items(5, start=5))
        assert service.keyring.versions == [2]
    with raw(db) as c:
        assert {v for (v,) in c.execute("SELECT key_version FROM readings")} == {2}


def test_rotation_does_not_trust_key_version_and_retires_only_once_every_row_is_under_the_new_key(
    store: SqliteReadingStore, hdir: Path
) -> None:
    """The key_version column is not authenticated: set high on one row, a rotation that
    trusted it would skip that row and retire the only key that decrypts it."""
    items = make_items(30)
    store.store_batch(items)
    with raw(hdir / "readings.db") as c:
        c.execute("UPDATE readings SET key_version = 99 WHERE seq = 7")
    report = store.rotate_key(batch_size=8)
    assert report.retired == [1]
    assert Keyring.load(hdir / "keyring.json").versions == [2]
    assert [r for b in store.iter_readings() for r in b] == [i.reading for i in items]
    assert store.verify().ok
    with raw(hdir / "readings.db") as c:
        assert {v for (v,) in c.execute("SELECT key_version FROM readings")} == {2}


def test_rotation_keeps_every_key_when_a_row_does_not_decrypt(
    store: SqliteReadingStore, hdir: Path
) -> None:
    store.store_batch(make_items(10))
    with raw(hdir / "readings.db") as c:
        c.execute("UPDATE readings SET token = X'00' WHERE seq = 4")
    with pytest.raises(StoreError, match="row 4 does not decrypt under any key"):
        store.rotate_key()
    assert Keyring.load(hdir / "keyring.json").versions == [1, 2]


def test_second_rotation_while_one_runs_is_refused(store: SqliteReadingStore, hdir: Path) -> None:
    from hospital.store import _exclusive

    with _exclusive(hdir / "keyring.json.lock"), pytest.raises(StoreError, match="another"):
        store.rotate_key()
    assert store.keyring.versions == [1]


# -- hash chain ----------------------------------------------------------------------------------
def test_verify_accepts_an_untouched_store(store: SqliteReadingStore) -> None:
    store.store_batch(make_items(100))
    store.store_batch(make_items(100))
    report = store.verify()
    assert report.ok
    assert report.rows == 100
    assert report.last_seq == 100


def test_verify_detects_a_deleted_row(store: SqliteReadingStore, hdir: Path) -> None:
    store.store_batch(make_items(20))
    with raw(hdir / "readings.db") as c:
        c.execute("DELETE FROM readings WHERE seq = 7")
    report = store.verify()
    kinds = {(p.seq, p.kind) for p in report.problems}
    assert (8, "missing_rows") in kinds
    assert (8, "chain_mismatch") in kinds


def test_verify_detects_a_deleted_row_with_renumbered_seqs(
    store: SqliteReadingStore, hdir: Path
) -> None:
    store.store_batch(make_items(20))
    with raw(hdir / "readings.db") as c:
        c.execute("DELETE FROM readings WHERE seq = 7")
        c.execute("UPDATE readings SET seq = seq - 1 WHERE seq > 7")
    report = store.verify()
    assert not report.ok
    assert {p.kind for p in report.problems} >= {"chain_mismatch"}
    assert min(p.seq or 0 for p in report.problems) == 7


def test_verify_detects_removal_of_the_last_rows(store: SqliteReadingStore, hdir: Path) -> None:
    store.store_batch(make_items(20))
    with raw(hdir / "readings.db") as c:
        c.execute("DELETE FROM readings WHERE seq > 18")
    report = store.verify()
    # the head inside the database, and the anchor outside it, both see it
    assert [p.kind for p in report.problems] == ["head_mismatch", "rolled_back"]


def test_verify_detects_a_forged_head_after_truncation(
    store: SqliteReadingStore, hdir: Path
) -> None:
    store.store_batch(make_items(20))
    with raw(hdir / "readings.db") as c:
        (chain,) = c.execute("SELECT chain FROM readings WHERE seq = 19").fetchone()
        (head,) = c.execute("SELECT value FROM meta WHERE name = 'head'").fetchone()
        c.execute("DELETE FROM readings WHERE seq = 20")
        forged = head[:4] + (19).to_bytes(8, "big") + chain + head[44:]
        c.execute("UPDATE meta SET value = ? WHERE name = 'head'", (forged,))
    report = store.verify()
    first = report.problems[0]
    assert (first.kind, first.detail) == ("head_mismatch", "the chain head was altered")
    assert [p.kind for p in report.problems] == ["head_mismatch", "rolled_back"]


def test_verify_detects_reordered_rows(store: SqliteReadingStore, hdir: Path) -> None:
    store.store_batch(make_items(20))
    with raw(hdir / "readings.db") as c:
        c.execute("UPDATE readings SET seq = -1 WHERE seq = 5")
        c.execute("UPDATE readings SET seq = 5 WHERE seq = 6")
        c.execute("UPDATE readings SET seq = 6 WHERE seq = -1")
    report = store.verify()
    bad = {p.seq for p in report.problems if p.kind == "chain_mismatch"}
    assert {5, 6} <= bad
    assert not any(p.kind == "missing_rows" for p in report.problems)


def test_verify_detects_a_modified_token(store: SqliteReadingStore, hdir: Path) -> None:
    store.store_batch(make_items(10))
    with raw(hdir / "readings.db") as c:
        (tok,) = c.execute("SELECT token FROM readings WHERE seq = 3").fetchone()
        flipped = tok[:-5] + (b"A" if tok[-5:-4] != b"A" else b"B") + tok[-4:]
        c.execute("UPDATE readings SET token = ? WHERE seq = 3", (flipped,))
    report = store.verify()
    assert [(p.seq, p.kind) for p in report.problems] == [(3, "undecryptable")]


def test_verify_detects_a_token_swapped_between_rows(store: SqliteReadingStore, hdir: Path) -> None:
    store.store_batch(make_items(10))
    with raw(hdir / "readings.db") as c:
        (t3,) = c.execute("SELECT token FROM readings WHERE seq = 3").fetchone()
        (t4,) = c.execute("SELECT token FROM readings WHERE seq = 4").fetchone()
        c.execute("UPDATE readings SET token = ? WHERE seq = 3", (t4,))
        c.execute("UPDATE readings SET token = ? WHERE seq = 4", (t3,))
    kinds = {(p.seq, p.kind) for p in store.verify().problems}
    assert {(3, "row_key_mismatch"), (4, "row_key_mismatch"), (3, "chain_mismatch")} <= kinds


def test_chain_survives_rotation_and_still_catches_deletion(
    store: SqliteReadingStore, hdir: Path
) -> None:
    store.store_batch(make_items(30))
    store.rotate_key()
    assert store.verify().ok
    with raw(hdir / "readings.db") as c:
        c.execute("DELETE FROM readings WHERE seq = 11")
    assert {p.kind for p in store.verify().problems} >= {"missing_rows", "chain_mismatch"}
