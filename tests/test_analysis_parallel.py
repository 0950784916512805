"""Row decryption in other processes: the same batches and the same statistics as a
sequential scan; store slices by sequence number; the lean value scan; failures in a
decrypting process surface in the analysis. Real SQLite, real Fernet, real spawned
processes, real TenSEAL against the real cloud session (in memory)."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud.worker import CloudSession
from console.workdir import WorkLayout, hospital_config_text
from hospital.analysis.errors import AnalysisError
from hospital.analysis.job import run_analysis_async
from hospital.analysis.settings import AnalysisSettings
from hospital.analysis.transport import LocalTransport
from hospital.config import load_hospital_config
from hospital.store import SqliteReadingStore, StoreError
from pacegate.ingest import IngestItem
from pacegate.reading import Reading

T0 = datetime(2025, 5, 1, tzinfo=UTC)


def make_work(root: Path, n: int) -> tuple[WorkLayout, Path]:
    """A work directory whose store holds ``n`` readings, a few of them implausible."""
    work = WorkLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    work.hospital_config.write_text(
        hospital_config_text(work, port=0, metrics_port=0, cloud_port=1)
    )
    cfg = load_hospital_config(work.hospital_config)
    rng = random.Random(5)
    items = []
    for i in range(n):
        hr = 900 if i % 97 == 0 else rng.randint(40, 150)  # glitches: left out
        reading = Reading(rng.randint(18, 95), hr, 3, T0 + timedelta(minutes=i))
        items.append(IngestItem(f"pm-{i % 7:04d}", i, reading))
    store = SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring)
    try:
        for i in range(0, n, 500):
            store.store_batch(items[i : i + 500])
    finally:
        store.close()
    return work, cfg.sqlite_database


@pytest.mark.integration
async def test_parallel_decryption_gives_the_batches_and_statistics_of_a_sequential_scan(
    tmp_path: Path,
) -> None:
    work, _ = make_work(tmp_path, 2600)
    period = {"since": T0 + timedelta(minutes=150), "until": T0 + timedelta(minutes=2450)}
    reports = []
    for workers in (0, 2):
        settings = AnalysisSettings(
            bands=(0, 45, 70), batch_size=1000, workers=workers, chunk_rows=333,
            parallel_min_rows=0,
        )  # fmt: skip
        reports.append(
            await run_analysis_async(
                work.hospital_config,
                settings=settings,
                transport=LocalTransport(CloudSession().handle),
                **period,
            )
        )
    sequential, parallel = reports
    assert sequential.timings.row_workers == 0
    assert parallel.timings.row_workers == 2
    assert parallel.failures() == []
    assert sequential.failures() == []
    assert parallel.plain == sequential.plain  # exact sums: the same readings, once each
    assert parallel.plain.n + parallel.excluded_implausible == 2300
    assert parallel.excluded_implausible == sequential.excluded_implausible > 0
    assert parallel.batches == sequential.batches == 3  # batches re-cut as in a sequential scan
    assert parallel.timings.decrypt_rows > 0


@pytest.mark.integration
async def test_a_row_failing_in_a_decrypting_process_fails_the_analysis_naming_it(
    tmp_path: Path,
) -> None:
    work, db = make_work(tmp_path, 1200)
    with sqlite3.connect(db) as conn:
        (token,) = conn.execute("SELECT token FROM readings WHERE seq = 777").fetchone()
        bad = token[:60] + bytes([token[60] ^ 1]) + token[61:]
        conn.execute("UPDATE readings SET token = ? WHERE seq = 777", (bad,))
    settings = AnalysisSettings(workers=2, chunk_rows=250, parallel_min_rows=0)
    with pytest.raises(AnalysisError, match=r"rows 751\.\.1000.*row 777 does not decrypt"):
        await run_analysis_async(
            work.hospital_config, settings=settings, transport=LocalTransport(CloudSession().handle)
        )


def test_seq_range_reads_exactly_its_slice_and_bounds_are_cheap(tmp_path: Path) -> None:
    work, _ = make_work(tmp_path / "w", 1000)
    cfg = load_hospital_config(work.hospital_config)
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring) as store:
        assert store.seq_bounds() == (1, 1000)
        every = [r for b in store.iter_readings(batch_size=64) for r in b]
        sliced = [r for b in store.iter_readings(batch_size=64, seq_range=(101, 351)) for r in b]
        assert sliced == every[100:350]
        assert list(store.iter_records(seq_range=(1001, 2000))) == []
    with SqliteReadingStore.open(tmp_path / "e" / "r.db", tmp_path / "e" / "k.json") as empty:
        assert empty.seq_bounds() == (0, 0)


def test_value_scan_yields_the_ages_and_heart_rates_of_iter_readings(tmp_path: Path) -> None:
    work, _ = make_work(tmp_path, 900)
    cfg = load_hospital_config(work.hospital_config)
    since, until = T0 + timedelta(minutes=10), T0 + timedelta(minutes=800)
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring) as store:
        for kwargs in ({}, {"since": since, "until": until}, {"seq_range": (200, 640)}):
            want = [
                (r.age, r.heart_rate_bpm)
                for b in store.iter_readings(batch_size=100, **kwargs)  # type: ignore[arg-type]
                for r in b
            ]
            got = [
                pair
                for ages, rates in store.iter_reading_values(batch_size=100, **kwargs)  # type: ignore[arg-type]
                for pair in zip(ages, rates, strict=True)
            ]
            assert got == want
            assert got


def test_value_scan_names_a_row_that_does_not_decrypt(tmp_path: Path) -> None:
    work, db = make_work(tmp_path, 300)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE readings SET token = ? WHERE seq = 123", (b"gAAAAAgarbage",))
    cfg = load_hospital_config(work.hospital_config)
    store = SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring)
    with store, pytest.raises(StoreError, match="row 123 does not decrypt"):
        list(store.iter_reading_values())


def test_workers_is_read_from_hospital_yaml_and_a_negative_count_names_the_key(
    tmp_path: Path,
) -> None:
    from hospital.analysis.settings import parse_analysis_settings
    from pacegate.errors import ConfigError

    work = WorkLayout(tmp_path)
    text = hospital_config_text(work, port=0, metrics_port=0, cloud_port=1)
    for value, expected in (("0", 0), ("3", 3)):
        work.hospital_config.write_text(
            text.replace("analysis: {}", f"analysis: {{workers: {value}}}")
        )
        cfg = load_hospital_config(work.hospital_config)
        assert parse_analysis_settings(cfg.analysis).workers == expected
    work.hospital_config.write_text(text.replace("analysis: {}", "analysis: {workers: -1}"))
    with pytest.raises(ConfigError, match="workers"):
        parse_analysis_settings(load_hospital_config(work.hospital_config).analysis)
