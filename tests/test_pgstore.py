"""The PostgreSQL reading store: the same behaviour as SQLite's, several writers at once,
and a chain per writer that shows an attacker's SQL.

Everything runs against a real PostgreSQL server (started for the session on loopback by
console/postgres.py), real SQLite files and real Fernet keys.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet, InvalidToken

from hospital.keyring import Keyring
from hospital.pgstore import PostgresReadingStore, redact_dsn
from hospital.rowcodec import decode_plaintext
from hospital.store import SqliteReadingStore, StoreError
from pacegate.errors import ConfigError
from pacegate.ingest import IngestItem
from pacegate.reading import Reading
from tests.test_hospital_store import make_items

pytestmark = pytest.mark.integration

AnyStore = SqliteReadingStore | PostgresReadingStore


def _kinds(report: Any) -> set[str]:
    return {p.kind for p in report.problems}


# -- the behaviour both backends share --------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], AnyStore]]:
    """Opens (and reopens) one store of the backend under test; closes them all after."""
    opened: list[AnyStore] = []
    hdir = tmp_path / "hospital"
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else ""

    def opener() -> AnyStore:
        s: AnyStore
        if request.param == "sqlite":
            s = SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json")
        else:
            s = PostgresReadingStore.open(
                dsn, hdir / "keyring.json", "node-1", hdir / "anchor-node-1"
            )
        opened.append(s)
        return s

    yield opener
    for s in opened:
        s.close()


def test_duplicate_batch_is_absorbed_and_stored_once_on_both_backends(
    open_store: Callable[[], AnyStore],
) -> None:
    store = open_store()
    items = make_items(50)
    first = store.store_batch(items)
    again = store.store_batch(items)
    assert (first.stored, first.duplicates) == (50, 0)
    assert (again.stored, again.duplicates, again.conflicts) == (0, 50, 0)
    assert store.count() == 50
    assert store.verify().ok


def test_duplicate_inside_one_batch_is_stored_once_on_both_backends(
    open_store: Callable[[], AnyStore],
) -> None:
    store = open_store()
    items = make_items(10)
    result = store.store_batch(items + items[:3])
    assert (result.stored, result.duplicates, result.conflicts) == (10, 3, 0)
    assert store.count() == 10


def test_same_counter_with_another_reading_is_a_conflict_not_stored_on_both_backends(
    open_store: Callable[[], AnyStore],
) -> None:
    store = open_store()
    original = make_items(5)
    store.store_batch(original)
    forged = IngestItem(
        original[0].device_id,
        original[0].counter,
        Reading(age=99, heart_rate_bpm=200, sensor_id=1, timestamp=original[0].reading.timestamp),
    )
    result = store.store_batch([forged, *make_items(2, start=5)])
    assert (result.stored, result.duplicates, result.conflicts) == (2, 1, 1)
    stored = {(r.device_id, r.counter): r.reading for b in store.iter_records() for r in b}
    assert stored[(forged.device_id, forged.counter)] == original[0].reading
    assert len(stored) == 7


def test_readings_survive_reopening_and_stream_in_order_on_both_backends(
    open_store: Callable[[], AnyStore],
) -> None:
    items = make_items(250)
    first = open_store()
    for i in range(0, 250, 50):
        first.store_batch(items[i : i + 50])
    first.close()
    again = open_store()
    batches = list(again.iter_readings(batch_size=64))
    assert max(len(b) for b in batches) <= 64
    # within a batch PostgreSQL chains rows in row-key order: compare as sets per batch
    got = [r for b in batches for r in b]
    assert sorted(got, key=lambda r: r.timestamp) == [i.reading for i in items]
    assert again.verify().ok
    assert again.check_head() >= 250


def test_time_filter_is_since_inclusive_until_exclusive_on_both_backends(
    open_store: Callable[[], AnyStore],
) -> None:
    store = open_store()
    items = make_items(20)
    store.store_batch(items)
    since, until = items[5].reading.timestamp, items[10].reading.timestamp
    got = [r for b in store.iter_readings(since, until) for r in b]
    assert sorted(r.timestamp for r in got) == [i.reading.timestamp for i in items[5:10]]
    ages = [
        age
        for batch_ages, _ in store.iter_reading_values(since, until, check_chain=True)
        for age in batch_ages
    ]
    assert sorted(ages) == sorted(i.reading.age for i in items[5:10])
    with pytest.raises(ValueError, match="timezone"):
        next(iter(store.iter_readings(since=datetime(2025, 1, 1))))


def test_rotation_reencrypts_every_row_and_retires_the_old_key_on_both_backends(
    open_store: Callable[[], AnyStore], tmp_path: Path
) -> None:
    store = open_store()
    items = make_items(230)
    store.store_batch(items)
    ring = tmp_path / "hospital" / "keyring.json"
    old_key = json.loads(ring.read_text())["fernet_keys"][0]["key"]
    report = store.rotate_key(batch_size=100)
    assert (report.new_version, report.reencrypted, report.retired) == (2, 230, [1])
    assert Keyring.load(ring).versions == [2]
    store.close()
    fresh = open_store()
    got = sorted((r for b in fresh.iter_readings() for r in b), key=lambda r: r.timestamp)
    assert got == [i.reading for i in items]
    assert fresh.verify().ok
    if isinstance(fresh, PostgresReadingStore):
        with psycopg.connect(fresh.dsn) as c:
            token = bytes(c.execute("SELECT token FROM readings LIMIT 1").fetchone()[0])  # type: ignore[index]
        with pytest.raises(InvalidToken):
            Fernet(old_key.encode()).decrypt(token)


# -- PostgreSQL: at rest, connection, keyring ------------------------------------------------
@pytest.fixture
def hdir(tmp_path: Path) -> Path:
    return tmp_path / "hospital"


def _open(dsn: str, hdir: Path, writer: str, *, anchor: bool = True) -> PostgresReadingStore:
    return PostgresReadingStore.open(
        dsn, hdir / "keyring.json", writer, hdir / f"anchor-{writer}" if anchor else None
    )


def test_rows_at_rest_are_fernet_tokens_with_nothing_in_clear(pg_dsn: str, hdir: Path) -> None:
    items = make_items(20)
    with _open(pg_dsn, hdir, "node-1") as store:
        store.store_batch(items)
        ring = store.keyring
    with psycopg.connect(pg_dsn) as c:
        rows = c.execute("SELECT writer, wseq, row_key, token, chain FROM readings").fetchall()
    dump = b"".join(bytes(r[2]) + bytes(r[3]) + bytes(r[4]) for r in rows)
    for item in items:
        assert item.device_id.encode() not in dump
        assert item.reading.timestamp.isoformat().encode() not in dump
    # the same token format as SQLite's: Fernet over the shared plaintext codec
    decoded = {decode_plaintext(ring.decrypt(bytes(r[3]))).counter for r in rows}
    assert decoded == {i.counter for i in items}


def test_wrong_password_is_a_store_error_that_names_the_server_but_not_the_password(
    pg_dsn: str, hdir: Path
) -> None:
    password = psycopg.conninfo.conninfo_to_dict(pg_dsn)["password"]
    bad = pg_dsn.replace(f"password={password}", "password=not-the-password")
    with pytest.raises(StoreError, match="cannot connect") as info:
        PostgresReadingStore(bad, Keyring.create(hdir / "k.json"), "node-1")
    assert "not-the-password" not in str(info.value)
    assert "host=127.0.0.1" in str(info.value)
    assert str(password) not in redact_dsn(pg_dsn)


def test_keyring_of_another_database_is_refused(pg_dsn: str, hdir: Path) -> None:
    _open(pg_dsn, hdir, "node-1").close()
    with pytest.raises(ConfigError, match="does not belong"):
        PostgresReadingStore(pg_dsn, Keyring.create(hdir / "other.json"), "node-2")


def test_missing_keyring_for_a_database_with_readings_is_an_error_not_a_new_key(
    pg_dsn: str, hdir: Path
) -> None:
    with _open(pg_dsn, hdir, "node-1") as store:
        store.store_batch(make_items(3))
    with pytest.raises(ConfigError, match="holds readings"):
        PostgresReadingStore.open(pg_dsn, hdir / "elsewhere" / "keyring.json", "node-2")


def test_writer_id_that_could_not_be_printed_in_a_report_is_refused(
    pg_dsn: str, hdir: Path
) -> None:
    with pytest.raises(ConfigError, match=r"store\.writer"):
        PostgresReadingStore(pg_dsn, Keyring.create(hdir / "k.json"), "node 1\n")


# -- several writers --------------------------------------------------------------------------
def test_two_writers_storing_overlapping_batches_store_every_reading_exactly_once(
    pg_dsn: str, hdir: Path
) -> None:
    """Two ingest nodes (two connections, two writer ids) receive the same readings, as after
    a gateway fails over mid-batch: every (device, counter) is stored once, both chains
    verify, and stored + duplicates adds up to what each was sent."""
    _open(pg_dsn, hdir, "node-1").close()  # creates the schema and keyring
    items = make_items(1200, devices=7)
    results: dict[str, list[tuple[int, int]]] = {"node-1": [], "node-2": []}
    errors: list[BaseException] = []
    # Both nodes take their k-th batch together (a barrier per round): node-1 stores
    # [50k, 50k+50) while node-2 stores [50k+25, 50k+75), so the overlap [50k+25, 50k+50) is
    # raced for every round, and node-2 always has 25 readings node-1 reaches only next
    # round (without the rounds, one thread could run all its batches before the other
    # started, and the test would prove nothing about two writers).
    rounds = threading.Barrier(2)

    def ingest(writer: str, offset: int) -> None:
        try:
            with _open(pg_dsn, hdir, writer) as store:
                for i in range(offset, len(items), 50):
                    rounds.wait(timeout=60)
                    r = store.store_batch(items[i : i + 50])
                    results[writer].append((r.stored, r.duplicates))
                if offset:
                    store.store_batch(items[:offset])
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            rounds.abort()  # the other node stops waiting for this one

    threads = [
        threading.Thread(target=ingest, args=("node-1", 0)),
        threading.Thread(target=ingest, args=("node-2", 25)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    with psycopg.connect(pg_dsn) as c:
        per_writer: dict[str, int] = dict(
            c.execute("SELECT writer, count(*) FROM readings GROUP BY writer").fetchall()
        )
        assert c.execute("SELECT count(DISTINCT row_key) FROM readings").fetchone() == (1200,)
    assert sum(per_writer.values()) == 1200
    assert set(per_writer) == {"node-1", "node-2"}  # both really wrote
    with _open(pg_dsn, hdir, "node-1") as store:
        got = sorted((r.device_id, r.counter) for b in store.iter_records() for r in b)
        assert got == sorted((i.device_id, i.counter) for i in items)
        report = store.verify()
        assert report.ok, report.problems
        assert set(report.writers) == {"node-1", "node-2"}
    stored = sum(s for rs in results.values() for s, _ in rs)
    assert stored <= 1200  # node-2's final catch-up batch is not in results


def test_two_processes_share_one_database_and_each_verifies_the_other(
    pg_dsn: str, hdir: Path
) -> None:
    """Two separate OS processes write as two writers; each chain checks out from either."""
    import subprocess
    import sys

    _open(pg_dsn, hdir, "node-1").close()
    script = (
        "import sys; from pathlib import Path\n"
        "from hospital.pgstore import PostgresReadingStore\n"
        "from tests.test_hospital_store import make_items\n"
        "dsn, ring, writer, off = sys.argv[1:]\n"
        "s = PostgresReadingStore.open(dsn, Path(ring), writer,"
        " Path(ring).with_name('anchor-' + writer))\n"
        "items = make_items(600, devices=4)\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
        "for i in range(int(off), 600, 40): s.store_batch(items[i:i+40])\n"
        "s.store_batch(items[:int(off)])\n"
        "print(s.count()); s.close()\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, pg_dsn, str(hdir / "keyring.json"), w, off],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w, off in (("node-a", "0"), ("node-b", "20"))
    ]
    for p in procs:  # both connected: start them together
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
    for p in procs:
        _, err = p.communicate("go\n", timeout=240)
        assert p.returncode == 0, err
    with _open(pg_dsn, hdir, "node-a") as a, _open(pg_dsn, hdir, "node-b") as b:
        assert a.count() == b.count() == 600
        ra, rb = a.verify(), b.verify()
        assert ra.ok, (ra.problems, rb.problems)
        assert rb.ok, (ra.problems, rb.problems)
        assert ra.writers == rb.writers
        assert {"node-a", "node-b"} <= set(ra.writers)


# -- an attacker with SQL ---------------------------------------------------------------------
@pytest.fixture
def two_writers(pg_dsn: str, hdir: Path) -> Iterator[tuple[PostgresReadingStore, str]]:
    """node-1 and node-2 have each stored 30 readings; yields node-1's store."""
    with _open(pg_dsn, hdir, "node-2") as other:
        other.store_batch(make_items(30, start=1000))
    store = _open(pg_dsn, hdir, "node-1")
    store.store_batch(make_items(30))
    assert store.verify().ok
    try:
        yield store, pg_dsn
    finally:
        store.close()


def _sql(dsn: str, statement: str, *args: object) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(statement, args or None)  # type: ignore[arg-type]


def test_verify_detects_a_row_deleted_from_another_writers_chain(
    two_writers: tuple[PostgresReadingStore, str],
) -> None:
    store, dsn = two_writers
    _sql(dsn, "DELETE FROM readings WHERE writer = 'node-2' AND wseq = 12")
    report = store.verify()
    assert "missing_rows" in _kinds(report)
    assert any("node-2" in p.detail for p in report.problems)
    with pytest.raises(StoreError, match="missing_rows"):
        for _ in store.iter_reading_values(check_chain=True):
            pass


def test_verify_detects_the_last_rows_of_a_writer_removed(
    two_writers: tuple[PostgresReadingStore, str],
) -> None:
    store, dsn = two_writers
    _sql(dsn, "DELETE FROM readings WHERE writer = 'node-2' AND wseq > 27")
    assert "head_mismatch" in _kinds(store.verify())
    with pytest.raises(StoreError, match="head_mismatch"):
        store.check_head()


def test_verify_detects_tokens_swapped_between_rows(
    two_writers: tuple[PostgresReadingStore, str],
) -> None:
    store, dsn = two_writers
    _sql(
        dsn,
        "UPDATE readings r SET token = o.token FROM readings o "
        "WHERE (r.writer, r.wseq, o.writer, o.wseq) IN "
        "(('node-1', 3, 'node-2', 8), ('node-2', 8, 'node-1', 3))",
    )
    kinds = _kinds(store.verify())
    assert {"row_key_mismatch", "chain_mismatch"} <= kinds


def test_verify_detects_rows_swapped_in_a_chain(
    two_writers: tuple[PostgresReadingStore, str],
) -> None:
    store, dsn = two_writers
    # exchange the positions of rows 4 and 5 of node-1 (wseq is unique: via a free number)
    _sql(
        dsn,
        "UPDATE readings SET wseq = -1 WHERE writer = 'node-1' AND wseq = 4;"
        "UPDATE readings SET wseq = 4 WHERE writer = 'node-1' AND wseq = 5;"
        "UPDATE readings SET wseq = 5 WHERE writer = 'node-1' AND wseq = -1",
    )
    assert "chain_mismatch" in _kinds(store.verify())


def test_verify_detects_a_row_copied_into_another_writers_chain(
    two_writers: tuple[PostgresReadingStore, str],
) -> None:
    """An attacker duplicates node-1's row 7 at the end of node-2's chain (a new row key, as
    the unique index demands), and even moves node-2's head to name it."""
    store, dsn = two_writers
    _sql(
        dsn,
        "INSERT INTO readings(writer, wseq, row_key, key_version, token, chain) "
        "SELECT 'node-2', 31, sha256(row_key), key_version, token, chain FROM readings "
        "WHERE writer = 'node-1' AND wseq = 7",
    )
    kinds = _kinds(store.verify())
    assert {"row_key_mismatch", "chain_mismatch", "head_mismatch"} <= kinds


def test_verify_detects_a_whole_chain_relabelled_to_another_writer(
    two_writers: tuple[PostgresReadingStore, str],
) -> None:
    store, dsn = two_writers
    _sql(dsn, "DELETE FROM heads WHERE writer = 'node-2'")
    _sql(dsn, "UPDATE readings SET writer = 'node-3' WHERE writer = 'node-2'")
    _sql(dsn, "INSERT INTO heads SELECT 'node-3', head FROM heads WHERE writer = 'node-1'")
    report = store.verify()
    assert "chain_mismatch" in _kinds(report)
    assert "head_mismatch" in _kinds(report)
    assert any("node-3" in p.detail for p in report.problems)


def test_own_writers_rows_and_head_deleted_together_show_as_a_rollback_against_its_anchor(
    two_writers: tuple[PostgresReadingStore, str],
) -> None:
    """Deleting a writer's whole chain (rows and head) leaves nothing inside the database
    to compare with: the node's anchor file outside it names what was there."""
    store, dsn = two_writers
    _sql(dsn, "DELETE FROM readings WHERE writer = 'node-1'")
    _sql(dsn, "DELETE FROM heads WHERE writer = 'node-1'")
    report = store.verify()
    assert "rolled_back" in _kinds(report)
    with pytest.raises(StoreError, match="rolled_back"):
        store.check_head()


def test_rotation_while_two_writers_ingest_leaves_every_row_under_the_new_key(
    pg_dsn: str, hdir: Path
) -> None:
    with _open(pg_dsn, hdir, "node-1") as first:
        first.store_batch(make_items(400))
    errors: list[BaseException] = []
    done = threading.Event()

    def ingest(writer: str, start: int) -> None:
        try:
            with _open(pg_dsn, hdir, writer) as s:
                n = start
                while not done.is_set() and n < start + 2000:
                    s.store_batch(make_items(20, start=n))
                    n += 20
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=ingest, args=("node-2", 10_000)),
        threading.Thread(target=ingest, args=("node-3", 20_000)),
    ]
    for t in threads:
        t.start()
    with _open(pg_dsn, hdir, "node-1") as rot:
        report = rot.rotate_key(batch_size=50)
    done.set()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert report.retired == [1]
    ring = Keyring.load(hdir / "keyring.json")
    assert ring.versions == [2]
    with psycopg.connect(pg_dsn) as c:
        tokens = [bytes(t) for (t,) in c.execute("SELECT token FROM readings")]
    assert all(ring.decrypts_under_newest(t) for t in tokens)
    with _open(pg_dsn, hdir, "node-1") as s:
        assert s.verify().ok


def test_node_with_a_keyring_older_than_the_databases_newest_key_is_refused_not_stored(
    pg_dsn: str, hdir: Path, tmp_path: Path
) -> None:
    """Node 2 got no copy of the rotated keyring: it must not store rows under the key
    that node 1's rotation retires."""
    with _open(pg_dsn, hdir, "node-1") as first:
        first.store_batch(make_items(10))
    stale_dir = tmp_path / "node2"
    stale_dir.mkdir()
    (stale_dir / "keyring.json").write_bytes((hdir / "keyring.json").read_bytes())
    (stale_dir / "keyring.json").chmod(0o600)
    stale = PostgresReadingStore.open(pg_dsn, stale_dir / "keyring.json", "node-2")
    with _open(pg_dsn, hdir, "node-1") as first:
        first.rotate_key()
    with pytest.raises(StoreError, match="Fernet key version 2"):
        stale.store_batch(make_items(5, start=10))
    stale.close()
    with _open(pg_dsn, hdir, "node-1") as first:
        assert first.count() == 10
        assert first.verify().ok


def test_integrity_rotation_rekeys_every_writers_chain_and_still_catches_deletion(
    pg_dsn: str, hdir: Path
) -> None:
    with _open(pg_dsn, hdir, "node-2") as other:
        other.store_batch(make_items(40, start=500))
    with _open(pg_dsn, hdir, "node-1") as store:
        store.store_batch(make_items(40))
        report = store.rotate_key(integrity=True, batch_size=16)
        assert (report.new_mac_version, report.retired_mac) == (2, [1])
        checked = store.verify()
        assert checked.ok, checked.problems
        assert {h.split(":")[0] for h in checked.writers.values()} == {"2"}
        # ingest on both writers goes on under the new key; duplicates still found
        assert store.store_batch(make_items(45)).stored == 5
    with _open(pg_dsn, hdir, "node-2") as other:
        assert other.store_batch(make_items(41, start=500)).duplicates == 40
        assert other.verify().ok
    _sql(pg_dsn, "DELETE FROM readings WHERE writer = 'node-2' AND wseq = 3")
    with _open(pg_dsn, hdir, "node-1") as store:
        assert "missing_rows" in _kinds(store.verify())


def test_integrity_rotation_of_a_tampered_store_is_refused_and_changes_nothing(
    two_writers: tuple[PostgresReadingStore, str], hdir: Path
) -> None:
    store, dsn = two_writers
    _sql(dsn, "DELETE FROM readings WHERE writer = 'node-2' AND wseq = 5")
    with psycopg.connect(dsn) as c:
        before = c.execute("SELECT seq, row_key, chain FROM readings ORDER BY seq").fetchall()
    with pytest.raises(StoreError, match="not re-keyed"):
        store.rotate_key(integrity=True)
    with psycopg.connect(dsn) as c:
        after = c.execute("SELECT seq, row_key, chain FROM readings ORDER BY seq").fetchall()
    assert after == before
    assert "missing_rows" in _kinds(store.verify())


def test_analytics_slices_check_every_writers_chain_and_refuse_a_tampered_row(
    pg_dsn: str, hdir: Path
) -> None:
    """As the parallel analysis reads it: check_head, then seq slices with check_chain."""
    a, b = _open(pg_dsn, hdir, "node-a"), _open(pg_dsn, hdir, "node-b")
    try:
        for i in range(0, 300, 30):  # interleaved batches: the slices cut both chains
            a.store_batch(make_items(30, start=i))
            b.store_batch(make_items(30, start=10_000 + i))
        last = a.check_head()
        lo, hi = a.seq_bounds()
        assert hi == last
        cuts = [lo, lo + (hi - lo) // 3, lo + 2 * (hi - lo) // 3, hi + 1]
        total = 0
        for start, stop in itertools.pairwise(cuts):
            for ages, _ in a.iter_reading_values(seq_range=(start, stop), check_chain=True):
                total += len(ages)
        assert total == 600
        _sql(
            pg_dsn,
            "UPDATE readings SET chain = sha256(chain) WHERE writer = 'node-b' AND wseq = 200",
        )

        def read_every_slice() -> None:
            for start, stop in itertools.pairwise(cuts):
                for _ in a.iter_reading_values(seq_range=(start, stop), check_chain=True):
                    pass

        with pytest.raises(StoreError, match="chain_mismatch"):
            read_every_slice()
    finally:
        a.close()
        b.close()
