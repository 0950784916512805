"""QoS 1 delivery through the broker: a PUBACK means the message is safe.

Both brokers, real TLS, real paho clients; the subscriber is the ``gateway`` identity with a
persistent session (``clean_session=False``) and manual acknowledgements, as the gateway runs.
On Mosquitto a PUBACK means the broker owns the message; on the embedded broker it means the
gateway acknowledged it (end-to-end acknowledgement, tests/test_broker_e2e_ack.py), so the
publishers here stay connected until the subscriber has acknowledged.

- a message the broker sent to the subscriber and never got a PUBACK for is sent again, with
  DUP=1 and its packet id, when the subscriber's persistent session reconnects: after a
  ``kill -9`` of the subscriber, and after the subscriber sat on it for longer than amqtt's
  built-in 5 s PUBACK timeout (MQTT 3.1.1 §4.4);
- once acknowledged, it is never sent again;
- every message a publisher got a PUBACK for reaches the subscriber (or its offline session),
  even when the publishers disconnect right after their last PUBACK.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from broker.config import render_default_config
from pacegate.identity import telemetry_topic
from tests.support import (
    LOOPBACK,
    BrokerHandle,
    client_tls_context,
    connect_as,
    embedded_broker,
    free_port,
    wait_until,
)

# every test here starts or reaches a process or a server
pytestmark = pytest.mark.integration

WAIT = 20.0
GATEWAY = "gateway"
FILTER = "pacemakers/#"

# A subscriber that never acknowledges: it prints each message and waits to be killed.
_SILENT_SUBSCRIBER = r"""
import ssl, sys
import paho.mqtt.client as mqtt
host, port, ca, cert, key = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(cafile=ca)
ctx.load_cert_chain(cert, key)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gateway",
                protocol=mqtt.MQTTv311, clean_session=False)
c.tls_set_context(ctx)
c.manual_ack_set(True)
c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("pacemakers/#", 1)
c.on_subscribe = lambda cl, u, mid, rcs, p: print("subscribed", flush=True)
c.on_message = lambda cl, u, m: print("message", m.payload.decode(), flush=True)
c.connect(host, int(port), keepalive=60)
c.loop_forever()
"""


class Subscriber:
    """The gateway identity, persistent session, manual acks (``ack`` says whether to)."""

    def __init__(self, broker: BrokerHandle, *, ack: bool) -> None:
        self.ack = ack
        self.received: list[tuple[str, bool]] = []  # (payload, dup)
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=GATEWAY,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        c.tls_set_context(
            client_tls_context(broker.pki.ca_cert, broker.pki.gateway_cert, broker.pki.gateway_key)
        )
        c.manual_ack_set(True)
        c.on_connect = lambda cl, _u, _f, _rc, _p: cl.subscribe(FILTER, 1)
        c.on_subscribe = lambda _cl, _u, _mid, _rcs, _p: self.subscribed.set()
        c.on_message = self._on_message
        self.unsubacks: set[int] = set()
        self.unsubacked = threading.Condition(self.lock)
        c.on_unsubscribe = self._on_unsubscribe
        self.client = c
        c.connect(broker.host, broker.port, keepalive=60)
        c.loop_start()
        assert self.subscribed.wait(WAIT), "no SUBACK"

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        # Acknowledge before recording: a test that sees the message recorded may disconnect
        # at once, and paho queues packets in order, so the PUBACK is then already ahead of
        # the DISCONNECT. Recording first let the DISCONNECT overtake the last PUBACK, and the
        # broker then (correctly) redelivered that message to the next session.
        if self.ack:
            client.ack(msg.mid, msg.qos)
        with self.lock:
            self.received.append((msg.payload.decode(), bool(msg.dup)))

    def _on_unsubscribe(
        self, _cl: mqtt.Client, _u: object, mid: int, _rcs: object, _p: object
    ) -> None:
        with self.unsubacked:
            self.unsubacks.add(mid)
            self.unsubacked.notify_all()

    def flush(self) -> None:
        """A round trip behind every PUBACK sent so far: a broker handles one connection's
        packets in order, so once the UNSUBACK is here it has taken in those PUBACKs. A test
        that disconnects without this and reconnects at once races the broker's reading of
        the old connection against the takeover, and a PUBACK still unread is (rightly)
        followed by a redelivery to the new connection."""
        _rc, mid = self.client.unsubscribe("pacemakers/flush-barrier")
        with self.unsubacked:
            assert self.unsubacked.wait_for(lambda: mid in self.unsubacks, WAIT), "no UNSUBACK"

    def payloads(self) -> list[str]:
        with self.lock:
            return [p for p, _ in self.received]

    def close(self) -> None:
        if self.ack:
            self.flush()
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def subscriber(broker: BrokerHandle, *, ack: bool) -> Iterator[Subscriber]:
    sub = Subscriber(broker, ack=ack)
    try:
        yield sub
    finally:
        sub.close()


@contextlib.contextmanager
def silent_subscriber_process(broker: BrokerHandle, log: Path) -> Iterator[subprocess.Popen[str]]:
    pki = broker.pki
    args = [broker.host, str(broker.port), pki.ca_cert, pki.gateway_cert, pki.gateway_key]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SILENT_SUBSCRIBER, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def _read_lines(proc: subprocess.Popen[str], want: int) -> list[str]:
    """Read stdout lines of ``proc`` until ``want`` lines came (each line is a flush)."""
    assert proc.stdout is not None
    lines: list[str] = []
    done = threading.Event()

    def run() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if len(lines) >= want:
                break
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(WAIT), f"got only {lines}"
    return lines


@contextlib.contextmanager
def publishing(
    broker: BrokerHandle, device_id: str, payloads: list[str]
) -> Iterator[list[mqtt.MQTTMessageInfo]]:
    """Publish every payload at QoS 1 without waiting; stay connected while the body runs
    (the embedded broker PUBACKs only once the gateway acknowledged)."""
    outcome, dev = connect_as(broker, device_id)
    assert dev is not None, outcome
    try:
        yield [dev.client.publish(telemetry_topic(device_id), p, qos=1) for p in payloads]
    finally:
        dev.close()


def _all_published(infos: list[mqtt.MQTTMessageInfo]) -> bool:
    return all(i.is_published() for i in infos)


def _publish_and_leave(broker: BrokerHandle, device_id: str, payloads: list[str]) -> None:
    """Publish every payload at QoS 1 without waiting in between, wait for every PUBACK,
    then disconnect at once."""
    outcome, dev = connect_as(broker, device_id)
    assert dev is not None, outcome
    try:
        infos = [dev.client.publish(telemetry_topic(device_id), p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(WAIT)
            assert info.is_published()
    finally:
        dev.close()


@pytest.mark.timeout(90)
def test_messages_in_flight_to_a_killed_subscriber_are_redelivered_with_dup(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    sent = [f"kill9-{i:03d}" for i in range(20)]
    with silent_subscriber_process(broker, tmp_path / "sub.log") as proc:
        assert _read_lines(proc, 1) == ["subscribed"]
        with publishing(broker, "pm-0001", sent) as infos:
            got = _read_lines(proc, len(sent))
            assert sorted(got) == sorted(f"message {p}" for p in sent)
            proc.send_signal(signal.SIGKILL)  # no DISCONNECT, no PUBACK ever
            proc.wait(timeout=10)
            if broker.kind == "embedded":  # end to end: the gateway never acknowledged
                assert not any(i.is_published() for i in infos)
            with subscriber(broker, ack=True) as sub:
                assert wait_until(lambda: len(sub.received) >= len(sent), WAIT), sub.received
                assert sub.payloads() == sent  # in order
                assert all(dup for _, dup in sub.received)
                assert wait_until(lambda: _all_published(infos), WAIT)
    # acknowledged: gone from the session; the next message is the only one delivered
    with subscriber(broker, ack=True) as sub:
        _publish_and_leave(broker, "pm-0001", ["after"])
        assert wait_until(lambda: sub.received, WAIT)
        assert sub.received == [("after", False)]


@pytest.mark.timeout(90)
def test_a_message_unacknowledged_for_longer_than_5_s_is_redelivered_on_reconnect(
    broker: BrokerHandle,
) -> None:
    sent = ["slow-1", "slow-2", "slow-3"]
    silent = Subscriber(broker, ack=False)
    try:
        with publishing(broker, "pm-0002", sent) as infos:
            assert wait_until(lambda: len(silent.received) == 3, WAIT), silent.received
            time.sleep(6.0)  # amqtt 0.12 gives up on a PUBACK after 5 s and forgets it
            assert silent.received == [(p, False) for p in sent]  # no resend within a connection
            silent.close()
            if broker.kind == "embedded":
                assert not any(i.is_published() for i in infos)
            with subscriber(broker, ack=True) as sub:
                assert wait_until(lambda: len(sub.received) >= 3, WAIT), sub.received
                assert sub.received == [(p, True) for p in sent]
                assert wait_until(lambda: _all_published(infos), WAIT)
    finally:
        silent.close()


@pytest.mark.timeout(120)
def test_every_acknowledged_publish_reaches_the_subscriber_when_publishers_leave_at_once(
    broker: BrokerHandle,
) -> None:
    ids = ("pm-0001", "pm-0002", "pm-0003")
    want = {f"{d}-{i:03d}" for d in ids for i in range(100)}
    with subscriber(broker, ack=True) as sub:
        threads = [
            threading.Thread(
                target=_publish_and_leave, args=(broker, d, [f"{d}-{i:03d}" for i in range(100)])
            )
            for d in ids
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert wait_until(lambda: set(sub.payloads()) >= want, WAIT), (
            f"{len(want - set(sub.payloads()))} of {len(want)} lost"
        )
        for d in ids:  # per publisher, in order
            mine = [p for p in sub.payloads() if p.startswith(d)]
            assert mine == sorted(mine)


@pytest.mark.timeout(120)
def test_publishes_made_while_the_subscriber_is_offline_wait_in_its_session(
    broker: BrokerHandle,
) -> None:
    ids = ("pm-0001", "pm-0002", "pm-0003")
    want = {f"{d}-off-{i:03d}" for d in ids for i in range(100)}
    with subscriber(broker, ack=True):
        pass  # the persistent session and its subscription now exist; it is offline
    with contextlib.ExitStack() as stack:
        infos = [
            info
            for d in ids
            for info in stack.enter_context(
                publishing(broker, d, [f"{d}-off-{i:03d}" for i in range(100)])
            )
        ]
        if broker.kind == "mosquitto":  # the broker owns them: PUBACKed at once
            assert wait_until(lambda: _all_published(infos), WAIT)
        with subscriber(broker, ack=True) as sub:
            assert wait_until(lambda: set(sub.payloads()) >= want, WAIT), (
                f"{len(want - set(sub.payloads()))} of {len(want)} lost"
            )
            assert len(sub.payloads()) == len(want)  # nothing twice
            assert wait_until(lambda: _all_published(infos), WAIT)


def test_a_connect_refused_before_the_tls_handshake_leaves_no_socket_open(
    pki_dir: Path, tmp_path: Path
) -> None:
    """``try_connect`` (tests/support.py) closes the TLS socket paho drops when the broker
    refuses the connection before its handshake (here: ``max_connections: 1``, taken by an
    established session); an unclosed one is a ResourceWarning, a test error elsewhere."""
    workdir = tmp_path / "limited"
    workdir.mkdir()
    port = free_port(LOOPBACK)
    text = render_default_config(pki_dir, host=LOOPBACK, port=port, config_dir=workdir)
    text = text.replace("max_connections: 10000", "max_connections: 1")
    assert "  max_connections: 1 " in text  # (the line keeps its comment)
    with embedded_broker(pki_dir, workdir, port=port, config_text=text) as broker:
        outcome, first = connect_as(broker, "pm-0001")
        assert first is not None, outcome
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome, second = connect_as(broker, "pm-0002")
                gc.collect()
            assert second is None, outcome
            assert not outcome.connected, outcome
            assert "max_connections" in broker.wait_for_log("max_connections")
            leaked = [w for w in caught if issubclass(w.category, ResourceWarning)]
            assert leaked == [], [str(w.message) for w in leaked]
        finally:
            first.close()


@pytest.mark.timeout(120)
def test_a_subscriber_reconnecting_mid_stream_gets_each_message_once_and_in_order(
    broker: BrokerHandle,
) -> None:
    """The persistent session reconnects while a publisher is still sending: its backlog
    (the offline queue) goes out first, then the live messages, each once, in order."""
    sent = [f"mid-{i:04d}" for i in range(400)]
    with subscriber(broker, ack=True):
        pass  # the persistent session and its subscription now exist; it is offline
    outcome, dev = connect_as(broker, "pm-0001")
    assert dev is not None, outcome
    try:
        infos = []
        for i, p in enumerate(sent):
            infos.append(dev.client.publish(telemetry_topic("pm-0001"), p, qos=1))
            if i == 100:
                # some are queued offline by now (the embedded broker PUBACKs them only once
                # the subscriber has them: wait for the broker to have them queued instead)
                if broker.kind == "embedded":
                    time.sleep(1.0)
                else:
                    infos[50].wait_for_publish(WAIT)
                sub = Subscriber(broker, ack=True)  # reconnects while the rest flows
        for info in infos:
            info.wait_for_publish(WAIT)
            assert info.is_published()
    finally:
        dev.close()
    try:
        assert wait_until(lambda: len(sub.payloads()) >= len(sent), WAIT), len(sub.payloads())
        time.sleep(0.5)  # a second copy, if any, would come right behind
        assert sub.payloads() == sent
    finally:
        sub.close()


@pytest.mark.mosquitto
def test_mosquitto_keeps_an_offline_gateways_backlog_across_a_broker_restart(
    pki_dir: Path, tmp_path: Path
) -> None:
    from tests.support import mosquitto_broker

    port = free_port()
    want = [f"pm-0001-restart-{i:03d}" for i in range(50)]
    with mosquitto_broker(pki_dir, tmp_path / "first", port=port) as broker:
        with subscriber(broker, ack=True):
            pass  # persistent session and subscription exist; the gateway goes away
        _publish_and_leave(broker, "pm-0001", want)
    # SIGTERM made mosquitto save its persistence file; a new process on the same port
    # and PKI (same persistence location) must still hold the gateway's backlog
    with (
        mosquitto_broker(pki_dir, tmp_path / "second", port=port) as broker,
        subscriber(broker, ack=True) as sub,
    ):
        assert wait_until(lambda: sub.payloads() == want, WAIT), (
            f"{len(set(want) - set(sub.payloads()))} of {len(want)} lost in the restart"
        )
