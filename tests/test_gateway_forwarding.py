"""Forwarding that loses nothing: gateway -> PQ channel -> the real hospital service.

Every reading a device got a PUBACK for is stored exactly once at the hospital, whether the
hospital was down for a while, killed mid-stream, or the gateway itself was ``kill -9``-ed.
The hospital runs as its own process (``python -m console hospital``), the broker is the
embedded one, the gateway runs in-process or, for ``kill -9``, as its own process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from console.workdir import WorkLayout
from gateway.service import hospital_connector
from tests.support import BrokerHandle, free_port, wait_for_port, wait_until
from tests.test_gateway_service import (
    WAIT,
    Device,
    devices,
    running_gateway,
    spooled,
    write_gateway_yaml,
)

# every test here starts or reaches a process or a server
pytestmark = pytest.mark.integration

DRAIN_WAIT = 60.0


@dataclass
class Hospital:
    work: Path
    port: int
    metrics_port: int
    config: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.work / "hospital.log", "ab")  # noqa: SIM115 (kept by the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "console", "hospital", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port("127.0.0.1", self.port)
        wait_for_port("127.0.0.1", self.metrics_port)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def stored(self) -> int:
        """Rows in the hospital's database (across hospital restarts), read-only."""
        db = WorkLayout(self.work).hospital_dir / "readings.db"
        if not db.exists():
            return 0
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])
        except sqlite3.OperationalError:  # not created yet, or busy
            return -1

    def records(self) -> list[tuple[str, int]]:
        from hospital.config import load_hospital_config
        from hospital.store import open_store

        store = open_store(load_hospital_config(self.config))
        try:
            return [(r.device_id, r.counter) for b in store.iter_records() for r in b]
        finally:
            store.close()


@contextlib.contextmanager
def hospital(work: Path, *, start: bool = True) -> Iterator[Hospital]:
    from console.workdir import hospital_config_text

    layout = WorkLayout(work)
    port, metrics_port = free_port(), free_port()
    layout.hospital_config.write_text(
        hospital_config_text(layout, port=port, metrics_port=metrics_port, cloud_port=free_port())
    )
    h = Hospital(work, port, metrics_port, layout.hospital_config)
    if start:
        h.start()
    try:
        yield h
    finally:
        h.kill(signal.SIGTERM)


class Publisher:
    """A device publishing ``total`` readings in a thread, counting the broker's PUBACKs."""

    def __init__(self, device: Device, total: int, interval: float = 0.002) -> None:
        self.device = device
        self.total = total
        self.interval = interval
        self.sent: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for _ in range(self.total):
            if self._stop.wait(self.interval):
                return
            payload = self.device.seal()
            self.device.publish(payload)  # returns once the broker has it (PUBACK)
            self.sent.append(self.device.counter)

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive()


def test_readings_are_stored_at_the_hospital_exactly_once(
    embedded_broker: BrokerHandle, tmp_path: Path
) -> None:
    with hospital(tmp_path) as h:
        config = write_gateway_yaml(tmp_path, embedded_broker, hospital_port=h.port)
        from gateway.config import load_gateway_config

        connector = hospital_connector(load_gateway_config(config))
        assert connector is not None
        with (
            running_gateway(config, connector) as gw,
            devices(embedded_broker, "pm-0001", "pm-0002") as (a, b),
        ):
            for _ in range(40):
                a.publish(a.seal())
                b.publish(b.seal(hr=10))  # implausible: flagged and stored
            assert wait_until(lambda: gw.metric("pacegate_gateway_forwarded_total") == 80, WAIT)
            assert gw.metric("pacegate_gateway_spooled") == 0
            assert gw.metric("pacegate_gateway_hospital_connected") == 1
        assert h.stored() == 80
        h.kill(signal.SIGTERM)
        records = h.records()
    want = {(d, c) for d in ("pm-0001", "pm-0002") for c in range(1, 41)}
    assert sorted(records) == sorted(want)


def test_hospital_outage_spools_encrypted_and_drains_exactly_once(
    embedded_broker: BrokerHandle, tmp_path: Path
) -> None:
    from gateway.config import load_gateway_config

    with hospital(tmp_path, start=False) as h:
        config = write_gateway_yaml(
            tmp_path,
            embedded_broker,
            hospital_port=h.port,
            **{"reconnect_max_s: 10": "reconnect_max_s: 0.5"},
        )
        cfg = load_gateway_config(config)
        connector = hospital_connector(cfg)
        with (
            running_gateway(config, connector) as gw,
            devices(embedded_broker, "pm-0001") as (a,),
        ):
            # 1. the hospital is down: readings are acknowledged once spooled
            for _ in range(30):
                a.publish(a.seal(hr=77))
            assert wait_until(lambda: gw.metric("pacegate_gateway_spooled") == 30, WAIT)
            blobs = b"".join(
                p.read_bytes() for p in cfg.state_dir.iterdir() if p.name.startswith("spool")
            )
            assert b"pm-0001" not in blobs  # no device id in clear
            for item in spooled(config):
                assert item.reading.to_bytes() not in blobs  # no reading in clear
            # 2. it comes back: the spool drains, oldest first
            h.start()
            assert wait_until(lambda: gw.metric("pacegate_gateway_spooled") == 0, DRAIN_WAIT)
            assert wait_until(lambda: h.stored() == 30, WAIT)
            # 3. it is killed mid-stream, then restarted
            pub = Publisher(a, 60)
            assert wait_until(lambda: h.stored() >= 40, WAIT)
            h.kill(signal.SIGKILL)
            pub.join()
            h.start()
            assert wait_until(lambda: h.stored() == 90, DRAIN_WAIT), h.stored()
            assert wait_until(lambda: gw.metric("pacegate_gateway_spooled") == 0, WAIT)
        h.kill(signal.SIGTERM)
        records = h.records()
    assert sorted(records) == [("pm-0001", c) for c in range(1, 91)]
    assert [c for _, c in records[:30]] == list(range(1, 31))  # drained in order


def _gateway_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "console", "gateway", "-c", str(config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


# Both brokers: the embedded one keeps a QoS 1 message in the gateway's session until its
# PUBACK and resends it on reconnect (broker.delivery; stock amqtt 0.12 forgot it).
@pytest.mark.timeout(180)
def test_gateway_kill_9_mid_stream_loses_nothing(broker: BrokerHandle, tmp_path: Path) -> None:
    metrics_port = free_port()
    want = {(d, c) for d in ("pm-0001", "pm-0002") for c in range(1, 151)}
    with hospital(tmp_path) as h:
        config = write_gateway_yaml(
            tmp_path,
            broker,
            hospital_port=h.port,
            **{"  port: 0\n": f"  port: {metrics_port}\n"},
        )
        log = tmp_path / "gateway.log"
        gw = _gateway_process(config, log)
        try:
            wait_for_port("127.0.0.1", metrics_port)
            with devices(broker, "pm-0001", "pm-0002") as (a, b):
                pubs = [Publisher(a, 150, 0.01), Publisher(b, 150, 0.01)]
                assert wait_until(lambda: h.stored() >= 60, WAIT), log.read_text()
                os.kill(gw.pid, signal.SIGKILL)
                gw.wait(timeout=10)
                if broker.kind == "mosquitto":
                    for p in pubs:
                        p.join()  # the broker keeps acking the devices meanwhile
                # (the embedded broker acknowledges end to end: the devices wait for the
                # restarted gateway, test_broker_e2e_ack.py)
                stored_while_down = h.stored()
                assert stored_while_down < 300
                gw = _gateway_process(config, log)
                for p in pubs:
                    p.join()
                if not wait_until(lambda: h.stored() == 300, DRAIN_WAIT):
                    h.kill(signal.SIGTERM)
                    missing = sorted(set(want) - set(h.records()))
                    raise AssertionError(f"missing {missing}\n{log.read_text()[-3000:]}")
        finally:
            if gw.poll() is None:
                gw.terminate()
                gw.wait(timeout=20)
        h.kill(signal.SIGTERM)
        records = h.records()
    assert len(records) == 300
    assert set(records) == want


def test_full_spool_pauses_mqtt_and_loses_nothing(broker: BrokerHandle, tmp_path: Path) -> None:
    from gateway.config import load_gateway_config

    with hospital(tmp_path, start=False) as h:
        config = write_gateway_yaml(
            tmp_path,
            broker,
            hospital_port=h.port,
            **{
                "batch_max_readings: 200": "batch_max_readings: 5",
                "reconnect_max_s: 10": "reconnect_max_s: 0.5",
                "max_readings: 1000000": "max_readings: 10",
            },
        )
        connector = hospital_connector(load_gateway_config(config))
        with (
            running_gateway(config, connector) as gw,
            devices(broker, "pm-0001") as (a,),
        ):
            for _ in range(25):
                a.publish(a.seal())
            assert wait_until(lambda: gw.metric("pacegate_gateway_spool_full_total") >= 1, WAIT)
            assert wait_until(lambda: gw.metric("pacegate_gateway_mqtt_connected") == 0, WAIT)
            assert gw.metric("pacegate_gateway_spooled") <= 10
            h.start()  # the spool drains, MQTT resumes, the broker hands over the rest
            assert wait_until(lambda: h.stored() == 25, DRAIN_WAIT), h.stored()
            assert wait_until(lambda: gw.metric("pacegate_gateway_mqtt_connected") == 1, WAIT)
        h.kill(signal.SIGTERM)
        records = h.records()
    assert sorted(records) == [("pm-0001", c) for c in range(1, 26)]


def test_gateway_fails_over_to_a_second_hospital_node_when_the_first_dies(
    embedded_broker: BrokerHandle, tmp_path: Path
) -> None:
    """Two hospital ingest nodes (each its own process and database, the same pinned
    identity), the second in ``hospital.failover``. The first is SIGKILLed mid-stream; the
    gateway's next connect goes to the second, and every acknowledged reading is stored on
    one node or the other (a batch the first never acknowledged is resent to the second)."""
    second = tmp_path / "hospital-2"
    second.mkdir()
    (second / "pki").symlink_to(WorkLayout(tmp_path).pki.root, target_is_directory=True)
    with hospital(tmp_path) as h1, hospital(second) as h2:
        config = write_gateway_yaml(tmp_path, embedded_broker, hospital_port=h1.port)
        text = config.read_text()
        anchor = f"  port: {h1.port}\n"
        assert anchor in text
        config.write_text(
            text.replace(
                anchor, f"{anchor}  failover:\n    - host: 127.0.0.1\n      port: {h2.port}\n"
            )
        )
        from gateway.config import load_gateway_config

        cfg = load_gateway_config(config)
        assert cfg.hospital.endpoints == (("127.0.0.1", h1.port), ("127.0.0.1", h2.port))
        connector = hospital_connector(cfg)
        assert connector is not None
        with running_gateway(config, connector) as gw, devices(embedded_broker, "pm-0001") as (a,):
            for _ in range(30):
                a.publish(a.seal())
            assert wait_until(lambda: h1.stored() == 30, WAIT)
            h1.kill(signal.SIGKILL)
            for _ in range(30):
                a.publish(a.seal())
            assert wait_until(lambda: gw.metric("pacegate_gateway_forwarded_total") >= 60, WAIT)
            assert wait_until(lambda: h2.stored() >= 30, WAIT)
        h2.kill(signal.SIGTERM)
        stored = set(h2.records())
        h1_rows = Hospital(tmp_path, h1.port, h1.metrics_port, h1.config).records()
    assert {("pm-0001", c) for c in range(31, 61)} <= stored
    assert set(h1_rows) | stored == {("pm-0001", c) for c in range(1, 61)}


def test_hospital_route_tries_the_node_that_worked_then_the_others_in_order() -> None:
    from gateway.service import HospitalRoute

    route = HospitalRoute((("h1", 1), ("h2", 2), ("h3", 3)))
    assert route.attempts() == [("h1", 1), ("h2", 2), ("h3", 3)]
    route.failed()  # h1 down: the walk goes on to h2, which answers
    route.connected()
    assert route.attempts() == [("h2", 2), ("h3", 3), ("h1", 1)]  # h2 first next time
