"""``pacegate hospital export``: every stored reading once, in clear, only from a store whose
chain verifies (or, with ``--allow-damaged``, with each damaged row marked). Real SQLite,
real Fernet keys, the real command line."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from console.cli import main as pacegate_main
from console.workdir import WorkLayout, hospital_config_text
from hospital.config import load_hospital_config
from hospital.store import SqliteReadingStore
from pacegate.ingest import FLAG_IMPLAUSIBLE, IngestItem
from pacegate.reading import Reading

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def work(tmp_path: Path) -> WorkLayout:
    w = WorkLayout(tmp_path / "work")
    w.root.mkdir()
    w.hospital_config.write_text(
        hospital_config_text(
            w, host="127.0.0.1", port=18884, metrics_port=0, cloud_host="127.0.0.1", cloud_port=1
        )
    )
    return w


def items(n: int, devices: int = 3) -> list[IngestItem]:
    out = []
    for i in range(n):
        hr = 300 if i == 4 else 60 + i  # one implausible reading, flagged at ingest
        out.append(
            IngestItem(
                f"pm-{i % devices:04d}",
                i // devices + 1,
                Reading(50 + i, hr, 9000 + i % devices, T0 + timedelta(seconds=i)),
                FLAG_IMPLAUSIBLE if i == 4 else 0,
            )
        )
    return out


def fill(work: WorkLayout, data: list[IngestItem]) -> Path:
    cfg = load_hospital_config(work.hospital_config)
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring) as s:
        s.store_batch(data)
    return cfg.sqlite_database


def export(
    work: WorkLayout, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str]:
    code = pacegate_main(["hospital", "export", "-c", str(work.hospital_config), *extra])
    got = capsys.readouterr()
    return code, got.out, got.err


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_export_writes_every_reading_once_with_device_counter_fields_and_flag(
    work: WorkLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    data = items(12)
    fill(work, data)
    code, out, err = export(work, capsys)
    assert code == 0, err
    rows = jsonl(out)
    assert [(r["device_id"], r["counter"]) for r in rows] == [
        (i.device_id, i.counter) for i in data
    ]
    for row, item in zip(rows, data, strict=True):
        assert row["age"] == item.reading.age
        assert row["heart_rate_bpm"] == item.reading.heart_rate_bpm
        assert row["sensor_id"] == item.reading.sensor_id
        assert datetime.fromisoformat(row["timestamp"]) == item.reading.timestamp
        assert row["implausible"] is bool(item.flags & FLAG_IMPLAUSIBLE)
        assert row["damage"] == []
    assert [r["seq"] for r in rows] == list(range(1, 13))
    assert "12 readings to stdout (clear text" in err


def test_export_csv_has_a_header_and_the_same_rows_as_jsonl(
    work: WorkLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(work, items(7))
    _, as_jsonl, _ = export(work, capsys)
    code, as_csv, err = export(work, capsys, "--format", "csv")
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(as_csv)))
    expected = jsonl(as_jsonl)
    assert [(r["device_id"], int(r["counter"]), int(r["heart_rate_bpm"])) for r in table] == [
        (r["device_id"], r["counter"], r["heart_rate_bpm"]) for r in expected
    ]
    assert [r["implausible"] for r in table] == ["1" if r["implausible"] else "0" for r in expected]
    assert {r["damage"] for r in table} == {""}


def test_export_since_until_selects_the_period(
    work: WorkLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    data = items(20)
    fill(work, data)
    since = (T0 + timedelta(seconds=5)).isoformat()
    until = (T0 + timedelta(seconds=9)).isoformat()
    code, out, err = export(work, capsys, "--since", since, "--until", until)
    assert code == 0, err
    assert [r["seq"] for r in jsonl(out)] == [6, 7, 8, 9]


def test_export_refuses_a_store_whose_chain_does_not_verify(
    work: WorkLayout, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = fill(work, items(10))
    with sqlite3.connect(db, isolation_level=None) as c:
        c.execute("DELETE FROM readings WHERE seq = 4")
    code, out, err = export(work, capsys)
    assert code == 1
    assert out == ""  # not one reading from a store the chain no longer vouches for
    assert "export refused" in err
    assert "row 5: missing_rows: row 4 deleted" in err
    assert "--allow-damaged" in err
    target = tmp_path / "readings.jsonl"
    code, _, _ = export(work, capsys, "--out", str(target))
    assert code == 1
    assert not target.exists()
    assert list(tmp_path.glob(".readings.jsonl*")) == []  # no partial file left behind


def test_export_allow_damaged_marks_each_damaged_row(
    work: WorkLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    db = fill(work, items(10))
    with sqlite3.connect(db, isolation_level=None) as c:
        c.execute("DELETE FROM readings WHERE seq = 4")
        (t7,) = c.execute("SELECT token FROM readings WHERE seq = 7").fetchone()
        (t8,) = c.execute("SELECT token FROM readings WHERE seq = 8").fetchone()
        c.execute("UPDATE readings SET token = ? WHERE seq = 7", (t8,))
        c.execute("UPDATE readings SET token = ? WHERE seq = 8", (t7,))
        c.execute("UPDATE readings SET token = X'00' WHERE seq = 10")
    code, out, err = export(work, capsys, "--allow-damaged")
    assert code == 0, err
    rows = {r["seq"]: r for r in jsonl(out)}
    assert sorted(rows) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert "missing_rows" in rows[5]["damage"]
    assert "row_key_mismatch" in rows[7]["damage"]
    assert "row_key_mismatch" in rows[8]["damage"]
    assert rows[10]["damage"] == ["undecryptable"]
    assert rows[10]["device_id"] is None
    assert [s for s, r in rows.items() if not r["damage"]] == [1, 2, 3, 6, 9]
    assert "4 marked damaged" in err
    assert "verify: FAILED" in err


def test_export_out_file_is_owner_only_and_complete(
    work: WorkLayout, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fill(work, items(9))
    target = tmp_path / "export.csv"
    code, out, err = export(work, capsys, "--format", "csv", "--out", str(target))
    assert code == 0, err
    assert out == ""
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(target.read_text().splitlines()) == 1 + 9
