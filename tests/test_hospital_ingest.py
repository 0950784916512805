"""The hospital's per-message logic: BATCH in, ACK out only after commit; garbage refused.

Real SQLite, real Fernet, real Prometheus HTTP endpoint; no channel needed (see
test_hospital_service.py for the service over real sockets).
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.workdir import WorkLayout, hospital_config_text
from hospital.config import load_hospital_config
from hospital.service import HospitalMetrics, IngestHandler, start_metrics
from hospital.store import SqliteReadingStore
from pacegate.ingest import (
    IngestAck,
    IngestBatch,
    IngestItem,
    IngestWireError,
    decode,
    encode_ack,
    encode_batch,
)
from pacegate.reading import Reading
from tests.support import examples

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def batch(batch_id: int, n: int, start: int = 0) -> IngestBatch:
    items = tuple(
        IngestItem(
            f"pm-{i % 3:04d}", i + 1, Reading(60, 70 + i % 20, 42, T0 + timedelta(seconds=i))
        )
        for i in range(start, start + n)
    )
    return IngestBatch(batch_id, items)


@pytest.fixture
def hdir(tmp_path: Path) -> Path:
    return tmp_path / "hospital"


@pytest.fixture
def handler(hdir: Path) -> Iterator[IngestHandler]:
    store = SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json")
    try:
        yield IngestHandler(store, HospitalMetrics())
    finally:
        store.close()


def sample(h: IngestHandler, name: str, **labels: str) -> float:
    value = h.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_batch_is_acknowledged_only_once_committed(handler: IngestHandler, hdir: Path) -> None:
    ack = decode(handler.handle(encode_batch(batch(7, 40)), "gateway"))
    assert ack == IngestAck(7, stored=40, duplicates=0)
    # another connection (another process, after a crash) already sees every row
    with SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json") as other:
        assert other.count() == 40
    assert sample(handler, "pacegate_hospital_stored_total") == 40


def test_resent_batch_is_acknowledged_as_duplicates_and_stored_once(
    handler: IngestHandler,
) -> None:
    handler.handle(encode_batch(batch(1, 30)), "gateway")
    ack = decode(handler.handle(encode_batch(batch(2, 50)), "gateway"))
    assert ack == IngestAck(2, stored=20, duplicates=30)
    assert handler.store.count() == 50
    assert sample(handler, "pacegate_hospital_duplicates_total") == 30


def test_ack_sent_by_a_gateway_is_refused_and_counted(handler: IngestHandler) -> None:
    with pytest.raises(IngestWireError):
        handler.handle(encode_ack(IngestAck(1, 1, 0)), "gateway")
    assert sample(handler, "pacegate_hospital_rejected_total", reason="unexpected_ack") == 1
    assert handler.store.count() == 0


def test_truncated_batch_is_refused_logged_and_nothing_stored(
    handler: IngestHandler, caplog: pytest.LogCaptureFixture
) -> None:
    raw = encode_batch(batch(3, 10))
    with caplog.at_level(logging.WARNING, "pacegate.security"), pytest.raises(IngestWireError):
        handler.handle(raw[:-4], "gateway")
    assert handler.store.count() == 0
    assert sample(handler, "pacegate_hospital_rejected_total", reason="malformed") == 1
    events = [getattr(r, "fields", {}) for r in caplog.records]
    assert any(
        e.get("event") == "ingest_message_rejected" and e.get("peer") == "gateway" for e in events
    )


def test_conflicting_duplicate_is_counted_as_rejected(handler: IngestHandler) -> None:
    handler.handle(encode_batch(batch(1, 1)), "gateway")
    forged = IngestBatch(2, (IngestItem("pm-0000", 1, Reading(60, 190, 42, T0)),))
    ack = decode(handler.handle(encode_batch(forged), "gateway"))
    assert ack == IngestAck(2, stored=0, duplicates=1)
    assert sample(handler, "pacegate_hospital_rejected_total", reason="conflicting_duplicate") == 1


@settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=300))
def test_garbage_either_parses_or_raises_ingest_wire_error(
    handler: IngestHandler, data: bytes
) -> None:
    try:
        ack = decode(handler.handle(data, "fuzzer"))
    except IngestWireError:
        return
    assert isinstance(ack, IngestAck)


@pytest.mark.integration
def test_metrics_are_served_over_http_on_loopback(handler: IngestHandler, tmp_path: Path) -> None:
    work = WorkLayout(tmp_path / "work")
    work.root.mkdir()
    work.hospital_config.write_text(hospital_config_text(work, metrics_port=0))
    cfg = load_hospital_config(work.hospital_config)
    handler.handle(encode_batch(batch(1, 5)), "gateway")
    running = start_metrics(cfg, handler.metrics)
    try:
        assert running.host == "127.0.0.1"
        assert running.port > 0
        url = f"http://127.0.0.1:{running.port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        running.close()
    assert "pacegate_hospital_stored_total 5.0" in text
    assert "pacegate_hospital_sessions 0.0" in text
