"""The broker's security guarantees, over real TLS on loopback, against both brokers:
the embedded amqtt broker and Debian's mosquitto with pacegate's configuration."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from broker.config import render_default_config
from broker.server import MAX_PENDING_PER_SOURCE
from pacegate.identity import telemetry_topic
from pacegate.layout import PkiLayout
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_device_cannot_claim_another_devices_client_id(broker: BrokerHandle) -> None:
    """pm-0001's certificate claiming the client id of a connected pm-0002 or of the
    gateway: both brokers refuse the CONNECT before they look up the claimed session
    (mosquitto: pacegate's identity plugin), so the victims stay connected and keep
    working: nobody is kicked."""
    gw = _gateway(broker)
    victim = _connected(broker, "pm-0002")
    try:
        for claimed in ("pm-0002", "gateway"):
            outcome, client = connect_as(broker, "pm-0001", client_id=claimed)
            assert not outcome.connected, outcome
            assert "Not authorized" in outcome.reason
            if broker.kind == "mosquitto":
                broker.wait_for_log(f"refused client '{claimed}'")
                broker.wait_for_log("client_id_mismatch")
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


@pytest.mark.integration
def test_claimed_client_id_gives_no_right_of_the_victim(broker: BrokerHandle) -> None:
    """Rights follow the certificate: pm-0001 calling itself pm-0002 cannot publish as
    pm-0002 (both brokers refuse the claim; were it accepted, the ACL would still deny)."""
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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
        assert broker.proc.poll() is None
        assert broker.proc.pid == pid
        events = _security_events(broker)
        assert any(e["event"] == "session_closed" and e["peer"] == "pm-0003" for e in events), (
            events
        )
    finally:
        dev.close()
        gw.close()


@pytest.mark.integration
def test_pki_revoke_closes_the_live_session_and_the_device_cannot_reconnect(
    broker: BrokerHandle,
) -> None:
    """The operator's one command, ``pacegate pki revoke``, on either broker: the embedded
    broker polls the CRL; for mosquitto the command finds the broker by its pid_file,
    reloads it (SIGHUP: CRL and ACL) and has the dynamic-security plugin kick the device."""
    gw = _gateway(broker)
    dev = _connected(broker, "pm-0003")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "console",
                "pki",
                "revoke",
                "pm-0003",
                "--dir",
                str(broker.pki.root),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        if broker.kind == "mosquitto":
            assert (
                "it refuses the certificate now, closed pm-0003's live connections" in done.stderr
            ), done.stderr
        assert dev.disconnected.wait(15.0), "the revoked device's session stayed open"
        outcome, again = connect_as(broker, "pm-0003")
        if again is not None:
            again.close()
        assert not outcome.connected, f"pm-0003 reconnected after its revocation: {outcome}"
        assert not gw.disconnected.is_set(), "the gateway was disconnected too"
        other = _connected(broker, "pm-0001")
        other.publish(telemetry_topic("pm-0001"), b"still-routed")
        assert wait_until(lambda: (telemetry_topic("pm-0001"), b"still-routed") in gw.messages)
        other.close()
        assert broker.proc.poll() is None
    finally:
        dev.close()
        gw.close()


@pytest.mark.integration
@pytest.mark.mosquitto
def test_mosquitto_sighup_alone_leaves_a_revoked_session_open_but_mute(
    mosquitto_broker: BrokerHandle,
) -> None:
    """Why ``pki revoke`` kicks: a SIGHUP reloads the CRL and ACL, yet mosquitto 2.0.11
    keeps the revoked device's open connection (src/security_default.c,
    mosquitto_security_apply, never checks a connected client's certificate against the
    new CRL). The reloaded ACL's ``topic deny #`` still drops what it publishes."""
    broker = mosquitto_broker
    gw = _gateway(broker)
    dev = _connected(broker, "pm-0003")
    try:
        revoke_device(broker.pki.root, "pm-0003")  # the files only: no kick
        broker.reload()
        broker.wait_for_log("Reloading config.")
        time.sleep(1.0)  # a reload that closed sessions would have done it by now
        assert not dev.disconnected.is_set()
        dev.publish(telemetry_topic("pm-0003"), b"after-revocation")
        broker.wait_for_log("Denied PUBLISH from pm-0003")
        assert not wait_until(lambda: bool(gw.messages), timeout=1.0)
    finally:
        dev.close()
        gw.close()


@pytest.mark.integration
@pytest.mark.mosquitto
def test_device_cannot_command_mosquittos_dynamic_security_plugin(
    mosquitto_broker: BrokerHandle,
) -> None:
    """The plugin that kicks revoked devices would kick anyone for whoever may publish on
    its control topic: only the mosquitto-admin certificate may (the ACL)."""
    from pacegate.pki.mosquitto_admin import CONTROL_TOPIC, disable_commands

    broker = mosquitto_broker
    victim = _connected(broker, "pm-0002")
    attacker = _connected(broker, "pm-0001")
    try:
        attacker.subscribe(CONTROL_TOPIC + "/#")
        attacker.publish(CONTROL_TOPIC, disable_commands("pm-0002"))
        assert wait_until(
            lambda: any(
                "Denied PUBLISH from pm-0001" in line and f"'{CONTROL_TOPIC}'" in line
                for line in broker.log_text().splitlines()
            )
        ), broker.log_text()
        time.sleep(0.5)
        assert not victim.disconnected.is_set(), "a device's command kicked pm-0002"
        assert "disableClient" not in broker.log_text()
        assert attacker.messages == []
    finally:
        attacker.close()
        victim.close()


@pytest.mark.integration
@pytest.mark.mosquitto
def test_mosquitto_closes_a_device_that_publishes_a_retained_message(
    mosquitto_broker: BrokerHandle,
) -> None:
    """``retain_available false``: the retained PUBLISH closes the device's connection and
    is stored nowhere, so a gateway that subscribes afterwards receives nothing of it."""
    broker = mosquitto_broker
    dev = _connected(broker, "pm-0001")
    try:
        dev.client.publish(telemetry_topic("pm-0001"), b"left-behind", qos=1, retain=True)
        assert dev.disconnected.wait(10.0), "a retained publish was accepted"
    finally:
        dev.close()
    gw = _gateway(broker)  # subscribes now: a stored retained message would come at once
    try:
        assert not wait_until(lambda: bool(gw.messages), timeout=1.0), gw.messages
    finally:
        gw.close()


@pytest.mark.integration
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


@pytest.mark.integration
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
        assert len(refused) == 2, refused
        assert all(e["peer"] == "pm-0001" for e in refused), refused
    finally:
        gw.close()


@pytest.mark.integration
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


@pytest.mark.integration
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
    assert "max_connections: 3" in text
    assert "handshake_timeout: 120.0" in text
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
            assert len(evicted) >= 48
            assert {e["reason"] for e in evicted} == {"max_connections"}
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


@pytest.mark.integration
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
            assert not first.disconnected.is_set()
            assert not second.disconnected.is_set()
        finally:
            first.close()
            second.close()


@pytest.mark.integration
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
        assert len(evicted) >= 11
        assert {e["reason"] for e in evicted} == {"pending_per_source"}
    finally:
        for s in idle:
            s.close()


@pytest.mark.integration
@pytest.mark.mosquitto
@pytest.mark.parametrize(
    ("owner", "started_as", "runs_as"),
    [
        ("root", "root", "mosquitto"),  # drops to the mosquitto account, never stays root
        ("nobody", "root", "nobody"),  # drops to the PKI's owner, who can read its keys
        ("nobody", "nobody", "nobody"),  # started as the owner: the 'user' line is ignored
    ],
)
def test_generated_mosquitto_config_serves_as_root_and_as_the_pki_owner(
    tmp_path: Path, owner: str, started_as: str, runs_as: str
) -> None:
    import os
    import pwd

    import psutil

    from pacegate.pki import enroll_devices
    from pacegate.pki.mosquitto import mosquitto_conf
    from tests.support import let_others_through, mosquitto_broker

    if os.geteuid() != 0:
        pytest.skip("needs root to give the PKI to another account and start mosquitto as it")
    root = tmp_path / "pki"
    init_pki(root)
    enroll_devices(root, ["pm-0001"])
    if owner != "root":
        account = pwd.getpwnam(owner)
        for d, dirs, files in os.walk(root):
            for name in [d, *(os.path.join(d, n) for n in dirs + files)]:
                os.chown(name, account.pw_uid, account.pw_gid)
    assert f"user {runs_as if owner == 'root' else owner}" in mosquitto_conf(PkiLayout(root))
    let_others_through(tmp_path)
    run_as = None if started_as == "root" else started_as
    with mosquitto_broker(root, tmp_path / "mosquitto", run_as=run_as) as broker:
        assert wait_until(lambda: psutil.Process(broker.proc.pid).username() == runs_as), (
            psutil.Process(broker.proc.pid).username()
        )
        gw = _gateway(broker)
        dev = _connected(broker, "pm-0001")
        try:
            dev.publish(telemetry_topic("pm-0001"), b"sealed")
            assert wait_until(lambda: (telemetry_topic("pm-0001"), b"sealed") in gw.messages)
        finally:
            dev.close()
            gw.close()
        log = broker.log_text()
        # (the harness's port probe leaves an "OpenSSL Error" line: a TCP connect, no TLS)
        assert "Error: " not in log, log
        assert "should not be run as root" not in log, log
