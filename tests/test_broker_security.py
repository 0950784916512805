"""The broker's security guarantees, over real TLS on loopback, against both brokers:
the embedded amqtt broker and Debian's mosquitto with pacegate's configuration."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt

from pacegate.broker.config import render_default_config
from pacegate.broker.server import MAX_PENDING_PER_SOURCE
from pacegate.identity import telemetry_topic
from pacegate.pki import enroll_device, init_pki, revoke_device
from tests.support import (
    LOOPBACK,
    BrokerHandle,
    MqttClient,
    client_tls_context,
    connect_as,
    embedded_broker,
    free_port,
    identity_files,
    try_connect,
    wait_until,
)


def _security_events(broker: BrokerHandle) -> list[dict[str, object]]:
    out = []
    for line in broker.log_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("logger") == "pacegate.security":
                out.append(rec)
    return out


def _connected(broker: BrokerHandle, identity: str, client_id: str | None = None) -> MqttClient:
    outcome, client = connect_as(broker, identity, client_id=client_id)
    assert outcome.connected, f"{identity} should connect to the {broker.kind} broker: {outcome}"
    assert client is not None
    return client


def _gateway(broker: BrokerHandle) -> MqttClient:
    gw = _connected(broker, "gateway")
    assert gw.subscribe("pacemakers/#") == [1]
    return gw


def test_enrolled_device_connects_and_its_reading_reaches_the_gateway(
    broker: BrokerHandle,
) -> None:
    gw = _gateway(broker)
    dev = _connected(broker, "pm-0001")
    try:
        dev.publish(telemetry_topic("pm-0001"), b"sealed-1")
        assert wait_until(lambda: (telemetry_topic("pm-0001"), b"sealed-1") in gw.messages)
    finally:
        dev.close()
        gw.close()


def test_client_without_certificate_is_refused(broker: BrokerHandle) -> None:
    outcome, client = try_connect(
        broker.host, broker.port, ca=broker.pki.ca_cert, cert=None, key=None, client_id="pm-0001"
    )
    assert not outcome.connected, outcome
    assert client is None
    if broker.kind == "embedded":
        assert wait_until(
            lambda: any(e["event"] == "tls_handshake_refused" for e in _security_events(broker))
        )


def test_certificate_from_another_ca_is_refused(broker: BrokerHandle, tmp_path: Path) -> None:
    rogue = init_pki(tmp_path / "rogue")
    enroll_device(rogue.root, "pm-0001")
    outcome, _ = try_connect(
        broker.host,
        broker.port,
        ca=broker.pki.ca_cert,
        cert=rogue.device_cert("pm-0001"),
        key=rogue.device_key("pm-0001"),
        client_id="pm-0001",
    )
    assert not outcome.connected, outcome


def test_expired_certificate_is_refused(broker: BrokerHandle) -> None:
    now = datetime.now(UTC)
    enroll_device(
        broker.pki.root,
        "pm-expired",
        not_before=now - timedelta(days=100),
        not_after=now - timedelta(days=10),
    )
    outcome, _ = connect_as(broker, "pm-expired")
    assert not outcome.connected, outcome


def test_device_cannot_claim_another_devices_client_id(broker: BrokerHandle) -> None:
    """pm-0001's certificate claiming the client id of a connected pm-0002 or of the
    gateway: the embedded broker refuses the CONNECT; mosquitto (``use_username_as_clientid``)
    replaces the claimed id by the certificate's CN, so the session is pm-0001's own. Either
    way the victims stay connected and keep working: nobody is kicked."""
    gw = _gateway(broker)
    victim = _connected(broker, "pm-0002")
    try:
        for claimed in ("pm-0002", "gateway"):
            outcome, client = connect_as(broker, "pm-0001", client_id=claimed)
            if broker.kind == "embedded":
                assert not outcome.connected, outcome
                assert "Not authorized" in outcome.reason
            else:
                assert outcome.connected, outcome
                assert client is not None
                # mosquitto names the session by the id it kept: the CN, not the claim
                broker.wait_for_log("as pm-0001 (")
                assert f"as {claimed} (" not in broker.log_text().split("as pm-0002 (", 1)[1]
            if client is not None:
                client.close()
        time.sleep(0.5)  # a takeover would close the victims' connections by now
        assert not victim.disconnected.is_set(), "pm-0002 was kicked by a claimed client id"
        assert not gw.disconnected.is_set(), "the gateway was kicked by a claimed client id"
        victim.publish(telemetry_topic("pm-0002"), b"still-mine")
        assert wait_until(lambda: (telemetry_topic("pm-0002"), b"still-mine") in gw.messages)
    finally:
        victim.close()
        gw.close()


def test_claimed_client_id_gives_no_right_of_the_victim(broker: BrokerHandle) -> None:
    """Even where a claimed client id is accepted (mosquitto), rights follow the
    certificate: pm-0001 calling itself pm-0002 cannot publish as pm-0002."""
    gw = _gateway(broker)
    try:
        _, impostor = connect_as(broker, "pm-0001", client_id="pm-0002")
        if impostor is not None:
            impostor.publish(telemetry_topic("pm-0002"), b"forged")
            impostor.close()
        honest = _connected(broker, "pm-0003")
        honest.publish(telemetry_topic("pm-0003"), b"marker")
        assert wait_until(lambda: (telemetry_topic("pm-0003"), b"marker") in gw.messages)
        honest.close()
        assert all(payload != b"forged" for _, payload in gw.messages)
    finally:
        gw.close()


def test_refused_client_id_claim_leaves_the_gateway_session_alone(
    embedded_broker: BrokerHandle,
) -> None:
    """Stock amqtt drops the old session of a clean-session client id before looking at
    the authentication result; pacegate authenticates first."""
    broker = embedded_broker
    gw = _gateway(broker)
    try:
        outcome, _ = connect_as(broker, "pm-0001", client_id="gateway")
        assert not outcome.connected
        assert not gw.disconnected.is_set()
        dev = _connected(broker, "pm-0002")
        dev.publish(telemetry_topic("pm-0002"), b"still-routed")
        assert wait_until(lambda: (telemetry_topic("pm-0002"), b"still-routed") in gw.messages)
        dev.close()
        assert any(
            e["event"] == "connect_refused" and e["reason"] == "client_id_mismatch"
            for e in _security_events(broker)
        )
    finally:
        gw.close()


def test_device_cannot_publish_on_another_devices_topic(broker: BrokerHandle) -> None:
    gw = _gateway(broker)
    dev = _connected(broker, "pm-0001")
    try:
        dev.publish(telemetry_topic("pm-0002"), b"forged")
        dev.publish("pacemakers/pm-0001/other", b"off-topic")
        dev.publish(telemetry_topic("pm-0001"), b"own")  # the marker: arrives after the others
        assert wait_until(lambda: (telemetry_topic("pm-0001"), b"own") in gw.messages)
        assert [p for _, p in gw.messages] == [b"own"]
        if broker.kind == "embedded":
            refused = [e for e in _security_events(broker) if e["event"] == "publish_refused"]
            assert {e["topic"] for e in refused} == {
                telemetry_topic("pm-0002"),
                "pacemakers/pm-0001/other",
            }
            assert all(e["peer"] == "pm-0001" for e in refused)
            assert "forged" not in broker.log_text()
        else:
            assert "Denied PUBLISH from pm-0001" in broker.log_text()
    finally:
        dev.close()
        gw.close()


def test_device_cannot_subscribe_to_another_devices_topic(broker: BrokerHandle) -> None:
    gw = _gateway(broker)
    spy = _connected(broker, "pm-0001")
    victim = _connected(broker, "pm-0002")
    try:
        codes = spy.subscribe(telemetry_topic("pm-0002"))
        wildcard = spy.subscribe("pacemakers/#")
        if broker.kind == "embedded":
            assert codes == [0x80]
            assert wildcard == [0x80]
        # mosquitto 2 grants the SUBACK and filters at delivery (no read right): either way
        # nothing reaches the spy.
        victim.publish(telemetry_topic("pm-0002"), b"private")
        assert wait_until(lambda: (telemetry_topic("pm-0002"), b"private") in gw.messages)
        time.sleep(0.2)  # give a wrongly routed copy the time to arrive
        assert spy.messages == []
    finally:
        for c in (victim, spy, gw):
            c.close()


def test_revoked_device_is_refused(broker: BrokerHandle) -> None:
    assert connect_as(broker, "pm-0002")[0].connected
    revoke_device(broker.pki.root, "pm-0002")
    broker.reload()

    def refused() -> bool:
        outcome, client = connect_as(broker, "pm-0002", timeout=2.0)
        if client is not None:
            client.close()
        return not outcome.connected

    assert wait_until(refused, timeout=15.0, interval=0.5)
    still = _connected(broker, "pm-0001")  # the others are untouched
    still.close()


def test_revocation_closes_the_live_session_without_restart(
    embedded_broker: BrokerHandle,
) -> None:
    broker = embedded_broker
    pid = broker.proc.pid
    gw = _gateway(broker)
    dev = _connected(broker, "pm-0003")
    try:
        revoke_device(broker.pki.root, "pm-0003")
        assert dev.disconnected.wait(15.0), "the revoked device's session stayed open"
        assert broker.proc.poll() is None and broker.proc.pid == pid
        events = _security_events(broker)
        assert any(e["event"] == "session_closed" and e["peer"] == "pm-0003" for e in events), (
            events
        )
    finally:
        dev.close()
        gw.close()


def test_oversized_payload_is_dropped_and_the_connection_closed(
    embedded_broker: BrokerHandle,
) -> None:
    broker = embedded_broker
    gw = _gateway(broker)
    dev = _connected(broker, "pm-0001")
    try:
        dev.client.publish(telemetry_topic("pm-0001"), b"x" * 100_000, qos=0)
        assert dev.disconnected.wait(10.0)
        time.sleep(0.2)
        assert gw.messages == []
        assert not gw.disconnected.is_set()
    finally:
        dev.close()
        gw.close()


def _start_client(
    broker: BrokerHandle,
    identity: str,
    *,
    client_id: str,
    clean_session: bool = True,
    will: tuple[str, bytes] | None = None,
) -> MqttClient:
    """A paho client with ``identity``'s certificate, started; wait on ``.connected`` /
    ``.disconnected`` for the outcome (``.connack_reason`` says why)."""
    cert, key = identity_files(broker.pki, identity)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=clean_session,
    )
    client.tls_set_context(client_tls_context(broker.pki.ca_cert, cert, key))
    if will is not None:
        client.will_set(will[0], will[1], qos=1)
    wrapper = MqttClient(client)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    return wrapper


def _connack(client: MqttClient) -> bool:
    """True if the broker accepted the CONNECT, False if it refused it or hung up."""
    assert wait_until(lambda: client.connected.is_set() or client.disconnected.is_set())
    return client.connected.is_set() and not client.disconnected.is_set()


def _persistent_gateway(broker: BrokerHandle) -> MqttClient:
    gw = _start_client(broker, "gateway", client_id="gateway", clean_session=False)
    assert _connack(gw), gw.connack_reason
    assert gw.subscribe("pacemakers/#") == [1]
    return gw


def test_device_cannot_take_over_the_gateways_persistent_session(
    embedded_broker: BrokerHandle,
) -> None:
    """pm-0001's own valid certificate, client id ``gateway``, ``clean_session=False``:
    amqtt hands it the gateway's stored session (whose ``ssl_object`` is the gateway's
    certificate); the broker judges the connection's certificate and refuses it first."""
    broker = embedded_broker
    gw = _persistent_gateway(broker)
    try:
        for _ in range(2):  # "and keep doing it"
            attacker = _start_client(broker, "pm-0001", client_id="gateway", clean_session=False)
            accepted = _connack(attacker)
            attacker.close()
            assert not accepted, "pm-0001's certificate was accepted as the gateway"
            assert attacker.connack_reason == "Not authorized"
        assert not gw.disconnected.is_set(), "the real gateway was kicked off"
        dev = _connected(broker, "pm-0003")
        dev.publish(telemetry_topic("pm-0003"), b"for-the-hospital")
        assert wait_until(lambda: (telemetry_topic("pm-0003"), b"for-the-hospital") in gw.messages)
        dev.close()
        assert not gw.disconnected.is_set()
        refused = [
            e
            for e in _security_events(broker)
            if e["event"] == "connect_refused" and e["reason"] == "client_id_mismatch"
        ]
        assert len(refused) == 2 and all(e["peer"] == "pm-0001" for e in refused), refused
    finally:
        gw.close()


def test_a_will_on_another_devices_topic_never_reaches_the_gateway(broker: BrokerHandle) -> None:
    """amqtt broadcasts a will without the publish ACL; the embedded broker refuses any
    CONNECT with a will, mosquitto checks the will's topic against the ACL."""
    gw = _gateway(broker)
    try:
        forger = _start_client(
            broker, "pm-0001", client_id="pm-0001", will=(telemetry_topic("pm-0002"), b"forged")
        )
        accepted = _connack(forger)
        if broker.kind == "embedded":
            assert not accepted
            assert forger.connack_reason == "Not authorized"
            assert any(
                e["event"] == "connect_refused"
                and e["reason"] == "will_refused"
                and e["will_topic"] == telemetry_topic("pm-0002")
                for e in _security_events(broker)
            )
        if accepted:  # drop the socket without DISCONNECT: the will fires now
            forger.client.loop_stop()
            sock = forger.client.socket()
            assert isinstance(sock, socket.socket)  # an ssl.SSLSocket
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        honest = _connected(broker, "pm-0003")
        honest.publish(telemetry_topic("pm-0003"), b"marker")
        assert wait_until(lambda: (telemetry_topic("pm-0003"), b"marker") in gw.messages)
        honest.close()
        assert not wait_until(lambda: any(p == b"forged" for _, p in gw.messages), timeout=1.0)
    finally:
        gw.close()


def _still_open(sockets: list[socket.socket]) -> int:
    """How many of these idle client sockets the broker has not closed yet."""
    n = 0
    for s in sockets:
        try:
            if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                n += 1  # the broker sent something: still open
        except BlockingIOError:
            n += 1
        except OSError:
            pass  # reset by the broker
    return n


def test_stalled_tls_handshakes_count_against_max_connections(
    pki_dir: Path, tmp_path: Path
) -> None:
    """Sockets that never start their handshake are connections from the accept on: with
    ``max_connections: 3`` at most 3 stay open, the oldest is evicted for each newcomer, so
    a genuine device still gets in (the handshake timeout is too long to explain a close)."""
    workdir = tmp_path / "limited"
    workdir.mkdir()
    port = free_port(LOOPBACK)
    text = render_default_config(pki_dir, host=LOOPBACK, port=port, config_dir=workdir)
    text = text.replace("max_connections: 10000", "max_connections: 3")
    text = text.replace("handshake_timeout: 10.0", "handshake_timeout: 120.0")
    assert "max_connections: 3" in text and "handshake_timeout: 120.0" in text
    with embedded_broker(pki_dir, workdir, port=port, config_text=text) as broker:
        idle = [socket.create_connection((broker.host, broker.port)) for _ in range(50)]
        try:
            assert wait_until(lambda: _still_open(idle) <= 3), _still_open(idle)
            assert _still_open(idle) == 3
            dev = _connected(broker, "pm-0001")
            dev.publish(telemetry_topic("pm-0001"), b"sealed")
            dev.close()
            events = _security_events(broker)
            evicted = [e for e in events if e["event"] == "connection_evicted"]
            assert len(evicted) >= 48 and {e["reason"] for e in evicted} == {"max_connections"}
            assert not any(e["event"] == "tls_handshake_refused" for e in events)
        finally:
            for s in idle:
                s.close()


def _closed_at_once(broker: BrokerHandle, identity: str) -> bool:
    """True if the broker closes a new connection before or during its TLS handshake."""
    cert, key = identity_files(broker.pki, identity)
    ctx = client_tls_context(broker.pki.ca_cert, cert, key)
    with socket.create_connection((broker.host, broker.port), timeout=5.0) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=broker.host) as tls:
                return tls.recv(1) == b""
        except OSError:
            return True


def test_established_sessions_fill_max_connections_and_the_next_is_refused(
    pki_dir: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "limited"
    workdir.mkdir()
    port = free_port(LOOPBACK)
    text = render_default_config(pki_dir, host=LOOPBACK, port=port, config_dir=workdir)
    text = text.replace("max_connections: 10000", "max_connections: 2")
    with embedded_broker(pki_dir, workdir, port=port, config_text=text) as broker:
        first, second = _connected(broker, "pm-0001"), _connected(broker, "pm-0002")
        try:
            assert _closed_at_once(broker, "pm-0003")
            assert any(
                e["event"] == "connect_refused" and e["reason"] == "max_connections"
                for e in _security_events(broker)
            )
            assert not first.disconnected.is_set() and not second.disconnected.is_set()
        finally:
            first.close()
            second.close()


def test_one_source_holds_at_most_its_cap_of_pending_connections(
    embedded_broker: BrokerHandle,
) -> None:
    broker = embedded_broker
    idle = [
        socket.create_connection((broker.host, broker.port))
        for _ in range(MAX_PENDING_PER_SOURCE + 10)
    ]
    try:
        assert wait_until(lambda: _still_open(idle) <= MAX_PENDING_PER_SOURCE)
        assert _still_open(idle) == MAX_PENDING_PER_SOURCE
        dev = _connected(broker, "pm-0001")  # evicts this source's oldest idle socket
        dev.close()
        evicted = [e for e in _security_events(broker) if e["event"] == "connection_evicted"]
        assert len(evicted) >= 11 and {e["reason"] for e in evicted} == {"pending_per_source"}
    finally:
        for s in idle:
            s.close()
