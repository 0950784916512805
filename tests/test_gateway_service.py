"""The gateway against a real broker: sealed readings opened, every attack refused and counted.

Real parts: the PKI from ``pacegate pki``, the embedded amqtt broker and Debian's mosquitto as
subprocesses, paho clients with device certificates, the gateway's own paho client over mTLS,
SQLite replay state and the encrypted spool. The hospital is not running in this file, so
accepted readings end in the spool, where the tests read them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from console.workdir import WorkLayout, gateway_config_text
from gateway.config import GatewayConfig, load_gateway_config
from gateway.forwarder import Connector
from gateway.pipeline import Accepted, Rejected
from gateway.service import Gateway
from gateway.spool import Spool
from pacegate.identity import telemetry_topic
from pacegate.ingest import IngestItem
from pacegate.layout import PkiLayout
from pacegate.reading import Reading
from pacegate.sealed import new_epoch, seal_reading
from tests.support import BrokerHandle, MqttClient, connect_as, free_port, wait_until

WAIT = 15.0


def write_gateway_yaml(
    work: Path, broker: BrokerHandle, *, hospital_port: int | None = None, **replace: str
) -> Path:
    """A gateway.yaml for ``work`` (whose ``pki/`` is the test PKI) and ``broker``."""
    text = gateway_config_text(
        WorkLayout(work),
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        hospital_host="127.0.0.1",
        hospital_port=hospital_port or free_port(),  # nothing listens: hospital is down
        metrics_port=0,
    )
    for old, new in replace.items():
        text = text.replace(old, new)
    path = work / "gateway.yaml"
    path.write_text(text)
    return path


class RunningGateway:
    """A :class:`Gateway` on its own asyncio loop in a thread, as the service runs it."""

    def __init__(self, cfg: GatewayConfig, connector: Connector | None = None) -> None:
        self.gw = Gateway(cfg, connector=connector, use_channel=connector is not None)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert wait_until(lambda: self.gw.metrics_port is not None or self.error, WAIT)
        if self.error is not None:
            raise self.error
        assert wait_until(lambda: self.metric("pacegate_gateway_mqtt_connected") == 1, WAIT)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.gw.run(self._stop))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self._loop.close()

    def metric(self, name: str, **labels: str) -> float:
        return self.gw.metrics.value(name, **labels)

    def rejected(self, reason: str) -> float:
        return self.metric("pacegate_gateway_rejected_total", reason=reason)

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.gw.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def call(self, fn: Callable[[], object]) -> None:
        self._loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(20)
        assert not self._thread.is_alive(), "gateway did not stop"
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def running_gateway(config: Path, connector: Connector | None = None) -> Iterator[RunningGateway]:
    gw = RunningGateway(load_gateway_config(config), connector)
    try:
        yield gw
    finally:
        gw.stop()


class Device:
    """A simulated pacemaker as the tests need it: its cert, its PSK, its own counter."""

    def __init__(self, broker: BrokerHandle, device_id: str) -> None:
        self.id = device_id
        self.psk = broker.pki.device_psk(device_id).read_bytes()
        self.topic = telemetry_topic(device_id)
        self.counter = 0
        self.epoch = new_epoch()  # this "boot" of the device (sealed-reading v2)
        outcome, client = connect_as(broker, device_id)
        assert client is not None, outcome
        self.client: MqttClient = client

    def seal(self, hr: int = 72, counter: int | None = None) -> bytes:
        if counter is None:
            self.counter += 1
            counter = self.counter
        reading = Reading(age=64, heart_rate_bpm=hr, sensor_id=7, timestamp=datetime.now(UTC))
        return seal_reading(self.psk, self.id, counter, reading, epoch=self.epoch)

    def publish(self, payload: bytes, topic: str | None = None) -> None:
        self.client.publish(topic or self.topic, payload, qos=1)

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def devices(broker: BrokerHandle, *ids: str) -> Iterator[list[Device]]:
    devs = [Device(broker, i) for i in ids]
    try:
        yield devs
    finally:
        for d in devs:
            d.close()


def spooled(cfg_path: Path) -> list[IngestItem]:
    cfg = load_gateway_config(cfg_path)
    spool = Spool(cfg.spool.path, cfg.spool.key, max_readings=cfg.spool.max_readings)
    try:
        return spool.items()
    finally:
        spool.close()


@pytest.mark.integration
def test_readings_from_devices_are_opened_by_the_gateway(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    config = write_gateway_yaml(tmp_path, broker)
    with running_gateway(config) as gw, devices(broker, "pm-0001", "pm-0002") as (a, b):
        for _ in range(5):
            a.publish(a.seal(hr=70))
            b.publish(b.seal(hr=300))  # implausible: flagged, not dropped
        assert wait_until(lambda: gw.metric("pacegate_gateway_accepted_total") == 10, WAIT)
        assert wait_until(lambda: gw.metric("pacegate_gateway_spooled") == 10, WAIT)
        text = gw.scrape()
        assert "pacegate_gateway_received_total 10.0" in text
        assert "pacegate_gateway_flagged_total 5.0" in text
        assert "pacegate_gateway_receive_latency_seconds_count 10.0" in text
    items = spooled(config)
    got = sorted((i.device_id, i.counter, i.reading.heart_rate_bpm, i.flags) for i in items)
    want = sorted(
        [("pm-0001", c, 70, 0) for c in range(1, 6)] + [("pm-0002", c, 300, 1) for c in range(1, 6)]
    )
    assert got == want


@pytest.mark.integration
def test_attacks_are_rejected_and_counted_while_the_gateway_stays_up(
    broker: BrokerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pacegate.pki import enroll_device

    # the gateway's key store is a copy taken before pm-0009 is enrolled: unknown to it
    pki = PkiLayout(tmp_path / "pki")
    gw_store = tmp_path / "gw-keystore"
    shutil.copytree(pki.keystore_dir, gw_store)
    enroll_device(pki.root, "pm-0009")
    edits: dict[str, Any] = {
        "path: pki/keystore/psk.store": f"path: {gw_store}/psk.store",
        "key: pki/keystore/psk.key": f"key: {gw_store}/psk.key",
    }
    config = write_gateway_yaml(tmp_path, broker, **edits)
    with (
        running_gateway(config) as gw,
        devices(broker, "pm-0001", "pm-0002", "pm-0009") as (a, b, stranger),
    ):
        good = a.seal()
        a.publish(good)
        assert wait_until(lambda: gw.metric("pacegate_gateway_accepted_total") == 1, WAIT)

        flipped = bytearray(a.seal())
        flipped[-1] ^= 0x80
        a.publish(bytes(flipped))
        a.publish(a.seal()[:-5])  # truncated
        a.publish(good)  # replayed
        b.publish(a.seal())  # pm-0001's payload moved to pm-0002's topic
        stranger.publish(stranger.seal())  # enrolled at the broker, unknown to the gateway
        a.publish(b"\x01" * 200)  # oversized for the route (96 bytes)
        a.publish(b"\x07" + a.seal()[1:])  # a version nobody speaks

        expected = {
            "bad_tag": 2,
            "malformed": 1,
            "replay": 1,
            "unknown_device": 1,
            "oversized": 1,
            "unsupported_version": 1,
        }
        assert wait_until(lambda: all(gw.rejected(r) == n for r, n in expected.items()), WAIT), {
            r: gw.rejected(r) for r in expected
        }
        # still up, still opening readings
        a.publish(a.seal())
        assert wait_until(lambda: gw.metric("pacegate_gateway_accepted_total") == 2, WAIT)
        text = gw.scrape()
        assert 'pacegate_gateway_rejected_total{reason="bad_tag"} 2.0' in text
        assert gw.metric("pacegate_gateway_received_total") == 9
        assert wait_until(lambda: gw.metric("pacegate_gateway_spooled") == 2, WAIT)
    assert len(spooled(config)) == 2
    events = [
        r for r in caplog.records if getattr(r, "fields", {}).get("event") == "reading_rejected"
    ]
    assert len(events) == sum(expected.values())
    secrets = (a.psk.hex(), good.hex(), bytes(flipped).hex(), "heart_rate")
    for record in events:
        text = f"{record.getMessage()} {record.fields}"  # type: ignore[attr-defined]
        assert not any(s in text for s in secrets), text


@pytest.mark.integration
def test_replay_state_survives_a_gateway_restart(
    embedded_broker: BrokerHandle, tmp_path: Path
) -> None:
    config = write_gateway_yaml(tmp_path, embedded_broker)
    with devices(embedded_broker, "pm-0001") as (a,):
        payloads = [a.seal() for _ in range(3)]
        with running_gateway(config) as gw:
            for p in payloads:
                a.publish(p)
            assert wait_until(lambda: gw.metric("pacegate_gateway_spooled") == 3, WAIT)
        with running_gateway(config) as gw2:
            for p in payloads:
                a.publish(p)
            a.publish(a.seal())
            assert wait_until(lambda: gw2.rejected("replay") == 3, WAIT)
            assert wait_until(lambda: gw2.metric("pacegate_gateway_accepted_total") == 1, WAIT)
            assert wait_until(lambda: gw2.metric("pacegate_gateway_spooled") == 4, WAIT)
    assert [i.counter for i in spooled(config)] == [1, 2, 3, 4]


@pytest.mark.integration
def test_invalid_edit_keeps_the_old_config_and_a_valid_one_applies(
    embedded_broker: BrokerHandle, tmp_path: Path
) -> None:
    config = write_gateway_yaml(tmp_path, embedded_broker)
    original = config.read_text()
    with running_gateway(config) as gw, devices(embedded_broker, "pm-0001") as (a,):
        config.write_text(original.replace("pacemakers/+/telemetry", "pacemakers/pm+/telemetry"))
        gw.call(gw.gw.request_reload)  # what SIGHUP does
        assert wait_until(
            lambda: gw.metric("pacegate_gateway_config_reloads_total", result="invalid") >= 1, WAIT
        )
        a.publish(a.seal())
        assert wait_until(lambda: gw.metric("pacegate_gateway_accepted_total") == 1, WAIT)

        # a valid edit, picked up from the file's mtime alone: a route limit of 30 bytes
        time.sleep(0.01)
        config.write_text(original.replace("max_payload_bytes: 96", "max_payload_bytes: 30"))
        assert wait_until(
            lambda: gw.metric("pacegate_gateway_config_reloads_total", result="applied") >= 1, WAIT
        )
        a.publish(a.seal())
        assert wait_until(lambda: gw.rejected("oversized") == 1, WAIT)


@pytest.mark.integration
def test_newly_enrolled_device_is_accepted_without_a_restart(
    embedded_broker: BrokerHandle, tmp_path: Path
) -> None:
    from pacegate.pki import enroll_device

    config = write_gateway_yaml(tmp_path, embedded_broker)
    with running_gateway(config) as gw:
        enroll_device(tmp_path / "pki", "pm-0042")  # rewrites the PSK store
        with devices(embedded_broker, "pm-0042") as (d,):
            d.publish(d.seal())  # at once: no waiting for the watcher's poll
            assert wait_until(lambda: gw.metric("pacegate_gateway_accepted_total") == 1, WAIT)
        assert gw.rejected("unknown_device") == 0


def test_reading_published_right_after_enrolment_is_not_refused_as_unknown(
    pki_dir: Path, tmp_path: Path
) -> None:
    """The PSK store is re-checked before ``unknown_device``: no poll interval to lose it in.
    The gateway is built but not run, so no watcher can reload the store first."""
    from pacegate.pki import enroll_device

    text = gateway_config_text(
        WorkLayout(tmp_path),
        mqtt_host="127.0.0.1",
        mqtt_port=free_port(),
        hospital_host="127.0.0.1",
        hospital_port=free_port(),
        metrics_port=0,
    )
    (tmp_path / "gateway.yaml").write_text(text)
    gw = Gateway(load_gateway_config(tmp_path / "gateway.yaml"), use_channel=False)
    try:
        topic = telemetry_topic("pm-0042")
        reading = Reading(age=64, heart_rate_bpm=72, sensor_id=7, timestamp=datetime.now(UTC))
        stranger = gw.decide(
            topic, seal_reading(bytes(32), "pm-0042", 1, reading, epoch=new_epoch())
        )
        assert isinstance(stranger, Rejected)
        assert stranger.reason == "unknown_device"

        enroll_device(pki_dir, "pm-0042")  # rewrites the PSK store
        psk = PkiLayout(pki_dir).device_psk("pm-0042").read_bytes()
        result = gw.decide(topic, seal_reading(psk, "pm-0042", 1, reading, epoch=new_epoch()))
        assert isinstance(result, Accepted), result
        # still unknown after the check: refused for good (acknowledged, not left queued)
        other = gw.decide(
            telemetry_topic("pm-0099"), seal_reading(psk, "pm-0099", 1, reading, epoch=new_epoch())
        )
        assert isinstance(other, Rejected)
        assert other.reason == "unknown_device"
        assert not gw.refresh_keys()  # unchanged file: no reload
    finally:
        gw.spool.close()
        gw.replay.close()


def test_older_psk_store_put_back_after_a_revocation_is_refused_and_the_device_stays_refused(
    pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway is built but not run: its reload and decision seams, called directly."""
    from pacegate.errors import ConfigError
    from pacegate.pki import revoke_device

    text = gateway_config_text(
        WorkLayout(tmp_path),
        mqtt_host="127.0.0.1",
        mqtt_port=free_port(),
        hospital_host="127.0.0.1",
        hospital_port=free_port(),
        metrics_port=0,
    )
    (tmp_path / "gateway.yaml").write_text(text)
    pki = PkiLayout(pki_dir)
    psk = pki.device_psk("pm-0001").read_bytes()
    topic = telemetry_topic("pm-0001")
    epoch = new_epoch()
    reading = Reading(age=64, heart_rate_bpm=72, sensor_id=7, timestamp=datetime.now(UTC))
    old_store = pki.psk_store.read_bytes()
    gw = Gateway(load_gateway_config(tmp_path / "gateway.yaml"), use_channel=False)
    try:
        assert isinstance(
            gw.decide(topic, seal_reading(psk, "pm-0001", 1, reading, epoch=epoch)), Accepted
        )
        revoke_device(pki_dir, "pm-0001")
        assert gw.refresh_keys()
        refused = gw.decide(topic, seal_reading(psk, "pm-0001", 2, reading, epoch=epoch))
        assert isinstance(refused, Rejected)
        assert refused.reason == "revoked_device"

        pki.psk_store.write_bytes(old_store)  # the copy in which pm-0001 is active
        assert not gw.refresh_keys()
        assert gw.metrics.value("pacegate_gateway_psk_store_reloads_total", result="refused") == 1
        assert "older copy of the store was put back" in caplog.text
        still = gw.decide(topic, seal_reading(psk, "pm-0001", 3, reading, epoch=epoch))
        assert isinstance(still, Rejected)
        assert still.reason == "revoked_device"
    finally:
        gw.spool.close()
        gw.replay.close()
    # and a gateway started on that file refuses to start, naming the file and the fix
    with pytest.raises(ConfigError, match="older copy of the store was put back") as err:
        Gateway(load_gateway_config(tmp_path / "gateway.yaml"), use_channel=False)
    assert str(pki.psk_store) in str(err.value)
    assert "newest psk.store" in str(err.value)


def test_a_route_left_on_sealed_reading_v1_is_named_at_start_with_the_fix(
    pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway.yaml written before v2 keeps ``format: sealed-reading/v1``: updated devices'
    readings would all be refused, so the gateway says so when it starts."""
    text = gateway_config_text(
        WorkLayout(tmp_path),
        mqtt_host="127.0.0.1",
        mqtt_port=free_port(),
        hospital_host="127.0.0.1",
        hospital_port=free_port(),
        metrics_port=0,
    ).replace("format: sealed-reading/v2", "format: sealed-reading/v1")
    (tmp_path / "gateway.yaml").write_text(text)
    gw = Gateway(load_gateway_config(tmp_path / "gateway.yaml"), use_channel=False)
    try:
        assert "opens sealed-reading v1 only" in caplog.text
        assert "format: sealed-reading/v2" in caplog.text
        assert "gateway.yaml" in caplog.text
        psk = PkiLayout(pki_dir).device_psk("pm-0001").read_bytes()
        reading = Reading(age=64, heart_rate_bpm=72, sensor_id=7, timestamp=datetime.now(UTC))
        v2 = seal_reading(psk, "pm-0001", 1, reading, epoch=new_epoch())
        refused = gw.decide(telemetry_topic("pm-0001"), v2)
        assert isinstance(refused, Rejected)
        assert refused.reason == "unsupported_version"
    finally:
        gw.spool.close()
        gw.replay.close()
