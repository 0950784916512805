"""The hospital service over real sockets: the real PQ channel, real SQLite, real metrics.

Only pinned gateways get a session; garbage closes that session and never the service; a
batch is acknowledged after it is stored, and a re-sent batch is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from console.workdir import WorkLayout, hospital_config_text
from hospital.config import load_hospital_config
from hospital.service import HospitalService, RunningMetrics, run
from hospital.store import SqliteReadingStore
from pacegate.channel import (
    ChannelClosed,
    ChannelError,
    ChannelIdentity,
    ChannelStream,
    connect,
    write_identity,
)
from pacegate.ingest import IngestAck, IngestBatch, IngestItem, decode, encode_batch
from pacegate.reading import Reading

# every test here starts or reaches a process or a server
pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def batch(batch_id: int, n: int, start: int = 0) -> bytes:
    items = tuple(
        IngestItem(f"pm-{i % 4:04d}", i + 1, Reading(70, 60 + i % 30, 5, T0 + timedelta(seconds=i)))
        for i in range(start, start + n)
    )
    return encode_batch(IngestBatch(batch_id, items))


@dataclass
class Ids:
    hospital: ChannelIdentity
    gateway: ChannelIdentity


def make_work(root: Path, *, metrics_port: int = 0, port: int = 0) -> tuple[WorkLayout, Ids]:
    work = WorkLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = Ids(ChannelIdentity.generate("hospital"), ChannelIdentity.generate("gateway"))
    pki = work.pki
    for ident in (ids.hospital, ids.gateway):
        write_identity(ident, pki.channel_key(ident.name), pki.channel_pub(ident.name))
    work.hospital_config.write_text(
        hospital_config_text(work, host="127.0.0.1", port=port, metrics_port=metrics_port)
    )
    return work, ids


@dataclass
class Running:
    work: WorkLayout
    ids: Ids
    port: int
    service: HospitalService
    metrics: RunningMetrics

    async def gateway(self, identity: ChannelIdentity | None = None) -> ChannelStream:
        return await connect(
            "127.0.0.1",
            self.port,
            identity=identity or self.ids.gateway,
            server_name="hospital",
            server_key=self.ids.hospital.public_key,
            handshake_timeout=5,
        )

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics.port}/metrics"
        return str(urllib.request.urlopen(url, timeout=5).read().decode())


@pytest.fixture
async def hospital(tmp_path: Path) -> AsyncIterator[Running]:
    work, ids = make_work(tmp_path / "work")
    cfg = load_hospital_config(work.hospital_config, require_channel_files=True)
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = asyncio.get_running_loop().create_future()

    def on_ready(service: HospitalService, server: asyncio.Server, m: RunningMetrics) -> None:
        port = server.sockets[0].getsockname()[1]
        ready.set_result(Running(work, ids, port, service, m))

    task = asyncio.create_task(run(cfg, stop, on_ready=on_ready))
    try:
        waiters: set[asyncio.Future[Any]] = {ready, task}
        done, _ = await asyncio.wait(waiters, timeout=20, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()  # raises the startup error
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)


async def test_enrolled_gateway_batch_is_stored_then_acknowledged(hospital: Running) -> None:
    async with await hospital.gateway() as gw:
        await gw.send(batch(1, 50))
        ack = decode(await gw.recv())
        # the ACK arrives after the commit: another connection already sees the rows
        with SqliteReadingStore.open(
            hospital.work.hospital_dir / "readings.db", hospital.work.hospital_dir / "keyring.json"
        ) as other:
            assert other.count() == 50
    assert ack == IngestAck(1, stored=50, duplicates=0)
    assert hospital.service.store.count() == 50


async def test_batch_resent_on_a_new_session_is_stored_once(hospital: Running) -> None:
    async with await hospital.gateway() as gw:
        await gw.send(batch(1, 40))
        assert decode(await gw.recv()) == IngestAck(1, 40, 0)
    async with await hospital.gateway() as gw:  # as after a gateway crash before its ACK
        await gw.send(batch(1, 40))
        await gw.send(batch(2, 40, start=20))
        acks = [decode(await gw.recv()), decode(await gw.recv())]
    assert acks == [IngestAck(1, 0, 40), IngestAck(2, 20, 20)]
    assert hospital.service.store.count() == 60
    text = hospital.scrape()
    assert "pacegate_hospital_stored_total 60.0" in text
    assert "pacegate_hospital_duplicates_total 60.0" in text


async def test_unpinned_gateway_is_refused_and_stores_nothing(hospital: Running) -> None:
    impostor = ChannelIdentity.generate("gateway")  # right name, wrong key
    stranger = ChannelIdentity.generate("rogue")  # a name nobody enrolled
    for ident in (impostor, stranger):

        async def send_a_batch(ident: ChannelIdentity = ident) -> None:
            gw = await hospital.gateway(ident)
            await gw.send(batch(1, 5))
            await gw.recv()

        with pytest.raises((ChannelError, ChannelClosed, ConnectionError)):
            await send_a_batch()
    assert hospital.service.store.count() == 0
    rejected = hospital.service.metrics.rejected_by_reason()
    assert sum(rejected.values()) == 2
    assert all(reason.startswith("channel_") for reason in rejected)
    assert 'pacegate_hospital_rejected_total{reason="channel_' in hospital.scrape()


async def test_garbage_message_closes_that_session_and_service_keeps_serving(
    hospital: Running,
) -> None:
    gw = await hospital.gateway()
    await gw.send(b"\x01garbage that is no batch")
    with pytest.raises(ChannelClosed):
        await gw.recv()
    await gw.close()
    # raw TCP garbage before any handshake
    reader, writer = await asyncio.open_connection("127.0.0.1", hospital.port)
    writer.write(os.urandom(4096))
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(4096), timeout=10):
            pass  # the server answers garbage by closing: read() reaches EOF
    writer.close()
    async with await hospital.gateway() as good:
        await good.send(batch(9, 3))
        assert decode(await good.recv()) == IngestAck(9, 3, 0)
    rejected = hospital.service.metrics.rejected_by_reason()
    assert rejected["malformed"] == 1  # the ingest message inside a good session
    assert rejected["channel_malformed"] == 1  # the garbage instead of a handshake
    assert 'pacegate_hospital_rejected_total{reason="malformed"} 1.0' in hospital.scrape()


async def test_sessions_gauge_counts_open_sessions(hospital: Running) -> None:
    async with await hospital.gateway() as a, await hospital.gateway() as b:
        for i, gw in enumerate((a, b)):
            await gw.send(batch(i, 1, start=i))
            await gw.recv()
        assert "pacegate_hospital_sessions 2.0" in hospital.scrape()
    for _ in range(100):
        if "pacegate_hospital_sessions 0.0" in hospital.scrape():
            break
        await asyncio.sleep(0.05)
    assert "pacegate_hospital_sessions 0.0" in hospital.scrape()


# -- the real command, as an operator runs it -----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def hospital_process(
    tmp_path: Path,
) -> Iterator[tuple[WorkLayout, Ids, int, subprocess.Popen[bytes]]]:
    port = free_port()
    work, ids = make_work(tmp_path / "work", port=port, metrics_port=free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "console", "hospital", "-c", str(work.hospital_config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield work, ids, port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


async def test_pacegate_hospital_command_serves_and_stops_cleanly_on_sigterm(
    hospital_process: tuple[WorkLayout, Ids, int, subprocess.Popen[bytes]],
) -> None:
    work, ids, port, proc = hospital_process
    assert proc.poll() is None
    gw = await connect(
        "127.0.0.1",
        port,
        identity=ids.gateway,
        server_name="hospital",
        server_key=ids.hospital.public_key,
    )
    async with gw:
        await gw.send(batch(1, 25))
        assert decode(await gw.recv()) == IngestAck(1, 25, 0)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    verify = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "console", "hospital", "verify", "-c", str(work.hospital_config)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr.decode()
    assert b"verify: OK: 25 rows" in verify.stderr


def decode_batch_items(message: bytes) -> tuple[IngestItem, ...]:
    msg = decode(message)
    assert isinstance(msg, IngestBatch)
    return msg.items


def test_hospital_without_its_chain_head_anchor_refuses_to_start_and_says_how_to_fix(
    tmp_path: Path,
) -> None:
    """Ingesting on would anchor the current head afresh and hide a rollback for good."""
    work, _ = make_work(tmp_path / "work", port=free_port(), metrics_port=free_port())
    cfg = load_hospital_config(work.hospital_config)
    with SqliteReadingStore.open(cfg.sqlite_database, cfg.keyring, cfg.anchor) as store:
        store.store_batch(decode_batch_items(batch(1, 5)))
    cfg.anchor.unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "console", "hospital", "-c", str(work.hospital_config)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert str(cfg.anchor) in err
    assert "anchor" in err
    assert "--reanchor" in err
    assert not cfg.anchor.exists()


async def test_rotate_key_during_live_ingest_loses_nothing_and_leaves_nothing_in_clear(
    hospital: Running,
) -> None:
    """Gateways keep sending while an operator rotates; ingest never stops."""
    hdir = hospital.work.hospital_dir

    async def send_all(first: int, count: int) -> list[IngestAck]:
        acks = []
        async with await hospital.gateway() as gw:
            for b in range(first, first + count):
                await gw.send(batch(b, 50, start=b * 50))
                ack = decode(await gw.recv())
                assert isinstance(ack, IngestAck)
                acks.append(ack)
        return acks

    await send_all(0, 10)  # 500 readings under key 1

    def rotate() -> int:
        with SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json") as op:
            return op.rotate_key(batch_size=25).reencrypted

    acks, reencrypted = await asyncio.gather(send_all(10, 30), asyncio.to_thread(rotate))
    assert reencrypted >= 500
    assert sum(a.stored for a in acks) == 1500
    store = hospital.service.store
    assert isinstance(store, SqliteReadingStore)  # the default backend
    assert store.count() == 2000
    assert store.keyring.versions == [2]
    report = store.verify()
    assert report.ok, report.problems
    # every row reads under key 2 alone, and no file holds a reading in clear
    with sqlite3.connect(hdir / "readings.db") as c:
        assert {v for (v,) in c.execute("SELECT key_version FROM readings")} == {2}
    needles = [b"heart_rate_bpm", b"pm-000", T0.isoformat()[:13].encode()]
    for path in hdir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [n for n in needles if n in data], path.name


async def test_integrity_key_rotation_during_live_ingest_loses_nothing_and_absorbs_resends(
    hospital: Running,
) -> None:
    """Gateways keep sending while the integrity key rotates (ingest waits for the one
    re-keying transaction); batches sent before it and resent after it are duplicates."""
    hdir = hospital.work.hospital_dir

    async def send_all(first: int, count: int) -> list[IngestAck]:
        acks = []
        async with await hospital.gateway() as gw:
            for b in range(first, first + count):
                await gw.send(batch(b, 50, start=b * 50))
                ack = decode(await gw.recv())
                assert isinstance(ack, IngestAck)
                acks.append(ack)
        return acks

    await send_all(0, 10)

    def rotate() -> int | None:
        with SqliteReadingStore.open(hdir / "readings.db", hdir / "keyring.json") as op:
            return op.rotate_key(batch_size=100, integrity=True).new_mac_version

    acks, mac_version = await asyncio.gather(send_all(10, 20), asyncio.to_thread(rotate))
    assert mac_version == 2
    assert sum(a.stored for a in acks) == 1000
    resent = await send_all(0, 30)
    assert (sum(a.stored for a in resent), sum(a.duplicates for a in resent)) == (0, 1500)
    store = hospital.service.store
    assert isinstance(store, SqliteReadingStore)  # the default backend
    assert store.count() == 1500
    assert store.keyring.mac_versions == [2]
    report = store.verify()
    assert report.ok, report.problems
    assert report.head_version == 2
