"""The hospital service on the PostgreSQL backend, chosen in hospital.yaml (``store.backend:
postgresql``): the real PQ channel, a real throwaway PostgreSQL, the DSN read from its 0600
file and never logged."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from console.cli import main as pacegate_main
from hospital.config import load_hospital_config
from hospital.pgstore import PostgresReadingStore
from hospital.service import HospitalService, RunningMetrics, run
from hospital.store import open_store
from pacegate.channel import connect
from pacegate.ingest import IngestAck, decode
from pacegate.layout import write_secret
from tests.test_hospital_service import batch, make_work

pytestmark = pytest.mark.integration


def _postgres_store_section(text: str, *, writer: str) -> str:
    """hospital.yaml with its ``store:`` section switched to the PostgreSQL backend."""
    section = (
        "store:\n"
        "  backend: postgresql\n"
        "  dsn_file: hospital/pg.dsn\n"
        f"  writer: {writer}\n"
        "  keyring: hospital/keyring.json\n"
    )
    return re.sub(r"^store:\n(?:[ #].*\n)*", section, text, count=1, flags=re.M)


async def test_hospital_service_on_postgresql_stores_a_batch_and_acknowledges_it(
    tmp_path: Path, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    work, ids = make_work(tmp_path / "work")
    work.hospital_config.write_text(
        _postgres_store_section(work.hospital_config.read_text(), writer="hospital-1")
    )
    write_secret(work.hospital_dir / "pg.dsn", pg_dsn.encode() + b"\n")
    cfg = load_hospital_config(work.hospital_config, require_channel_files=True)
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_ready(service: HospitalService, server: asyncio.Server, m: RunningMetrics) -> None:
        assert isinstance(service.store, PostgresReadingStore)
        ready.set_result(server.sockets[0].getsockname()[1])

    caplog.set_level(logging.DEBUG)
    task = asyncio.create_task(run(cfg, stop, on_ready=on_ready))
    try:
        waiters: set[asyncio.Future[Any]] = {ready, task}
        done, _ = await asyncio.wait(waiters, timeout=60, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()  # raises the startup error
        port = ready.result()
        async with await connect(
            "127.0.0.1",
            port,
            identity=ids.gateway,
            server_name="hospital",
            server_key=ids.hospital.public_key,
            handshake_timeout=10,
        ) as gw:
            await gw.send(batch(1, 30))
            assert decode(await gw.recv()) == IngestAck(1, stored=30, duplicates=0)
            await gw.send(batch(1, 30))  # resent, as after a lost ACK
            assert decode(await gw.recv()) == IngestAck(1, stored=0, duplicates=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
    # another node's view: the rows are in PostgreSQL, under this writer, and verify
    with open_store(load_hospital_config(work.hospital_config)) as store:
        assert isinstance(store, PostgresReadingStore)
        assert store.count() == 30
        report = store.verify()
        assert report.ok, report.problems
    # the operator's commands open the same backend from the same file
    config = str(work.hospital_config)
    assert pacegate_main(["hospital", "verify", "-c", config]) == 0
    assert pacegate_main(["hospital", "rotate-key", "-c", config]) == 0
    out = tmp_path / "export.jsonl"
    assert pacegate_main(["hospital", "export", "-c", config, "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 30
    password = re.search(r"password=(\S+)", pg_dsn)
    assert password is not None
    assert password.group(1) not in caplog.text  # the DSN's secret never reaches a log
    assert not (work.hospital_dir / "readings.db").exists()  # nothing went to SQLite
