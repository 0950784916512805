"""The store's integrity beyond one database file: rollback and truncation are caught by the
chain head's anchor outside the database; the integrity key rotates (row keys and chain
re-keyed) and an old keyring then forges nothing; the analysis refuses what verify fails.

Real SQLite files in WAL mode, real crash images (the files as a crash leaves them, copied
while the writer still has them open), real Fernet and HMAC keys, real TenSEAL.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud.worker import CloudSession
from console.cli import main as pacegate_main
from console.workdir import WorkLayout, hospital_config_text
from hospital.analysis.errors import AnalysisError
from hospital.analysis.job import run_analysis_async
from hospital.analysis.settings import AnalysisSettings
from hospital.analysis.transport import LocalTransport
from hospital.anchor import RECORD_SIZE, AnchorError
from hospital.chain import Head
from hospital.config import load_hospital_config
from hospital.keyring import Keyring
from hospital.store import SqliteReadingStore, StoreError
from pacegate.ingest import IngestItem
from pacegate.reading import Reading

T0 = datetime(2025, 6, 1, tzinfo=UTC)


def make_items(n: int, start: int = 0, devices: int = 4) -> list[IngestItem]:
    return [
        IngestItem(
            f"pm-{i % devices:04d}",
            i // devices + 1,
            Reading(30 + i % 60, 50 + i % 90, 77, T0 + timedelta(seconds=i)),
        )
        for i in range(start, start + n)
    ]


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


def kinds(s: SqliteReadingStore) -> list[str]:
    return [p.kind for p in s.verify().problems]


def crash_image(src: Path, dst: Path) -> Path:
    """The hospital directory as a power cut would leave it: database, WAL, anchor and
    keyring copied while the writer still holds them open (no checkpoint, no -shm)."""
    dst.mkdir(mode=0o700)
    for name in ("readings.db", "readings.db-wal", "readings.db-anchor", "keyring.json"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst


def fill_wal(s: SqliteReadingStore, batches: int = 6, size: int = 40) -> None:
    """Some rows checkpointed into the database file, then ``batches`` commits in the WAL."""
    s.store_batch(make_items(size))
    s.checkpoint()
    for b in range(1, batches + 1):
        s.store_batch(make_items(size, start=b * size))


# -- rollback and truncation ---------------------------------------------------------------
@pytest.mark.parametrize("cut", ["zero", "half", "minus_100"])
def test_verify_reports_a_truncated_wal_as_a_rollback(
    store: SqliteReadingStore, hdir: Path, tmp_path: Path, cut: str
) -> None:
    fill_wal(store)
    image = crash_image(hdir, tmp_path / "image")
    wal = image / "readings.db-wal"
    size = wal.stat().st_size
    keep = {"zero": 0, "half": size // 2, "minus_100": size - 100}[cut]
    with open(wal, "r+b") as f:
        f.truncate(keep)
    with SqliteReadingStore.open(image / "readings.db", image / "keyring.json") as damaged:
        assert damaged.count() < 280  # SQLite itself sees nothing wrong: a shorter database
        report = damaged.verify()
    assert [p.kind for p in report.problems] == ["rolled_back"]
    assert report.problems[0].seq == 280  # the anchored row the database no longer reaches
    assert "truncated" in report.problems[0].detail


def test_an_intact_crash_image_verifies(
    store: SqliteReadingStore, hdir: Path, tmp_path: Path
) -> None:
    fill_wal(store)
    image = crash_image(hdir, tmp_path / "image")
    with SqliteReadingStore.open(image / "readings.db", image / "keyring.json") as s:
        assert s.count() == 280
        assert s.verify().ok


def test_a_crash_between_commit_and_anchor_is_not_a_rollback(
    store: SqliteReadingStore, hdir: Path
) -> None:
    """The last batch committed but not anchored (nor acknowledged): the database is ahead
    of its anchor, which is the one state a crash can leave, and verifies."""
    fill_wal(store, batches=2)
    anchor = hdir / "readings.db-anchor"
    data = anchor.read_bytes()
    anchor.write_bytes(data[:-RECORD_SIZE])
    assert store.verify().ok


def test_a_batch_whose_anchor_failed_is_anchored_when_it_comes_back_as_duplicates(
    store: SqliteReadingStore, hdir: Path
) -> None:
    """The commit succeeded, the anchor append did not (here: a directory stands where the
    file was, an error root cannot override either), so no ACK went out; the gateway
    resends, every reading is a duplicate, and the head must be anchored before that ACK."""
    store.store_batch(make_items(20))
    anchor = hdir / "readings.db-anchor"
    anchor.rename(hdir / "aside")
    anchor.mkdir()
    with pytest.raises(IsADirectoryError):
        store.store_batch(make_items(10, start=20))
    anchor.rmdir()
    (hdir / "aside").rename(anchor)
    assert kinds(store) == []  # ahead of the anchor: allowed, but not yet protected
    again = store.store_batch(make_items(10, start=20))
    assert (again.stored, again.duplicates) == (0, 10)
    with sqlite3.connect(hdir / "readings.db", isolation_level=None) as c:
        c.execute("DELETE FROM readings WHERE seq > 20")
        keys = store.keyring.integrity(1)
        (chain,) = c.execute("SELECT chain FROM readings WHERE seq = 20").fetchone()
        c.execute(
            "UPDATE meta SET value = ? WHERE name = 'head'",
            (Head(1, 20, chain, keys.head_mac(20, chain)).encode(),),
        )
    assert kinds(store) == ["rolled_back"]


def test_verify_reports_a_restored_older_copy_of_the_database(
    store: SqliteReadingStore, hdir: Path, tmp_path: Path
) -> None:
    store.store_batch(make_items(50))
    store.checkpoint()
    backup = tmp_path / "backup.db"
    shutil.copy2(hdir / "readings.db", backup)
    store.store_batch(make_items(30, start=50))
    store.close()
    (hdir / "readings.db-wal").unlink(missing_ok=True)
    (hdir / "readings.db-shm").unlink(missing_ok=True)
    shutil.copy2(backup, hdir / "readings.db")
    with SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json") as old:
        report = old.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("rolled_back", 80)]
    assert "rows 51-80 lost" in report.problems[0].detail


def test_verify_reports_a_removed_tail_even_with_a_valid_head(
    store: SqliteReadingStore, hdir: Path
) -> None:
    """Someone holding the keyring deletes the last rows and writes a fresh, valid head:
    inside the database everything agrees; the anchor outside it does not."""
    store.store_batch(make_items(40))
    keys = store.keyring.integrity(store.keyring.current_mac_version)
    with sqlite3.connect(hdir / "readings.db", isolation_level=None) as c:
        c.execute("DELETE FROM readings WHERE seq > 25")
        (chain,) = c.execute("SELECT chain FROM readings WHERE seq = 25").fetchone()
        head = Head(keys.version, 25, chain, keys.head_mac(25, chain))
        c.execute("UPDATE meta SET value = ? WHERE name = 'head'", (head.encode(),))
    assert kinds(store) == ["rolled_back"]


def test_a_missing_anchor_is_reported_and_ingest_refuses_to_hide_it(
    store: SqliteReadingStore, hdir: Path
) -> None:
    store.store_batch(make_items(10))
    (hdir / "readings.db-anchor").unlink()
    assert kinds(store) == ["anchor_missing"]
    with pytest.raises(AnchorError, match="anchor is missing"):
        store.store_batch(make_items(5, start=10))
    assert not (hdir / "readings.db-anchor").exists()  # never silently re-created


def test_reanchor_accepts_a_deliberate_restore_but_not_a_damaged_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = WorkLayout(tmp_path / "work")
    work.root.mkdir()
    work.hospital_config.write_text(hospital_config_text(work, port=0, metrics_port=0))
    cfg = load_hospital_config(work.hospital_config)
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring) as s:
        s.store_batch(make_items(30))
        with sqlite3.connect(cfg.sqlite_database, isolation_level=None) as c:
            c.execute("DELETE FROM readings WHERE seq > 20")
            keys = s.keyring.integrity(1)
            (chain,) = c.execute("SELECT chain FROM readings WHERE seq = 20").fetchone()
            c.execute(
                "UPDATE meta SET value = ? WHERE name = 'head'",
                (Head(1, 20, chain, keys.head_mac(20, chain)).encode(),),
            )
    verify = ["hospital", "verify", "-c", str(work.hospital_config)]
    assert pacegate_main(verify) == 1
    assert pacegate_main([*verify, "--reanchor"]) == 0
    assert "it named row 30 before" in capsys.readouterr().err
    assert pacegate_main(verify) == 0
    with sqlite3.connect(cfg.sqlite_database, isolation_level=None) as c:
        c.execute("DELETE FROM readings WHERE seq = 5")
    assert pacegate_main([*verify, "--reanchor"]) == 1
    assert "does not verify" in capsys.readouterr().err


def test_a_store_from_before_the_anchor_is_anchored_when_opened(
    store: SqliteReadingStore, hdir: Path
) -> None:
    """Schema 1 (a head without version, no anchor) and keyring format 1 (one mac_key)."""
    store.store_batch(make_items(12))
    store.close()
    ring = json.loads((hdir / "keyring.json").read_text())
    ring["format_version"] = 1
    ring["mac_key"] = ring.pop("mac_keys")[0]["key"]
    (hdir / "keyring.json").write_text(json.dumps(ring))
    with sqlite3.connect(hdir / "readings.db", isolation_level=None) as c:
        (head,) = c.execute("SELECT value FROM meta WHERE name = 'head'").fetchone()
        c.execute("UPDATE meta SET value = ? WHERE name = 'head'", (head[4:],))
        c.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (bytes(3) + b"\x01",))
        c.execute("DELETE FROM meta WHERE name = 'anchored'")
    (hdir / "readings.db-anchor").unlink()
    with SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json") as old:
        assert (hdir / "readings.db-anchor").exists()
        assert old.verify().ok
        assert old.store_batch(make_items(12)).duplicates == 12
        old.store_batch(make_items(3, start=12))
        assert old.verify().ok


# -- the integrity key rotates ---------------------------------------------------------------
def test_integrity_rotation_rekeys_every_row_and_a_duplicate_after_it_is_absorbed(
    store: SqliteReadingStore, hdir: Path
) -> None:
    items = make_items(120)
    store.store_batch(items)
    with sqlite3.connect(hdir / "readings.db") as c:
        before = {rk for (rk,) in c.execute("SELECT row_key FROM readings")}
    report = store.rotate_key(integrity=True, batch_size=50)
    assert (report.new_mac_version, report.retired_mac) == (2, [1])
    assert Keyring.load(hdir / "keyring.json").mac_versions == [2]
    with sqlite3.connect(hdir / "readings.db") as c:
        after = {rk for (rk,) in c.execute("SELECT row_key FROM readings")}
    assert not before & after  # every row key is new
    assert store.verify().ok
    again = store.store_batch(items[100:] + make_items(5, start=120))
    assert (again.stored, again.duplicates) == (5, 20)
    assert store.verify().ok
    assert store.count() == 125


def test_an_old_keyring_after_integrity_rotation_links_no_row_and_forges_no_head(
    store: SqliteReadingStore, hdir: Path
) -> None:
    items = make_items(60)
    store.store_batch(items)
    leaked = Keyring.load(hdir / "keyring.json")  # the thief's copy, before rotation
    old = leaked.integrity(1)
    store.rotate_key(integrity=True)
    with sqlite3.connect(hdir / "readings.db", isolation_level=None) as c:
        row_keys = {rk for (rk,) in c.execute("SELECT row_key FROM readings")}
        # (device, counter) -> row: the old key links none of them any more
        assert not {old.row_key(i.device_id, i.counter) for i in items} & row_keys
        # delete a tail and seal a fresh head with the old key, anchor included, labelled
        # with the database's current version
        c.execute("DELETE FROM readings WHERE seq > 40")
        (chain,) = c.execute("SELECT chain FROM readings WHERE seq = 40").fetchone()
        forged = Head(2, 40, chain, old.head_mac(40, chain))
        c.execute("UPDATE meta SET value = ? WHERE name = 'head'", (forged.encode(),))
    record = SqliteReadingStore._anchor_record(old, 40, chain)
    with open(hdir / "readings.db-anchor", "wb") as f:
        f.write(type(record)(2, 40, chain, record.mac).encode())
    assert kinds(store) == ["head_mismatch", "anchor_damaged"]


def test_integrity_rotation_refuses_a_damaged_chain_and_changes_nothing(
    store: SqliteReadingStore, hdir: Path
) -> None:
    store.store_batch(make_items(30))
    with sqlite3.connect(hdir / "readings.db", isolation_level=None) as c:
        c.execute("DELETE FROM readings WHERE seq = 9")
        snapshot = c.execute("SELECT seq, row_key, chain FROM readings ORDER BY seq").fetchall()
    with pytest.raises(StoreError, match=r"row 10: missing_rows.*nothing changed"):
        store.rotate_key(integrity=True)
    with sqlite3.connect(hdir / "readings.db") as c:
        assert c.execute("SELECT seq, row_key, chain FROM readings ORDER BY seq").fetchall() == (
            snapshot
        )
    assert 1 in Keyring.load(hdir / "keyring.json").mac_versions
    assert {"missing_rows"} <= set(kinds(store))


def test_integrity_rotation_while_another_store_ingests_loses_nothing(hdir: Path) -> None:
    db, ring = hdir / "readings.db", hdir / "keyring.json"
    service = SqliteReadingStore.open(db, ring)
    service.store_batch(make_items(400))
    errors: list[BaseException] = []
    done = threading.Event()

    def ingest() -> None:
        start = 400
        try:
            while not done.is_set() or start < 800:
                service.store_batch(make_items(20, start=start))
                start += 20
                if start >= 1600:
                    return
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        with SqliteReadingStore.open(db, ring) as operator:
            report = operator.rotate_key(integrity=True, batch_size=50)
    finally:
        done.set()
        worker.join(timeout=120)
    assert not errors
    assert report.new_mac_version == 2
    total = service.count()
    assert service.store_batch(make_items(total)).duplicates == total
    assert service.verify().ok
    service.close()


# -- the analysis checks the chain of what it reads ------------------------------------------
def analysis_work(root: Path, n: int) -> tuple[WorkLayout, Path]:
    work = WorkLayout(root)
    root.mkdir(parents=True)
    work.hospital_config.write_text(hospital_config_text(work, port=0, metrics_port=0))
    cfg = load_hospital_config(work.hospital_config)
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring) as s:
        for i in range(0, n, 200):
            s.store_batch(make_items(200, start=i))
    return work, cfg.sqlite_database


def _delete(c: sqlite3.Connection) -> None:
    c.execute("DELETE FROM readings WHERE seq = 150")


def _swap(c: sqlite3.Connection) -> None:
    (a,) = c.execute("SELECT token FROM readings WHERE seq = 300").fetchone()
    (b,) = c.execute("SELECT token FROM readings WHERE seq = 301").fetchone()
    c.execute("UPDATE readings SET token = ? WHERE seq = 300", (b,))
    c.execute("UPDATE readings SET token = ? WHERE seq = 301", (a,))


def _copy(c: sqlite3.Connection) -> None:
    (token,) = c.execute("SELECT token FROM readings WHERE seq = 20").fetchone()
    c.execute("UPDATE readings SET token = ? WHERE seq = 21", (token,))


def _truncate_tail(c: sqlite3.Connection) -> None:
    c.execute("DELETE FROM readings WHERE seq > 500")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_delete, r"row 151: missing_rows"),
        (_swap, r"row 300: row_key_mismatch"),
        (_copy, r"row 21: row_key_mismatch"),
        (_truncate_tail, r"head_mismatch"),
    ],
    ids=["deleted", "swapped", "copied", "truncated"],
)
async def test_analysis_refuses_a_store_that_verify_fails(
    tmp_path: Path, damage: object, expected: str
) -> None:
    work, db = analysis_work(tmp_path / "w", 600)
    with sqlite3.connect(db, isolation_level=None) as c:
        damage(c)  # type: ignore[operator]
    cfg = load_hospital_config(work.hospital_config)
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring) as s:
        assert not s.verify().ok
    with pytest.raises(AnalysisError, match=expected):
        await run_analysis_async(
            work.hospital_config,
            settings=AnalysisSettings(workers=0),
            transport=LocalTransport(CloudSession().handle),
        )


@pytest.mark.integration
async def test_analysis_in_decrypting_processes_refuses_a_damaged_slice_boundary(
    tmp_path: Path,
) -> None:
    """Row 250 ends a slice: only the next slice, starting from the row before it, sees
    that it is gone."""
    work, db = analysis_work(tmp_path / "w", 600)
    with sqlite3.connect(db, isolation_level=None) as c:
        c.execute("DELETE FROM readings WHERE seq = 250")
    settings = AnalysisSettings(workers=1, chunk_rows=250, parallel_min_rows=0)
    with pytest.raises(AnalysisError, match=r"row 251: missing_rows"):
        await run_analysis_async(
            work.hospital_config, settings=settings, transport=LocalTransport(CloudSession().handle)
        )


async def test_analysis_of_a_whole_store_says_it_covers_every_checked_row(tmp_path: Path) -> None:
    work, _ = analysis_work(tmp_path / "w", 400)
    report = await run_analysis_async(
        work.hospital_config,
        settings=AnalysisSettings(workers=0),
        transport=LocalTransport(CloudSession().handle),
    )
    scope = report.to_json()["scope"]
    assert scope == {"store_rows": 400, "chain_verified": True, "since": None, "until": None}
    assert report.plain.n == 400


def test_demo_report_says_whether_the_analysis_covers_this_run_or_the_whole_store() -> None:
    from console.demo import _analysis_covers

    scope = {"scope": {"store_rows": 500, "chain_verified": True}}
    assert _analysis_covers(scope, 500).startswith("this run: the store holds only its 500")
    covers = _analysis_covers(scope, 120)
    assert covers.startswith("the whole store: 500 readings, of which 120 were stored by this run")
    assert _analysis_covers({}, 3) == ""


def test_a_rollback_of_database_and_anchor_together_shows_only_against_a_recorded_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = WorkLayout(tmp_path / "work")
    work.root.mkdir()
    work.hospital_config.write_text(hospital_config_text(work, port=0, metrics_port=0))
    cfg = load_hospital_config(work.hospital_config)
    verify = ["hospital", "verify", "--json", "-c", str(work.hospital_config)]
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring) as s:
        s.store_batch(make_items(30))
        s.checkpoint()
    backup = crash_image(cfg.sqlite_database.parent, tmp_path / "backup")
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring) as s:
        s.store_batch(make_items(20, start=30))
    assert pacegate_main(verify) == 0
    recorded = json.loads(capsys.readouterr().out)["head"]
    assert recorded.startswith("1:50:")
    for name in ("readings.db", "readings.db-anchor"):  # both files, from the same backup
        shutil.copy2(backup / name, cfg.sqlite_database.parent / name)
    (cfg.sqlite_database.parent / "readings.db-wal").unlink(missing_ok=True)
    assert pacegate_main(verify) == 0  # the limit of an anchor beside the database
    capsys.readouterr()
    assert pacegate_main([*verify, "--expect-head", recorded]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["kind"], p["seq"]) for p in problems] == [("behind_recorded_head", 50)]
    # a recorded head of a chain rewritten below it
    forged = recorded[:-1] + ("0" if recorded[-1] != "0" else "1")
    assert pacegate_main([*verify, "--expect-head", "1:30:" + forged.split(":")[2]]) == 1
    assert "recorded_head_mismatch" in capsys.readouterr().out
    assert pacegate_main([*verify, "--expect-head", "not-a-head"]) == 2
