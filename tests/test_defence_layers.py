"""Each layer of the broker's defence in depth, proved on its own.

The broker refuses a revoked device twice (the TLS handshake checks the CRL; the CONNECT is
checked against the revoked serials) and a false client id twice (the server's check before
any session is touched; the auth plugin's). A test that drives only the whole stack passes
when either layer of a pair is removed, so each layer gets its own test here: a scenario
where only that layer can refuse, or the layer's own function called directly.

Real parts: the PKI from ``pacegate pki``, the embedded broker as a subprocess for the
handshake and CONNECT-time checks, real TLS with the device's certificate; the server seam
and the plugin run in-process against the real broker class and loopback TCP.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker import plugins
from broker.amqtt_api import (
    Action,
    AMQTTError,
    Session,
    StreamReaderAdapter,
    StreamWriterAdapter,
)
from broker.config import BrokerConfig, load_broker_config, render_default_config
from broker.plugins import CertIdentityAuthPlugin
from broker.server import PacegateBroker
from device_sim.mqtt import MqttClientProtocol
from pacegate.layout import PkiLayout
from pacegate.pki import revoke_device
from pacegate.tlsconf import client_context, server_context
from tests.support import LOOPBACK, BrokerHandle

WAIT = 15.0
CONNACK_NOT_AUTHORIZED = b"\x20\x02\x00\x05"  # MQTT 3.1.1 CONNACK, return code 5


def _security_events(broker: BrokerHandle) -> list[dict[str, object]]:
    out = []
    for line in broker.log_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("logger") == "pacegate.security":
                out.append(rec)
    return out


def _wait_for_crl_reload(broker: BrokerHandle, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while broker.log_text().count("CRL reloaded") < count:
        assert time.monotonic() < deadline, (
            f"the broker never reloaded the CRL:\n{broker.log_text()}"
        )
        time.sleep(0.05)


def _tls_connect(broker: BrokerHandle, device_id: str) -> ssl.SSLSocket:
    """A TLS connection to the broker with ``device_id``'s certificate, handshake done."""
    pki = broker.pki
    ctx = client_context(pki.ca_cert, pki.device_cert(device_id), pki.device_key(device_id))
    raw = socket.create_connection((broker.host, broker.port), timeout=WAIT)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=broker.host)
    except BaseException:
        raw.close()
        raise
    return tls


# -- layer 1: the CRL in the TLS handshake ---------------------------------------------------
def test_server_context_with_a_crl_checks_the_leaf_certificate(pki: PkiLayout) -> None:
    with_crl = server_context(pki.broker_cert, pki.broker_key, pki.ca_cert, crl=pki.crl)
    assert with_crl.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    without = server_context(pki.broker_cert, pki.broker_key, pki.ca_cert)
    assert not without.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert with_crl.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.integration
def test_revoked_certificate_fails_the_tls_handshake_itself_once_the_crl_is_reloaded(
    embedded_broker: BrokerHandle,
) -> None:
    broker = embedded_broker
    revoke_device(broker.pki.root, "pm-0002")
    _wait_for_crl_reload(broker, 1)
    # TLS 1.3: the client's side of the handshake ends before the server has checked the
    # client certificate, so the server's refusal shows on the first read. OpenSSL writes a
    # certificate_revoked alert, but asyncio (CPython <= 3.14, gh-98078) force-closes the
    # transport without flushing it, so on this Python the client sees the connection end
    # before any MQTT byte; with the alert flushed (the fix, python/cpython#153620) it sees
    # the alert. Either way: no CONNACK, which is what a CONNECT-time refusal would send.
    with _tls_connect(broker, "pm-0002") as tls:
        tls.sendall(MqttClientProtocol().connect("pm-0002"))
        try:
            seen: bytes | str = tls.recv(16)
        except ssl.SSLError as exc:
            seen = str(exc)
        except ConnectionResetError:
            seen = b""
    assert seen == b"" or "CERTIFICATE_REVOKED" in str(seen).upper(), seen
    deadline = time.monotonic() + WAIT
    while not any(e["event"] == "tls_handshake_refused" for e in _security_events(broker)):
        assert time.monotonic() < deadline, _security_events(broker)
        time.sleep(0.05)
    refused = [e for e in _security_events(broker) if e["event"] == "tls_handshake_refused"]
    assert "revoked" in str(refused[0]["reason"]), refused
    # refused by TLS, so the CONNECT-time check never saw it
    assert not any(e["event"] == "connect_refused" for e in _security_events(broker))


# -- layer 2: the CONNECT-time revocation check -----------------------------------------------
@pytest.mark.integration
def test_connect_time_check_refuses_a_certificate_revoked_after_its_tls_handshake(
    embedded_broker: BrokerHandle,
) -> None:
    broker = embedded_broker
    with _tls_connect(broker, "pm-0003") as tls:
        # the handshake was accepted: no alert comes (a TLS 1.3 session ticket may)
        tls.settimeout(0.5)
        with pytest.raises(TimeoutError):
            tls.recv(16)
        revoke_device(broker.pki.root, "pm-0003")
        _wait_for_crl_reload(broker, 1)
        tls.settimeout(WAIT)
        tls.sendall(MqttClientProtocol().connect("pm-0003"))
        answer = b""
        while len(answer) < 4:
            chunk = tls.recv(4 - len(answer))
            if not chunk:
                break
            answer += chunk
    assert answer == CONNACK_NOT_AUTHORIZED
    events = _security_events(broker)
    assert any(
        e["event"] == "connect_refused"
        and e["reason"] == "certificate_revoked"
        and e["peer"] == "pm-0003"
        for e in events
    ), events
    assert not any(e["event"] == "tls_handshake_refused" for e in events)


# -- layers 3 and 4: client id == certificate CN, in the server and in the plugin ------------
def _der(pki: PkiLayout, device_id: str) -> bytes:
    cert = x509.load_pem_x509_certificate(pki.device_cert(device_id).read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def broker_cfg(pki_dir: Path, tmp_path: Path) -> BrokerConfig:
    path = tmp_path / "broker.yaml"
    path.write_text(render_default_config(pki_dir, host=LOOPBACK, port=0, config_dir=tmp_path))
    return load_broker_config(path)


def _session(pki: PkiLayout, device_id: str, *, keep_alive: int, port: int) -> Session:
    """A persistent session as the broker leaves it for ``device_id`` (bound to its cert)."""
    s = Session()
    s.client_id = device_id
    s.clean_session = False
    s.keep_alive = keep_alive
    s.remote_address, s.remote_port = LOOPBACK, port
    s.attributes[plugins.IDENTITY_KEY] = device_id
    s.attributes[plugins.CERT_KEY] = _der(pki, device_id)
    return s


def _snapshot(s: Session) -> dict[str, object]:
    return {
        "keep_alive": s.keep_alive,
        "remote": (s.remote_address, s.remote_port),
        "ssl_object": s.ssl_object,
        "parent": s.parent,
        "will": (s.will_flag, s.will_topic, s.will_message),
        "username": s.username,
        "attributes": dict(s.attributes),
    }


async def _connect_through_the_server_seam(
    broker: PacegateBroker, cert_der: bytes, connect: bytes
) -> tuple[BaseException | None, bytes]:
    """Run the broker's CONNECT handling (``_initialize_client_session``) for one loopback
    connection whose certificate is ``cert_der``; return what it raised and what it sent."""
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        plugins.CONN_CERT.set(cert_der)  # what the broker sets after the TLS handshake
        try:
            await broker._initialize_client_session(
                StreamReaderAdapter(reader), StreamWriterAdapter(writer), LOOPBACK, 40000
            )
        except BaseException as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(connect)
        await writer.drain()
        raised = await asyncio.wait_for(outcome, WAIT)
        answer = await asyncio.wait_for(reader.read(64), WAIT)
        writer.close()
        await writer.wait_closed()
        return raised, answer
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.integration
def test_server_refuses_a_client_id_that_is_not_the_certificate_cn_before_any_session(
    broker_cfg: BrokerConfig, pki: PkiLayout
) -> None:
    """pm-0002's certificate claims pm-0001 in a persistent-session CONNECT: the server seam
    refuses it by itself (the plugin never runs), and neither pm-0002's own session (the one
    amqtt would hand over) nor pm-0001's is modified."""

    async def run() -> None:
        broker = PacegateBroker(broker_cfg)
        own = _session(pki, "pm-0002", keep_alive=30, port=1111)
        victim = _session(pki, "pm-0001", keep_alive=45, port=2222)
        broker._sessions["pm-0002"] = (own, None)
        broker._sessions["pm-0001"] = (victim, None)
        before = {k: _snapshot(s) for k, (s, _) in broker._sessions.items()}
        for clean in (False, True):
            connect = MqttClientProtocol().connect("pm-0001", keepalive=5, clean_session=clean)
            raised, answer = await _connect_through_the_server_seam(
                broker, _der(pki, "pm-0002"), connect
            )
            assert isinstance(raised, AMQTTError)
            assert "client_id_mismatch" in str(raised)
            assert answer == CONNACK_NOT_AUTHORIZED
            assert {k: _snapshot(s) for k, (s, _) in broker._sessions.items()} == before
            assert broker._sessions["pm-0002"][0] is own
            assert broker._sessions["pm-0001"][0] is victim

    asyncio.run(run())


@pytest.mark.integration
def test_server_seam_accepts_the_certificates_own_client_id(
    broker_cfg: BrokerConfig, pki: PkiLayout
) -> None:
    """The control for the test above: the same seam, the right id, is not refused."""

    async def run() -> None:
        broker = PacegateBroker(broker_cfg)
        connect = MqttClientProtocol().connect("pm-0002", keepalive=5)
        raised, _ = await _connect_through_the_server_seam(broker, _der(pki, "pm-0002"), connect)
        assert raised is None

    asyncio.run(run())


@pytest.fixture
def auth_plugin(broker_cfg: BrokerConfig) -> Iterator[CertIdentityAuthPlugin]:
    loop = asyncio.new_event_loop()
    try:
        broker = loop.run_until_complete(_make_broker(broker_cfg))
        (plugin,) = [
            p for p in broker.plugins_manager.plugins if isinstance(p, CertIdentityAuthPlugin)
        ]
        yield plugin
    finally:
        loop.close()


async def _make_broker(cfg: BrokerConfig) -> PacegateBroker:
    return PacegateBroker(cfg)


def _authenticate(plugin: CertIdentityAuthPlugin, cert_der: bytes, session: Session) -> bool | None:
    async def run() -> bool | None:
        plugins.CONN_CERT.set(cert_der)
        return await plugin.authenticate(session=session)

    return asyncio.run(run())


def test_auth_plugin_refuses_a_session_whose_client_id_is_not_the_certificate_cn(
    auth_plugin: CertIdentityAuthPlugin, pki: PkiLayout
) -> None:
    """The plugin on its own, as if the server's check had let the CONNECT through."""
    claim = _session(pki, "pm-0002", keep_alive=5, port=3333)
    claim.client_id = "pm-0001"  # pm-0002's certificate, pm-0001's client id
    assert _authenticate(auth_plugin, _der(pki, "pm-0002"), claim) is False
    # a session bound to another identity than the connection's certificate: refused too
    bound_elsewhere = _session(pki, "pm-0001", keep_alive=5, port=3333)
    assert _authenticate(auth_plugin, _der(pki, "pm-0002"), bound_elsewhere) is False
    # no certificate at all
    assert _authenticate(auth_plugin, b"", _session(pki, "pm-0002", keep_alive=5, port=1)) is False
    # the control: the certificate's own id, bound to it, not revoked
    own = _session(pki, "pm-0002", keep_alive=5, port=3333)
    assert _authenticate(auth_plugin, _der(pki, "pm-0002"), own) is True


def test_auth_plugin_refuses_a_revoked_certificate_on_its_own(
    auth_plugin: CertIdentityAuthPlugin, pki: PkiLayout
) -> None:
    revoke_device(pki.root, "pm-0002")
    broker = auth_plugin.context._broker_instance
    assert broker.guard.reload_if_changed() is not None
    own = _session(pki, "pm-0002", keep_alive=5, port=3333)
    assert _authenticate(auth_plugin, _der(pki, "pm-0002"), own) is False
    other = _session(pki, "pm-0001", keep_alive=5, port=3333)
    assert _authenticate(auth_plugin, _der(pki, "pm-0001"), other) is True


# -- the topic ACL: an allowed decision is remembered, a refusal never is ---------------------
def test_topic_acl_remembers_what_it_allowed_per_identity_and_asks_again_for_each_refusal(
    broker_cfg: BrokerConfig, pki: PkiLayout, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker keeps allowed (identity, action, topic) decisions so that the plugin is not
    called for every publish; a refused one goes through the plugin, and is logged, each
    time, and what one identity was allowed never allows another."""

    async def run() -> None:
        broker = PacegateBroker(broker_cfg)
        (acl,) = [
            p for p in broker.plugins_manager.plugins if isinstance(p, plugins.TopicAclPlugin)
        ]
        asked: list[tuple[str | None, str]] = []
        judge = acl.topic_filtering

        async def counted(
            *,
            session: Session | None = None,
            topic: str | None = None,
            action: Action | None = None,
        ) -> bool | None:
            asked.append((plugins.session_identity(session), str(topic)))
            return await judge(session=session, topic=topic, action=action)

        acl.topic_filtering = counted  # type: ignore[method-assign]  # the real plugin, counted
        own = _session(pki, "pm-0001", keep_alive=5, port=1)
        other = _session(pki, "pm-0002", keep_alive=5, port=2)
        topic = "pacemakers/pm-0001/telemetry"
        publish = Action.PUBLISH
        for _ in range(3):
            assert await broker._topic_filtering(own, topic, publish) is True
        assert asked == [("pm-0001", topic)]  # asked once, then remembered
        for _ in range(2):
            assert await broker._topic_filtering(other, topic, publish) is False
        assert asked[1:] == [("pm-0002", topic)] * 2  # a refusal is asked (and logged) again
        # a subscription is another action: asked on its own
        assert await broker._topic_filtering(own, topic, Action.SUBSCRIBE) is False
        assert len(asked) == 4

    with caplog.at_level("WARNING", logger="pacegate.security"):
        asyncio.run(run())
    refused = [r for r in caplog.records if "publish_refused" in r.getMessage()]
    assert len(refused) == 2, [r.getMessage() for r in caplog.records]
