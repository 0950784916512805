"""Simulated pacemakers against the real brokers: sealed readings the gateway can open,
no nonce reused across a SIGKILL, reconnection after a broker restart, many devices."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest

from console.workdir import WorkLayout
from device_sim.device import Endpoint
from device_sim.fleet import run_fleet, select_devices
from device_sim.model import HeartModel
from pacegate.errors import ConfigError
from pacegate.identity import TELEMETRY_FILTER
from pacegate.layout import PkiLayout
from pacegate.sealed import open_reading
from tests.support import BrokerHandle, MqttClient, connect_as, embedded_broker, wait_until

REPO = Path(__file__).resolve().parents[1]


def _gateway_subscriber(broker: BrokerHandle) -> MqttClient:
    outcome, client = connect_as(broker, "gateway")
    assert outcome.connected, outcome.reason
    assert client is not None
    assert client.subscribe(TELEMETRY_FILTER, qos=1) == [1]
    return client


def _open_all(pki: PkiLayout, messages: list[tuple[str, bytes]]) -> dict[str, list[int]]:
    """Open every message with its device's PSK (as the gateway does); counters per device."""
    counters: dict[str, list[int]] = defaultdict(list)
    for topic, payload in messages:
        device_id = topic.split("/")[1]
        counter, _reading = open_reading(pki.device_psk(device_id).read_bytes(), device_id, payload)
        counters[device_id].append(counter)
    return counters


def _devices_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "console", "devices", "--workdir", str(workdir), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def _endpoints(work: WorkLayout, broker: BrokerHandle) -> None:
    work.endpoints.write_text(json.dumps({"mqtt": {"host": broker.host, "port": broker.port}}))


@pytest.mark.integration
async def test_devices_publish_sealed_readings_that_open_with_their_psk(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    work = WorkLayout(tmp_path)  # conftest's PKI is tmp_path/pki
    subscriber = _gateway_subscriber(broker)
    try:
        summary = await run_fleet(
            work.pki,
            count=3,
            rate=10.0,
            duration=1.0,
            endpoints=[Endpoint(broker.host, broker.port)],
        )
        assert summary.connected == 3
        assert summary.acknowledged > 0
        assert summary.produced == summary.acknowledged + summary.failed + summary.dropped
        assert wait_until(lambda: len(subscriber.messages) >= summary.acknowledged)
        with subscriber.lock:
            messages = list(subscriber.messages)
    finally:
        subscriber.close()
    counters = _open_all(work.pki, messages)
    assert set(counters) == {"pm-0001", "pm-0002", "pm-0003"}
    for device_id, seen in counters.items():
        assert seen == sorted(seen), f"{device_id} counters out of order"
    # the readings are the wearer's: age and sensor id of the seeded model
    topic, payload = messages[0]
    device_id = topic.split("/")[1]
    _, reading = open_reading(work.pki.device_psk(device_id).read_bytes(), device_id, payload)
    patient = HeartModel(device_id, seed=0).patient
    assert (reading.age, reading.sensor_id) == (patient.age, patient.sensor_id)
    assert reading.plausible


@pytest.mark.integration
def test_cli_prints_one_json_summary_and_reads_endpoints_json(
    embedded_broker: BrokerHandle, tmp_path: Path
) -> None:
    work = WorkLayout(tmp_path)
    _endpoints(work, embedded_broker)
    gateway = _gateway_subscriber(embedded_broker)  # PUBACKs are end to end
    try:
        proc = _devices_cli(tmp_path, "--count", "2", "--rate", "5", "--duration", "1", "--json")
    finally:
        gateway.close()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert set(summary) >= {
        "devices",
        "connected",
        "sent",
        "acknowledged",
        "failed",
        "dropped",
        "duration_s",
    }
    assert summary["devices"] == summary["connected"] == 2
    assert summary["acknowledged"] > 0


@pytest.mark.integration
def test_cli_exits_nonzero_when_nothing_is_acknowledged(pki_dir: Path, tmp_path: Path) -> None:
    from tests.support import free_port

    work = WorkLayout(tmp_path)
    work.endpoints.write_text(json.dumps({"mqtt": {"host": "127.0.0.1", "port": free_port()}}))
    proc = _devices_cli(tmp_path, "--count", "1", "--rate", "5", "--duration", "0.5", "--json")
    assert proc.returncode == 1
    summary = json.loads(proc.stdout)
    assert summary["acknowledged"] == 0
    assert summary["connected"] == 0
    assert "no reading was acknowledged" in proc.stderr


@pytest.mark.integration
def test_too_few_enrolled_devices_fails_naming_the_enroll_command(
    pki_dir: Path, tmp_path: Path
) -> None:
    proc = _devices_cli(tmp_path, "--count", "5")
    assert proc.returncode == 2
    assert "only 3 active devices are enrolled" in proc.stderr
    assert f"pacegate pki enroll DEVICE_ID --dir {pki_dir}" in proc.stderr


@pytest.mark.integration
def test_device_without_its_counter_file_stops_the_run_naming_the_rekey_command(
    pki: PkiLayout, tmp_path: Path
) -> None:
    pki.device_counter("pm-0002").unlink()
    proc = _devices_cli(tmp_path, "--count", "3", "--rate", "5", "--duration", "1")
    assert proc.returncode == 2, proc.stderr
    assert str(pki.device_counter("pm-0002")) in proc.stderr
    assert f"pacegate pki rekey-device pm-0002 --dir {pki.root}" in proc.stderr
    assert not pki.device_counter("pm-0002").exists()  # never silently re-created


def test_revoked_devices_are_not_simulated(pki: PkiLayout) -> None:
    from pacegate.pki import revoke_device

    revoke_device(pki.root, "pm-0001")
    assert select_devices(pki, 2) == ["pm-0002", "pm-0003"]
    with pytest.raises(ConfigError, match="only 2 active devices"):
        select_devices(pki, 3)


def _ceilings(pki: PkiLayout, ids: list[str]) -> dict[str, int]:
    from device_sim.counter import CounterStore

    return {d: CounterStore(pki.device_counter(d), d).ceiling for d in ids}


@pytest.mark.integration
def test_simulator_killed_mid_run_and_restarted_never_reuses_a_nonce(
    embedded_broker: BrokerHandle, tmp_path: Path
) -> None:
    work = WorkLayout(tmp_path)
    _endpoints(work, embedded_broker)
    ids = ["pm-0001", "pm-0002", "pm-0003"]
    subscriber = _gateway_subscriber(embedded_broker)
    # small blocks: the kill lands after several reservations, mid-block
    argv = [sys.executable, "-m", "console", "devices", "--workdir", str(tmp_path)]
    argv += ["--count", "3", "--rate", "40", "--counter-block", "16", "--json"]
    try:
        first = subprocess.Popen(
            [*argv, "--duration", "60"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert wait_until(lambda: len(subscriber.messages) >= 150, timeout=30)
        finally:
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
        ceilings_at_kill = _ceilings(work.pki, ids)
        seen_before_restart = len(subscriber.messages)
        second = subprocess.run(
            [*argv, "--duration", "1"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 0, second.stderr
        acknowledged = json.loads(second.stdout)["acknowledged"]
        assert wait_until(lambda: len(subscriber.messages) >= seen_before_restart + acknowledged)
        with subscriber.lock:
            messages = list(subscriber.messages)
    finally:
        subscriber.close()

    # every (device, counter) - that is every nonce - appears once, whatever run it came from
    payload_of: dict[tuple[str, int], bytes] = {}
    for topic, payload in messages:
        device_id = topic.split("/")[1]
        counter, _ = open_reading(work.pki.device_psk(device_id).read_bytes(), device_id, payload)
        assert (device_id, counter) not in payload_of, f"nonce reused: {device_id} #{counter}"
        payload_of[device_id, counter] = payload
    # and the restarted run resumed above the ceiling persisted before the kill
    for device_id in ids:
        counters = sorted(c for d, c in payload_of if d == device_id)
        before = [c for c in counters if c <= ceilings_at_kill[device_id]]
        after = [c for c in counters if c > ceilings_at_kill[device_id]]
        assert before, f"{device_id}: both runs must have published"
        assert after, f"{device_id}: both runs must have published"
        assert ceilings_at_kill[device_id] > 16  # several blocks were reserved before the kill


@pytest.mark.integration
async def test_devices_reconnect_after_the_broker_restarts_and_deliver_their_buffer(
    pki_dir: Path, tmp_path: Path
) -> None:
    work = WorkLayout(tmp_path)
    first = embedded_broker(pki_dir, tmp_path / "broker-1")
    broker = await asyncio.to_thread(first.__enter__)
    endpoint = Endpoint(broker.host, broker.port)
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(work.pki, count=3, rate=10.0, duration=60.0, endpoints=[endpoint], stop=stop)
    )
    second = None
    subscriber = None
    try:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(first.__exit__, None, None, None)
        outage_from = datetime.now(UTC)
        await asyncio.sleep(1.0)
        outage_to = datetime.now(UTC)
        second = embedded_broker(pki_dir, tmp_path / "broker-2", port=broker.port)
        restarted = await asyncio.to_thread(second.__enter__)
        subscriber = await asyncio.to_thread(_gateway_subscriber, restarted)

        def all_devices_back() -> bool:
            assert subscriber is not None
            with subscriber.lock:
                return len({t for t, _ in subscriber.messages}) == 3

        assert await asyncio.to_thread(wait_until, all_devices_back, 30.0)
        stop.set()
        summary = await fleet
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await fleet
        if subscriber is not None:
            subscriber.close()
        if second is not None:
            await asyncio.to_thread(second.__exit__, None, None, None)
    assert summary.reconnects >= 3
    assert summary.dropped == 0
    # readings taken while the broker was down reached the new broker (the buffer)
    with subscriber.lock:
        messages = list(subscriber.messages)
    taken = []
    for topic, payload in messages:
        device_id = topic.split("/")[1]
        _, reading = open_reading(
            pki_dir.joinpath("devices", device_id, "device.psk").read_bytes(), device_id, payload
        )
        taken.append(reading.timestamp)
    assert any(outage_from < ts < outage_to for ts in taken)


@pytest.mark.integration
async def test_two_hundred_devices_connect_and_publish_through_the_embedded_broker(
    pki_dir: Path, tmp_path: Path
) -> None:
    from pacegate.pki import enroll_devices

    count = 200
    await asyncio.to_thread(enroll_devices, pki_dir, [f"pm-{i:04d}" for i in range(4, count + 1)])
    with embedded_broker(pki_dir, tmp_path / "broker") as broker:
        gateway = await asyncio.to_thread(_gateway_subscriber, broker)  # PUBACKs end to end
        try:
            summary = await run_fleet(
                WorkLayout(tmp_path).pki,
                count=count,
                rate=1.0,
                duration=4.0,
                endpoints=[Endpoint(broker.host, broker.port)],
            )
        finally:
            gateway.close()
    assert summary.devices == summary.connected == count
    assert summary.connect_failures == 0
    assert summary.acknowledged >= count
    assert summary.produced == summary.acknowledged + summary.failed + summary.dropped


@pytest.mark.integration
async def test_revoked_device_is_refused_promptly_and_does_not_hang(
    embedded_broker: BrokerHandle, pki: PkiLayout
) -> None:
    # The broker refuses a revoked certificate at two layers: the TLS handshake (once its
    # watcher has loaded the new CRL) and CONNECT (its auth check reads the CRL itself, so
    # it can win the race by a moment). Either is a refusal; a hang or a CONNACK 0 is not.
    from device_sim.mqtt import (
        CONNACK_NOT_AUTHORIZED,
        ConnectionLost,
        ConnectionRefused,
        MqttConnection,
    )
    from pacegate.pki import revoke_device
    from pacegate.tlsconf import client_context

    ctx = client_context(pki.ca_cert, pki.device_cert("pm-0001"), pki.device_key("pm-0001"))
    conn = await MqttConnection.open(embedded_broker.host, embedded_broker.port, ctx, "pm-0001")
    conn.close()
    revoke_device(pki.root, "pm-0001")
    refused: Exception | None = None
    for _ in range(100):  # the embedded broker applies a new CRL within seconds
        try:
            conn = await MqttConnection.open(
                embedded_broker.host, embedded_broker.port, ctx, "pm-0001", timeout=5.0
            )
        except (OSError, ConnectionLost, ConnectionRefused) as exc:
            refused = exc
            break
        conn.close()
        await asyncio.sleep(0.1)
    assert refused is not None, "a revoked device still connects"
    # refused at TLS (OSError, ConnectionLost) or, if the CONNECT got through, as not authorised
    if isinstance(refused, ConnectionRefused):
        assert refused.return_code == CONNACK_NOT_AUTHORIZED


def test_endpoint_list_stays_home_and_fails_over_on_a_failed_connect() -> None:
    from device_sim.device import EndpointList

    a, b, c = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2), Endpoint("127.0.0.1", 3)
    route = EndpointList([a, b, c], start=4)  # home: 4 mod 3 = b
    assert route.current == b
    route.connect_failed()
    assert route.current == c
    assert not route.round_failed()
    route.connect_failed()
    assert route.current == a
    assert not route.round_failed()
    route.connect_failed()
    assert route.current == b
    assert route.round_failed()
    route.connected()
    assert not route.round_failed()
    single = EndpointList([a])
    single.connect_failed()
    assert single.current == a
    assert single.round_failed()
    with pytest.raises(ValueError, match="at least one"):
        EndpointList([])


@pytest.mark.integration
async def test_device_fails_over_to_another_edge_node_when_its_node_dies(
    pki_dir: Path, tmp_path: Path
) -> None:
    """Two edge brokers on one PKI, each with a gateway subscriber. A device with both in its
    endpoint list publishes to its home node; that node is killed; the device's next readings
    reach the other node within seconds, and every reading it produced is acknowledged by one
    of them (none left buffered)."""
    import random

    from device_sim.counter import CounterStore
    from device_sim.device import Backoff, SimulatedDevice
    from device_sim.fleet import load_bundle
    from pacegate.tlsconf import client_context

    pki = PkiLayout(pki_dir)
    device_id = "pm-0001"
    first = embedded_broker(pki_dir, tmp_path / "edge-1")
    second = embedded_broker(pki_dir, tmp_path / "edge-2")
    edge1 = await asyncio.to_thread(first.__enter__)
    edge2 = await asyncio.to_thread(second.__enter__)
    subscribers = [await asyncio.to_thread(_gateway_subscriber, b) for b in (edge1, edge2)]
    bundle = load_bundle(pki, device_id)
    endpoints = [Endpoint(edge1.host, edge1.port), Endpoint(edge2.host, edge2.port)]
    device = SimulatedDevice(
        device_id=device_id,
        psk=bundle.psk,
        ssl_context=client_context(pki.ca_cert, bundle.cert, bundle.key),
        endpoints=endpoints,
        counter=CounterStore(pki.device_counter(device_id), device_id, block=64),
        model=HeartModel(device_id, seed=1),
        connect_gate=asyncio.Semaphore(1),
        backoff=Backoff(random.Random(1)),
    )
    home = device.endpoint
    home_index = endpoints.index(home)
    other_index = 1 - home_index
    radio = asyncio.create_task(device.stay_connected())
    sensor = asyncio.create_task(device.sample_forever(10.0))
    closed = [False, False]
    try:

        def seen(i: int) -> int:
            with subscribers[i].lock:
                return len(subscribers[i].messages)

        assert await asyncio.to_thread(wait_until, lambda: seen(home_index) >= 5, 30.0)
        assert seen(other_index) == 0  # it stays on its home node while that one lives
        subscribers[home_index].close()
        await asyncio.to_thread((first, second)[home_index].__exit__, None, None, None)
        closed[home_index] = True
        assert await asyncio.to_thread(wait_until, lambda: seen(other_index) >= 5, 30.0)
        assert device.endpoint == endpoints[other_index]
        sensor.cancel()
        assert await asyncio.to_thread(wait_until, lambda: device.unacknowledged == 0, 30.0)
        assert device.stats.acknowledged == device.stats.produced
    finally:
        sensor.cancel()
        radio.cancel()
        await asyncio.gather(sensor, radio, return_exceptions=True)
        device.disconnect()
        for i, (ctx, sub) in enumerate(zip((first, second), subscribers, strict=True)):
            sub.close()
            if not closed[i]:
                await asyncio.to_thread(ctx.__exit__, None, None, None)
