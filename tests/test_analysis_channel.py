"""End to end over the real post-quantum channel: the real SQLite store (Fernet at rest)
-> hospital analysis -> ML-KEM/ML-DSA channel -> cloud worker -> back, real TenSEAL."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud.config import load_cloud_config
from cloud.worker import WorkerStats, start_worker
from console.workdir import WorkLayout, cloud_config_text, hospital_config_text
from hospital.analysis.errors import AnalysisError
from hospital.analysis.job import run_analysis_async
from hospital.analysis.settings import AnalysisSettings
from hospital.store import SqliteReadingStore
from pacegate import analytics_wire as wire
from pacegate import ckks
from pacegate.channel import (
    ChannelClosed,
    ChannelError,
    ChannelIdentity,
    connect,
    load_identity,
    load_public_key,
    write_identity,
)
from pacegate.ingest import IngestItem
from pacegate.reading import Reading

# every test here starts or reaches a process or a server
pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, tzinfo=UTC)


def make_workdir(root: Path) -> WorkLayout:
    work = WorkLayout(root)
    for name in ("hospital", "cloud", "intruder"):
        write_identity(
            ChannelIdentity.generate(name), work.pki.channel_key(name), work.pki.channel_pub(name)
        )
    work.cloud_config.write_text(cloud_config_text(work, host="127.0.0.1", port=0))
    return work


def fill_store(work: WorkLayout, n: int) -> None:
    from hospital.config import load_hospital_config

    cfg = load_hospital_config(work.hospital_config)
    store = SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring)
    rng = random.Random(11)
    try:
        items = []
        for i in range(n):
            age = rng.randint(20, 90)
            hr = rng.randint(45, 140)
            reading = Reading(age, hr, 7, T0 + timedelta(minutes=i))
            items.append(IngestItem(f"pm-{i % 5:04d}", i, reading))
        for i in range(0, n, 500):
            store.store_batch(items[i : i + 500])
    finally:
        store.close()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[WorkLayout, int, WorkerStats]]:
    work = make_workdir(tmp_path)
    stats = WorkerStats()
    server = await start_worker(load_cloud_config(work.cloud_config), stats=stats)
    port = server.sockets[0].getsockname()[1]
    work.hospital_config.write_text(
        hospital_config_text(work, port=0, metrics_port=0, cloud_port=port)
    )
    try:
        yield work, port, stats
    finally:
        server.close()
        await server.wait_closed()


async def test_analysis_over_the_pq_channel_matches_plaintext(
    stack: tuple[WorkLayout, int, WorkerStats],
) -> None:
    work, _port, stats = stack
    fill_store(work, 1500)
    report = await run_analysis_async(
        work.hospital_config,
        since=T0 + timedelta(minutes=100),
        until=T0 + timedelta(minutes=1300),
        settings=AnalysisSettings(bands=(0, 50), batch_size=700),
    )
    assert report.failures() == []
    assert report.plain.n == 1200  # [since, until) selects 1200 of the 1500 rows
    assert report.encrypted["count"] == pytest.approx(1200, abs=1e-3)
    assert report.batches == 2
    assert stats.sessions == 1
    assert stats.batches == 2
    assert not stats.refused


async def test_secret_context_over_the_channel_is_refused_and_worker_keeps_serving(
    stack: tuple[WorkLayout, int, WorkerStats],
) -> None:
    work, port, stats = stack
    identity = load_identity(work.pki.channel_key("hospital"), "hospital")
    server_key = load_public_key(work.pki.channel_pub("cloud"))
    ctx = ckks.create_context()
    stream = await connect(
        "127.0.0.1", port, identity=identity, server_name="cloud", server_key=server_key
    )
    try:
        await stream.send(wire.encode(wire.Open(1, ctx.serialize(save_secret_key=True))))
        reply = wire.decode(await stream.recv())
    finally:
        await stream.close()
    assert isinstance(reply, wire.Error)
    assert reply.code == "secret_key_in_context"
    assert stats.refused["secret_key_in_context"] == 1
    fill_store(work, 300)
    report = await run_analysis_async(work.hospital_config, settings=AnalysisSettings(bands=(0,)))
    assert report.ok
    assert report.plain.n == 300


async def test_unpinned_client_cannot_open_an_analysis_session(
    stack: tuple[WorkLayout, int, WorkerStats],
) -> None:
    work, port, stats = stack
    intruder = load_identity(work.pki.channel_key("intruder"), "intruder")
    server_key = load_public_key(work.pki.channel_pub("cloud"))

    async def open_a_session() -> None:
        stream = await connect(
            "127.0.0.1", port, identity=intruder, server_name="cloud", server_key=server_key
        )
        await stream.send(wire.encode(wire.Open(1, b"x")))
        await stream.recv()

    with pytest.raises((ChannelError, ChannelClosed)):
        await open_a_session()
    assert stats.sessions == 0


async def test_unreachable_worker_is_a_clear_error(tmp_path: Path) -> None:
    work = make_workdir(tmp_path)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    work.hospital_config.write_text(
        hospital_config_text(work, port=0, metrics_port=0, cloud_port=free_port)
    )
    fill_store(work, 10)
    with pytest.raises(AnalysisError, match="cannot reach the cloud worker"):
        await run_analysis_async(work.hospital_config)
