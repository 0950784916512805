"""When the gateway acknowledges an MQTT message: only once its reading is durable, and a
device's resent copy of a reading still on its way is acknowledged only with the first.

The real gateway pipeline, replay store (SQLite) and PSK store, driven message by message
without a network (the decision is the unit here; the broker and hospital are tested for
real in test_gateway_forwarding.py and test_stack_supervision.py).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from console.workdir import WorkLayout, gateway_config_text
from gateway.config import load_gateway_config
from gateway.forwarder import Pending
from gateway.service import Gateway, _Message
from pacegate.identity import telemetry_topic
from pacegate.layout import PkiLayout
from pacegate.reading import Reading
from pacegate.sealed import new_epoch, seal_reading


class _RecordingClient:
    """Stands in for paho's client: records the acknowledgements the gateway sends."""

    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


def _gateway(tmp_path: Path) -> Gateway:
    text = gateway_config_text(
        WorkLayout(tmp_path),
        mqtt_host="127.0.0.1",
        mqtt_port=1,  # never connected: messages are handed in directly
        hospital_host="127.0.0.1",
        hospital_port=1,
        metrics_port=0,
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    gw = Gateway(load_gateway_config(path), use_channel=False)
    gw._current = 1
    return gw


def _message(payload: bytes, mid: int) -> _Message:
    return _Message(1, telemetry_topic("pm-0001"), payload, mid, 1, time.monotonic())


def test_a_resent_copy_of_a_reading_not_yet_durable_is_acknowledged_only_with_the_first(
    pki: PkiLayout, tmp_path: Path
) -> None:
    gw = _gateway(tmp_path)
    client = _RecordingClient()
    gw._client = client  # type: ignore[assignment]
    try:
        reading = Reading(age=64, heart_rate_bpm=72, sensor_id=7, timestamp=datetime.now(UTC))
        payload = seal_reading(
            pki.device_psk("pm-0001").read_bytes(), "pm-0001", 5, reading, epoch=new_epoch()
        )
        gw._handle(_message(payload, 10))  # accepted: queued for the hospital, not acked
        gw._handle(_message(payload, 11))  # the device resent it (DUP): held, not acked
        assert client.acked == []
        first: Pending = gw.forwarder._queue.get_nowait()
        assert gw.forwarder._queue.empty()  # the copy is not forwarded a second time
        gw._on_durable([first])  # the hospital committed it
        assert client.acked == [10, 11]
        gw._handle(_message(payload, 12))  # a replay of a durable reading: acked at once
        assert client.acked == [10, 11, 12]
        assert gw.metrics.duplicates_held._value.get() == 1
    finally:
        gw.spool.close()
        gw.replay.close()


def test_held_acknowledgements_of_a_lost_connection_are_never_sent(
    pki: PkiLayout, tmp_path: Path
) -> None:
    """After a reconnect the broker redelivers under new packet ids: acks owed to the old
    connection are dropped, not sent on the new one."""
    import asyncio

    from gateway.service import _Connected

    gw = _gateway(tmp_path)
    client = _RecordingClient()
    gw._client = client  # type: ignore[assignment]
    try:
        reading = Reading(age=64, heart_rate_bpm=72, sensor_id=7, timestamp=datetime.now(UTC))
        payload = seal_reading(
            pki.device_psk("pm-0001").read_bytes(), "pm-0001", 6, reading, epoch=new_epoch()
        )
        gw._handle(_message(payload, 20))
        gw._handle(_message(payload, 21))
        first: Pending = gw.forwarder._queue.get_nowait()

        async def reconnect() -> None:
            stop = asyncio.Event()
            gw._inbox.put_nowait(_Connected(2))
            task = asyncio.create_task(gw._consume(stop))
            while gw._current != 2:
                await asyncio.sleep(0.01)
            stop.set()
            task.cancel()

        asyncio.run(reconnect())
        gw._on_durable([first])  # durable, but it came on connection 1
        assert client.acked == []
    finally:
        gw.spool.close()
        gw.replay.close()
