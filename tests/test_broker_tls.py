"""TLS on both brokers, seen by independent clients: sslyze's scan of the versions and
suites each broker accepts, and client certificates that are not meant for a TLS client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pacegate.layout import PkiLayout
from tests.support import (
    MOSQUITTO,
    BrokerHandle,
    MqttClient,
    client_tls_context,
    connect_as,
    free_port,
    let_others_through,
    try_connect,
    wait_until,
)

# every test here starts or reaches a process or a server
pytestmark = pytest.mark.integration

# sslyze pins cryptography < 47 and pacegate needs >= 48 (ML-KEM): ./dev setup installs it
# in its own virtualenv from requirements-sslyze.lock and ./dev test exports its path.
SSLYZE_ENV = "PACEGATE_SSLYZE"
SSLYZE_TIMEOUT = 300  # a scan takes about a second; the machine is shared and noisy
OLD_VERSIONS = (
    "ssl_2_0_cipher_suites",
    "ssl_3_0_cipher_suites",
    "tls_1_0_cipher_suites",
    "tls_1_1_cipher_suites",
)


def _sslyze() -> str:
    found = os.environ.get(SSLYZE_ENV) or shutil.which("sslyze")
    repo_venv = Path(__file__).resolve().parent.parent / ".venv-sslyze" / "bin" / "sslyze"
    if not found and repo_venv.exists():
        found = str(repo_venv)
    assert found, (
        f"sslyze not found: run ./dev setup (it installs .venv-sslyze) or set {SSLYZE_ENV}"
    )
    return found


def _scan(broker: BrokerHandle, tmp_path: Path) -> dict[str, list[str]]:
    """Accepted suite names per scan ("tls_1_2_cipher_suites": [...]); sslyze presents
    pm-0001's certificate, since both brokers refuse a handshake without one."""
    out = tmp_path / "sslyze.json"
    subprocess.run(
        [
            _sslyze(),
            "--cert",
            str(broker.pki.device_cert("pm-0001")),
            "--key",
            str(broker.pki.device_key("pm-0001")),
            "--sslv2",
            "--sslv3",
            "--tlsv1",
            "--tlsv1_1",
            "--tlsv1_2",
            "--tlsv1_3",
            "--quiet",
            "--json_out",
            str(out),
            f"{broker.host}:{broker.port}",
        ],
        check=True,
        capture_output=True,
        timeout=SSLYZE_TIMEOUT,
    )
    (server,) = json.loads(out.read_text())["server_scan_results"]
    assert server["connectivity_status"] == "COMPLETED", server.get("connectivity_error_trace")
    accepted = {}
    for name, attempt in server["scan_result"].items():
        if attempt and attempt["status"] == "COMPLETED" and name.endswith("_cipher_suites"):
            suites = attempt["result"]["accepted_cipher_suites"]
            accepted[name] = [s["cipher_suite"]["name"] for s in suites]
    assert set(accepted) >= {*OLD_VERSIONS, "tls_1_2_cipher_suites", "tls_1_3_cipher_suites"}
    return accepted


def test_tls12_offers_only_ecdhe_aead_suites_and_older_versions_are_refused(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    accepted = _scan(broker, tmp_path)
    for old in OLD_VERSIONS:
        assert accepted[old] == [], f"{broker.kind} accepts {old}: {accepted[old]}"
    tls12 = accepted["tls_1_2_cipher_suites"]
    assert tls12, f"{broker.kind} accepts no TLS 1.2 suite (ESP32-class devices need one)"
    for suite in tls12:
        assert suite.startswith("TLS_ECDHE_"), f"{suite}: no forward secrecy"
        assert "_GCM_" in suite or "_CHACHA20_POLY1305_" in suite, f"{suite}: not an AEAD"
    assert accepted["tls_1_3_cipher_suites"], "TLS 1.3 must stay available"


def _issue_client_cert(
    pki: PkiLayout, tmp_path: Path, cn: str, eku: list[x509.ObjectIdentifier] | None
) -> tuple[Path, Path]:
    """A certificate signed by the site's own CA with the given extendedKeyUsage (None: no
    such extension), as a CA operator could issue by hand or an older tool did."""
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = tmp_path / f"{cn}.crt", tmp_path / f"{cn}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _connects_with(broker: BrokerHandle, cert: Path, key: Path, client_id: str) -> bool:
    outcome, client = try_connect(
        broker.host, broker.port, ca=broker.pki.ca_cert, cert=cert, key=key, client_id=client_id
    )
    if client is not None:
        client.close()
    return outcome.connected


def test_ca_signed_certificate_for_servers_only_is_refused_as_a_client(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    cert, key = _issue_client_cert(
        broker.pki, tmp_path, "pm-0009", [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert not _connects_with(broker, cert, key, "pm-0009")
    if broker.kind == "mosquitto":  # OpenSSL's ssl_client purpose check, at the handshake
        broker.wait_for_log("certificate verify failed")
    else:
        broker.wait_for_log("unsuitable certificate purpose")
    genuine = broker.pki.device_cert("pm-0001"), broker.pki.device_key("pm-0001")
    assert _connects_with(broker, *genuine, "pm-0001")


def test_ca_signed_certificate_without_extended_key_usage_is_refused_as_a_client(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """OpenSSL's ssl_client purpose accepts a certificate with no extendedKeyUsage at all;
    the embedded broker closes it after the handshake, mosquitto's identity plugin refuses
    its CONNECT (mosquitto/plugin/pacegate_cert_identity.c)."""
    cert, key = _issue_client_cert(broker.pki, tmp_path, "pm-0009", None)
    assert not _connects_with(broker, cert, key, "pm-0009")
    broker.wait_for_log("client_certificate_without_client_auth")
    # a genuine device, whose certificate says clientAuth, still gets in
    genuine = broker.pki.device_cert("pm-0001"), broker.pki.device_key("pm-0001")
    assert _connects_with(broker, *genuine, "pm-0001")


def test_certificate_without_client_auth_cannot_take_over_the_session_of_its_cn(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """A CA-signed certificate with no extendedKeyUsage and the CN of the connected
    gateway is refused before the broker looks up that session: the gateway stays."""
    gateway = connect_as(broker, "gateway")[1]
    assert gateway is not None
    try:
        cert, key = _issue_client_cert(broker.pki, tmp_path, "gateway", None)
        assert not _connects_with(broker, cert, key, "gateway")
        broker.wait_for_log("client_certificate_without_client_auth")
        time.sleep(0.5)  # a takeover would have closed the gateway's connection by now
        assert not gateway.disconnected.is_set()
    finally:
        gateway.close()


@pytest.mark.mosquitto
def test_mosquitto_refuses_its_own_server_certificate_as_a_client(
    mosquitto_broker: BrokerHandle,
) -> None:
    """The broker's certificate (serverAuth only, CN localhost) is CA-signed: OpenSSL's
    purpose check refuses it at the handshake, the plugin would refuse it again."""
    broker = mosquitto_broker
    assert not _connects_with(broker, broker.pki.broker_cert, broker.pki.broker_key, "localhost")
    broker.wait_for_log("certificate verify failed")


@pytest.mark.mosquitto
def test_mosquitto_will_not_start_without_the_identity_plugin(
    pki: PkiLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration generated where the plugin was never built still names it, so
    mosquitto stops at start naming the file, instead of serving without the check."""
    import pacegate.pki.mosquitto as generator

    missing = tmp_path / "not-built" / "pacegate_cert_identity.so"
    monkeypatch.setattr(generator, "IDENTITY_PLUGIN", missing)
    conf = generator.mosquitto_conf(pki, port=free_port())
    assert "# MISSING: build it with './dev setup'" in conf
    if os.geteuid() == 0:  # mosquitto drops to its account before it opens anything
        let_others_through(pki.root.resolve().parent)
    path = tmp_path / "mosquitto.conf"
    path.write_text("log_dest stderr\n" + conf)
    path.chmod(0o644)
    done = subprocess.run(
        [MOSQUITTO, "-c", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0
    assert f'Unable to load auth plugin "{missing}"' in done.stdout + done.stderr


@pytest.mark.mosquitto
def test_mosquitto_refuses_an_mqtt5_authentication_method_that_skips_the_identity_plugin(
    mosquitto_broker: BrokerHandle, tmp_path: Path
) -> None:
    """An MQTT 5 CONNECT that names an authentication method goes to extended
    authentication instead of the basic-auth event the plugin answers; no plugin handles
    it, so mosquitto refuses the client (src/security.c, mosquitto_security_auth_start)."""
    broker = mosquitto_broker
    cert, key = _issue_client_cert(broker.pki, tmp_path, "pm-0009", None)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
        client_id="pm-0009",
        protocol=mqtt.MQTTv5,
    )
    tls = client_tls_context(broker.pki.ca_cert, cert, key)
    client.tls_set_context(tls)
    wrapper = MqttClient(client, tls)
    try:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.AuthenticationMethod = "SCRAM-SHA-256"
        client.connect(broker.host, broker.port, keepalive=30, properties=props)
        client.loop_start()
        assert wait_until(lambda: wrapper.connected.is_set() or wrapper.disconnected.is_set())
        assert not wrapper.connected.is_set()
        assert wrapper.connack_reason == "Bad authentication method"
    finally:
        wrapper.close()
