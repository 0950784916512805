"""The PKI: what `pacegate pki init|enroll|revoke` writes, and what it refuses."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from console.cli import main as cli_main
from pacegate.identity import device_san_uri
from pacegate.keystore import PskStore
from pacegate.layout import PkiLayout
from pacegate.pki import (
    PkiError,
    add_channel_identity,
    device_ids,
    enroll_device,
    enroll_devices,
    init_pki,
    revoke_device,
)
from pacegate.pki.crl import revoked_serials


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def test_private_keys_and_psks_are_owner_only(pki: PkiLayout) -> None:
    secrets = [pki.ca_key, pki.broker_key, pki.gateway_key, pki.psk_store, pki.psk_store_key]
    secrets += [pki.device_key("pm-0001"), pki.device_psk("pm-0001")]
    secrets += [pki.channel_key(n) for n in ("hospital", "gateway", "cloud")]
    for p in secrets:
        assert _mode(p) == 0o600, p


def test_ca_has_the_extensions_of_a_ca(pki: PkiLayout) -> None:
    ca = _cert(pki.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_device_certificate_names_the_device_and_chains_to_the_ca(pki: PkiLayout) -> None:
    cert = _cert(pki.device_cert("pm-0002"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pm-0002"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [device_san_uri("pm-0002")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 91
    verifier = PolicyBuilder().store(Store([_cert(pki.ca_cert)])).build_client_verifier()
    verifier.verify(cert, [])


def test_broker_certificate_covers_the_configured_hosts(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "p", broker_hosts=["mqtt.ward.example", "10.0.0.5"])
    cert = _cert(layout.broker_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.ward.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_every_client_identity_carries_client_auth_and_only_the_broker_server_auth(
    pki: PkiLayout,
) -> None:
    """Both brokers refuse a client certificate whose extendedKeyUsage lacks clientAuth, and
    the embedded broker one without any: pacegate issues exactly one usage to each."""
    clients = [pki.gateway_cert, pki.mosquitto_admin_cert, pki.device_cert("pm-0001")]
    for path in clients:
        eku = _cert(path).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH], path.name
    eku = _cert(pki.broker_cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_only_the_mosquitto_admin_identity_may_command_the_dynamic_security_plugin(
    pki: PkiLayout,
) -> None:
    cn = _cert(pki.mosquitto_admin_cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn[0].value == "mosquitto-admin"
    assert stat.S_IMODE(pki.mosquitto_admin_key.stat().st_mode) == 0o600
    with pytest.raises(PkiError, match="reserved"):
        enroll_device(pki.root, "mosquitto-admin")
    acl = (pki.mosquitto_dir / "acl").read_text().split("\n\n")
    control = [block for block in acl if "$CONTROL" in block]
    assert control == [
        "# Only 'pacegate pki revoke' (its mosquitto-admin certificate) commands the\n"
        "# dynamic-security plugin, which closes a revoked device's live session.\n"
        "user mosquitto-admin\ntopic readwrite $CONTROL/dynamic-security/#\n"
        "topic deny pacemakers/mosquitto-admin/telemetry"
    ]
    # a PKI made before this identity existed gets it at its next revocation
    pki.mosquitto_admin_cert.unlink()
    revoke_device(pki.root, "pm-0003")
    assert "CN=mosquitto-admin" in _cert(pki.mosquitto_admin_cert).subject.rfc4514_string()
    dynsec = json.loads(pki.mosquitto_dynsec.read_text())
    assert {a["allow"] for a in dynsec["defaultACLAccess"]} == {False}  # defers to acl_file
    assert dynsec["clients"] == dynsec["roles"] == dynsec["groups"] == []


def test_each_device_gets_a_fresh_psk_kept_in_the_encrypted_store(pki: PkiLayout) -> None:
    store = PskStore.load(pki.psk_store, pki.psk_store_key)
    psks = {d: pki.device_psk(d).read_bytes() for d in ("pm-0001", "pm-0002", "pm-0003")}
    assert all(len(p) == 32 for p in psks.values())
    assert len(set(psks.values())) == 3
    for did, psk in psks.items():
        entry = store.get(did)
        assert entry is not None
        assert entry.psk == psk
        assert not entry.revoked
        assert psk not in pki.psk_store.read_bytes()


def test_init_refuses_to_overwrite_a_ca_without_force(pki: PkiLayout) -> None:
    before = pki.ca_cert.read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        init_pki(pki.root)
    assert pki.ca_cert.read_bytes() == before
    init_pki(pki.root, force=True)
    assert pki.ca_cert.read_bytes() != before
    assert not pki.device_dir("pm-0001").exists()


@pytest.mark.parametrize("bad", ["PM-1", "pm/1", "pm+1", "pm#1", "..", "a.b", "", "gateway"])
def test_unsafe_device_ids_are_refused(pki: PkiLayout, bad: str) -> None:
    with pytest.raises(PkiError):
        enroll_device(pki.root, bad)


def test_duplicate_and_unknown_ids_get_clear_errors(pki: PkiLayout) -> None:
    with pytest.raises(PkiError, match="'pm-0001' is already enrolled"):
        enroll_device(pki.root, "pm-0001")
    with pytest.raises(PkiError, match="given twice"):
        enroll_devices(pki.root, ["pm-0100", "pm-0100"])
    with pytest.raises(PkiError, match="'pm-9999' is not enrolled"):
        revoke_device(pki.root, "pm-9999")


def test_revocation_resigns_the_crl_and_marks_the_psk_revoked(pki: PkiLayout) -> None:
    serial = _cert(pki.device_cert("pm-0002")).serial_number
    assert revoked_serials(pki.crl) == frozenset()
    revoke_device(pki.root, "pm-0002")
    assert revoked_serials(pki.crl) == {serial}
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.is_signature_valid(_cert(pki.ca_cert).public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > datetime.now(UTC)
    entry = PskStore.load(pki.psk_store, pki.psk_store_key).get("pm-0002")
    assert entry is not None
    assert entry.revoked
    acl = (pki.mosquitto_dir / "acl").read_text()
    assert "user pm-0002\ntopic deny #" in acl
    with pytest.raises(PkiError, match="already revoked"):
        revoke_device(pki.root, "pm-0002")


def test_bulk_enrolment_writes_every_bundle_and_one_store(pki: PkiLayout) -> None:
    ids = [f"bulk-{i:04d}" for i in range(300)]
    dirs = enroll_devices(pki.root, ids)
    assert [d.name for d in dirs] == ids
    store = PskStore.load(pki.psk_store, pki.psk_store_key)
    assert len(store) == 303
    assert all(store.get(i) is not None for i in ids)


def test_pq_channel_identities_are_ml_dsa_65_key_pairs(pki: PkiLayout, tmp_path: Path) -> None:
    add_channel_identity(pki.root, "gateway-2")
    for name in ("hospital", "gateway", "cloud", "gateway-2"):
        key = serialization.load_pem_private_key(pki.channel_key(name).read_bytes(), None)
        pub = serialization.load_pem_public_key(pki.channel_pub(name).read_bytes())
        assert isinstance(key, mldsa.MLDSA65PrivateKey)
        assert isinstance(pub, mldsa.MLDSA65PublicKey)
        pub.verify(key.sign(b"hello"), b"hello")


def test_cli_enrolls_and_revokes_without_printing_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "certs"
    assert cli_main(["pki", "init", "--dir", str(d)]) == 0
    assert cli_main(["pki", "enroll", "pm-0042", "--dir", str(d), "--days", "30"]) == 0
    assert cli_main(["pki", "enroll", "pm-0042", "--dir", str(d)]) == 1
    assert cli_main(["pki", "revoke", "pm-0042", "--dir", str(d)]) == 0
    assert cli_main(["pki", "init", "--dir", str(d)]) == 1
    out = capsys.readouterr()
    layout = PkiLayout(d)
    psk = layout.device_psk("pm-0042").read_bytes()
    key_pem = layout.device_key("pm-0042").read_text()
    for secret in (psk.hex(), key_pem.splitlines()[1]):
        assert secret not in out.out + out.err
    assert "already enrolled" in out.err


@pytest.mark.integration
def test_concurrent_enrolments_lose_no_device(tmp_path: Path) -> None:
    import multiprocessing

    root = tmp_path / "pki"
    init_pki(root)
    ctx = multiprocessing.get_context("spawn")
    batches = [[f"pm-{w}{i:03d}" for i in range(20)] for w in range(4)]
    procs = [ctx.Process(target=enroll_devices, args=(root, ids)) for ids in batches]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = PskStore.load(PkiLayout(root).psk_store, PkiLayout(root).psk_store_key)
    assert sorted(store.device_ids()) == sorted(d for ids in batches for d in ids)
    assert sorted(device_ids(root)) == sorted(store.device_ids())


def test_interrupted_enrolment_names_the_directory_to_remove(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    layout = init_pki(root)
    layout.device_dir("pm-0009").mkdir(parents=True)
    with pytest.raises(PkiError, match="interrupted"):
        enroll_device(root, "pm-0009")


# -- re-keying a device (the recovery for a lost or damaged counter file) ------------------
def test_enrolment_writes_the_devices_counter_file(pki: PkiLayout) -> None:
    from pacegate import counterfile

    path = pki.device_counter("pm-0001")
    assert _mode(path) == 0o600
    assert counterfile.read(path, "pm-0001") == 0


def test_rekey_device_replaces_the_psk_everywhere_and_starts_a_fresh_counter(
    pki: PkiLayout,
) -> None:
    from device_sim.counter import CounterStore
    from pacegate import counterfile
    from pacegate.pki import rekey_device

    old = pki.device_psk("pm-0001").read_bytes()
    used = CounterStore(pki.device_counter("pm-0001"), "pm-0001", block=8)
    last = max(used.next() for _ in range(20))
    pki.device_counter("pm-0001").unlink()  # lost: the device refuses to start
    rekey_device(pki.root, "pm-0001")
    new = pki.device_psk("pm-0001").read_bytes()
    assert len(new) == 32
    assert new != old
    assert _mode(pki.device_psk("pm-0001")) == 0o600
    store = PskStore.load(pki.psk_store, pki.psk_store_key)
    entry = store.get("pm-0001")
    assert entry is not None
    assert entry.psk == new
    assert not entry.revoked
    assert all(k.psk != old for k in (store.get(d) for d in store.device_ids()) if k)
    # counters start above every counter the old key can have used
    fresh = CounterStore(pki.device_counter("pm-0001"), "pm-0001", block=8)
    assert fresh.next() == counterfile.GENERATION_STRIDE + 1 > last
    rekey_device(pki.root, "pm-0001")  # a second re-key moves on again
    again = CounterStore(pki.device_counter("pm-0001"), "pm-0001").next()
    assert again == 2 * counterfile.GENERATION_STRIDE + 1
    # the other devices are untouched
    other = store.get("pm-0002")
    assert other is not None
    assert other.psk == pki.device_psk("pm-0002").read_bytes()


def test_a_revoked_or_unknown_device_is_never_rekeyed(pki: PkiLayout) -> None:
    from pacegate.pki import rekey_device

    revoke_device(pki.root, "pm-0002")
    before = pki.device_psk("pm-0002").read_bytes()
    with pytest.raises(PkiError, match="revoked"):
        rekey_device(pki.root, "pm-0002")
    assert pki.device_psk("pm-0002").read_bytes() == before
    entry = PskStore.load(pki.psk_store, pki.psk_store_key).get("pm-0002")
    assert entry is not None
    assert entry.revoked
    with pytest.raises(PkiError, match="not enrolled"):
        rekey_device(pki.root, "pm-9999")


def test_cli_rekey_device_prints_no_secret(
    pki: PkiLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["pki", "rekey-device", "pm-0003", "--dir", str(pki.root)]) == 0
    out = capsys.readouterr()
    assert "re-keyed pm-0003" in out.err
    assert pki.device_psk("pm-0003").read_bytes().hex() not in out.out + out.err


# -- the PSK store's generation (an older store file put back) ------------------------------
def test_psk_store_generation_is_recorded_beside_the_store_key(pki: PkiLayout) -> None:
    from pacegate.keystore import generation_path, read_generation

    gen_file = generation_path(pki.psk_store_key)
    assert gen_file.parent == pki.psk_store_key.parent
    assert _mode(gen_file) == 0o600
    before = read_generation(pki.psk_store_key)
    assert before is not None
    revoke_device(pki.root, "pm-0001")
    assert read_generation(pki.psk_store_key) == before + 1
    assert PskStore.load(pki.psk_store, pki.psk_store_key).generation == before + 1


def test_older_psk_store_put_back_is_refused_naming_the_file_and_the_fix(
    pki: PkiLayout,
) -> None:
    from pacegate.errors import ConfigError

    old = pki.psk_store.read_bytes()
    revoke_device(pki.root, "pm-0001")
    pki.psk_store.write_bytes(old)  # the copy in which pm-0001 is still active
    with pytest.raises(ConfigError, match="older copy of the store was put back") as err:
        PskStore.load(pki.psk_store, pki.psk_store_key)
    assert str(pki.psk_store) in str(err.value)
    assert "psk.generation" in str(err.value)
    assert "newest psk.store" in str(err.value)


def test_psk_store_generation_cannot_be_edited_without_the_key(pki: PkiLayout) -> None:
    from pacegate.errors import ConfigError

    blob = bytearray(pki.psk_store.read_bytes())
    blob[5 + 7] ^= 0x7F  # the generation's low byte: higher, to pass the rollback check
    pki.psk_store.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="does not decrypt"):
        PskStore.load(pki.psk_store, pki.psk_store_key)


def test_missing_generation_file_is_refused(pki: PkiLayout) -> None:
    from pacegate.errors import ConfigError
    from pacegate.keystore import generation_path

    generation_path(pki.psk_store_key).unlink()
    with pytest.raises(ConfigError, match="generation file is missing"):
        PskStore.load(pki.psk_store, pki.psk_store_key)


def test_store_saved_but_generation_not_yet_recorded_still_loads(pki: PkiLayout) -> None:
    """A crash between the two writes leaves a store newer than the record: it is current."""
    from pacegate.keystore import generation_path

    gen_file = generation_path(pki.psk_store_key)
    recorded = gen_file.read_bytes()
    revoke_device(pki.root, "pm-0001")
    gen_file.write_bytes(recorded)  # as if the crash came before the record was written
    store = PskStore.load(pki.psk_store, pki.psk_store_key)
    entry = store.get("pm-0001")
    assert entry is not None
    assert entry.revoked


def test_store_from_before_generations_loads_until_a_generation_is_recorded(
    pki: PkiLayout,
) -> None:
    """A v1 store (no generation) of an existing installation still loads, and its first save
    upgrades it; once a generation is recorded, a v1 file is an old copy put back."""
    import json
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pacegate.errors import ConfigError
    from pacegate.keystore import generation_path

    key = pki.psk_store_key.read_bytes()
    data: dict[str, dict[str, str]] = {"devices": {}}
    nonce = os.urandom(12)
    v1 = b"PGKS\x01" + nonce + AESGCM(key).encrypt(nonce, json.dumps(data).encode(), b"PGKS\x01")
    pki.psk_store.write_bytes(v1)
    with pytest.raises(ConfigError, match="older copy"):
        PskStore.load(pki.psk_store, pki.psk_store_key)
    generation_path(pki.psk_store_key).unlink()
    store = PskStore.load(pki.psk_store, pki.psk_store_key)
    assert store.generation == 0
    assert len(store) == 0
    store.save()
    assert pki.psk_store.read_bytes()[4] == 2
    assert generation_path(pki.psk_store_key).exists()
