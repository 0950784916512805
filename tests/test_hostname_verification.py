"""TLS clients refuse a server certificate issued (by the right CA) for another name.

A certificate from the pacegate CA is not enough: it must name the host the client meant,
or any enrolled service's certificate (or a stolen broker key for another site's name)
could stand in for the broker. Real parts: a PKI from ``pacegate pki`` whose broker
certificate names only ``elsewhere.example``, the real embedded broker on loopback, the
device's TLS stream and the gateway's paho client as the services build them.

The PQ channel (gateway -> hospital -> cloud) runs no TLS and uses no host names: the client
pins the server's ML-DSA-65 public key and its identity name (``hospital``, ``cloud``), which
the server signs into the transcript; a server proving another name is refused
(``tests/test_channel_loopback.py::test_server_with_another_pinned_name_is_refused_by_the_client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from console.workdir import WorkLayout, gateway_config_text
from device_sim.mqtt import MqttConnection
from gateway.config import load_gateway_config
from gateway.service import Gateway
from pacegate.layout import PkiLayout
from pacegate.pki import enroll_devices, init_pki
from pacegate.tlsconf import client_context, server_context
from tests.support import LOOPBACK, BrokerHandle, embedded_broker, free_port

OTHER_NAME = "elsewhere.example"
WAIT = 15.0


@pytest.fixture
def misnamed_pki(tmp_path: Path) -> PkiLayout:
    """A PKI whose broker certificate names only another host (not 127.0.0.1)."""
    root = tmp_path / "pki"
    init_pki(root, broker_hosts=[OTHER_NAME])
    enroll_devices(root, ["pm-0001"])
    return PkiLayout(root)


@pytest.fixture
def misnamed_broker(misnamed_pki: PkiLayout, tmp_path: Path) -> Iterator[BrokerHandle]:
    with embedded_broker(misnamed_pki.root, tmp_path / "broker") as handle:
        yield handle


@contextlib.contextmanager
def tls_server(pki: PkiLayout) -> Iterator[int]:
    """A blocking TLS server on loopback with the broker certificate; answers b"ok"."""
    ctx = server_context(pki.broker_cert, pki.broker_key, pki.ca_cert)
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(0.2)  # so that the thread sees ``stop`` (close does not wake accept)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(WAIT)
            with conn:
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (OSError, ssl.SSLError):
                    pass  # the client refused us: what the tests expect

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()
        thread.join(WAIT)


def _handshake(ctx: ssl.SSLContext, port: int, server_hostname: str) -> bytes:
    with (
        socket.create_connection((LOOPBACK, port), timeout=WAIT) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return tls.recv(2)


# -- tlsconf.client_context, the one client context of every pacegate TLS client ------------
def test_client_context_checks_the_host_name_and_requires_a_certificate(pki: PkiLayout) -> None:
    ctx = client_context(pki.ca_cert, pki.gateway_cert, pki.gateway_key)
    assert ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    named = client_context(pki.ca_cert, pki.gateway_cert, pki.gateway_key, server_name="x.y")
    assert named.check_hostname
    assert named.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.integration
def test_client_context_refuses_a_server_certificate_for_another_host(
    misnamed_pki: PkiLayout,
) -> None:
    pki = misnamed_pki
    ctx = client_context(pki.ca_cert, pki.device_cert("pm-0001"), pki.device_key("pm-0001"))
    with tls_server(pki) as port:
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            _handshake(ctx, port, LOOPBACK)
        assert "mismatch" in str(err.value.verify_message), err.value
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(ctx, port, "localhost")
        # the control: the same certificate, the name it carries, is accepted
        assert _handshake(ctx, port, OTHER_NAME) == b"ok"


@pytest.mark.integration
def test_client_context_with_a_server_name_verifies_that_name_not_the_address(
    misnamed_pki: PkiLayout,
) -> None:
    pki = misnamed_pki
    cert, key = pki.device_cert("pm-0001"), pki.device_key("pm-0001")
    with tls_server(pki) as port:
        right = client_context(pki.ca_cert, cert, key, server_name=OTHER_NAME)
        assert _handshake(right, port, LOOPBACK) == b"ok"
        wrong = client_context(pki.ca_cert, cert, key, server_name="broker.other-site.example")
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(wrong, port, OTHER_NAME)


# -- the device's MQTT client ---------------------------------------------------------------
@pytest.mark.integration
def test_device_refuses_a_broker_whose_certificate_names_another_host(
    misnamed_broker: BrokerHandle,
) -> None:
    pki = misnamed_broker.pki
    ctx = client_context(pki.ca_cert, pki.device_cert("pm-0001"), pki.device_key("pm-0001"))

    async def connect() -> None:
        conn = await MqttConnection.open(
            misnamed_broker.host, misnamed_broker.port, ctx, "pm-0001", timeout=WAIT
        )
        conn.close()  # not reached if the name is checked

    with pytest.raises(ssl.SSLCertVerificationError) as err:
        asyncio.run(connect())
    assert "mismatch" in str(err.value.verify_message), err.value


# -- the gateway's MQTT client (paho) ----------------------------------------------------------
def _gateway(work: Path, broker: BrokerHandle, server_name: str | None) -> Gateway:
    text = gateway_config_text(
        WorkLayout(work),
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        hospital_host=LOOPBACK,
        hospital_port=free_port(),
        metrics_port=0,
    )
    if server_name is not None:
        text = text.replace("\nmqtt:", f"\nmqtt:\n  server_name: {server_name}", 1)
    (work / "gateway.yaml").write_text(text)
    cfg = load_gateway_config(work / "gateway.yaml")
    assert cfg.mqtt.server_name == server_name
    return Gateway(cfg, use_channel=False)


def _close_what_paho_drops(client: object) -> list[ssl.SSLSocket]:
    """paho drops (without closing) the TLS socket of a failed handshake: keep hold of the
    sockets its context wraps, so the test can close them (the wrapping is unchanged)."""
    ctx = client._ssl_context  # type: ignore[attr-defined]
    wrapped: list[ssl.SSLSocket] = []
    original = ctx.wrap_socket

    def wrap(*args: object, **kwargs: object) -> ssl.SSLSocket:
        sock: ssl.SSLSocket = original(*args, **kwargs)
        wrapped.append(sock)
        return sock

    ctx.wrap_socket = wrap
    return wrapped


@pytest.mark.integration
def test_gateway_refuses_a_broker_whose_certificate_names_another_host(
    misnamed_broker: BrokerHandle, tmp_path: Path
) -> None:
    for server_name in (None, "broker.other-site.example"):
        gw = _gateway(tmp_path, misnamed_broker, server_name)
        client = gw._make_client()  # the builder the running gateway uses
        dropped = _close_what_paho_drops(client)
        try:
            with pytest.raises(ssl.SSLCertVerificationError) as err:
                client.connect(misnamed_broker.host, misnamed_broker.port)
            assert "mismatch" in str(err.value.verify_message), err.value
        finally:
            for sock in dropped:
                sock.close()
            gw.spool.close()
            gw.replay.close()


@pytest.mark.integration
def test_gateway_with_the_brokers_certificate_name_as_server_name_connects(
    misnamed_broker: BrokerHandle, tmp_path: Path
) -> None:
    """The control: ``mqtt.server_name`` naming what the certificate says is accepted."""
    gw = _gateway(tmp_path, misnamed_broker, OTHER_NAME)
    client = gw._make_client()
    try:
        assert client.connect(misnamed_broker.host, misnamed_broker.port) == 0
        client.disconnect()
    finally:
        gw.spool.close()
        gw.replay.close()
