"""Channel identities: the PKI's ML-DSA-65 files load; every wrong file is refused with an
error that names the file and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pacegate.channel import ChannelIdentity, load_identity, load_public_key, write_identity
from pacegate.errors import ConfigError, LocalProtocolError
from pacegate.layout import PkiLayout


def test_identity_files_written_by_the_pki_load_and_sign_for_the_peer(tmp_path: Path) -> None:
    from pacegate.pki import add_channel_identity

    key_path, pub_path = add_channel_identity(tmp_path, "hospital")
    layout = PkiLayout(tmp_path)
    assert (key_path, pub_path) == (layout.channel_key("hospital"), layout.channel_pub("hospital"))
    identity = load_identity(key_path, "hospital")
    pinned = load_public_key(pub_path)
    pinned.verify(identity.private_key.sign(b"transcript"), b"transcript")
    assert identity.public_pem() == pub_path.read_bytes()


def test_write_identity_round_trips_with_a_private_key_mode_0600(tmp_path: Path) -> None:
    original = ChannelIdentity.generate("gateway")
    key, pub = tmp_path / "gateway.mldsa.key", tmp_path / "gateway.mldsa.pub"
    write_identity(original, key, pub)
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert load_identity(key, "gateway").public_pem() == original.public_pem()
    assert load_public_key(pub).public_bytes_raw() == original.public_key.public_bytes_raw()


def test_private_key_readable_by_others_is_refused_with_a_chmod_fix(tmp_path: Path) -> None:
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    write_identity(ChannelIdentity.generate("gateway"), key, pub)
    key.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_identity(key, "gateway")
    assert str(key) in str(info.value)
    assert "chmod 600" in str(info.value)


def test_missing_key_file_names_the_file_and_the_pki_command(tmp_path: Path) -> None:
    missing = tmp_path / "channel" / "hospital.mldsa.key"
    with pytest.raises(ConfigError) as info:
        load_identity(missing, "hospital")
    assert str(missing) in str(info.value)
    assert "pacegate pki init" in str(info.value)
    with pytest.raises(ConfigError):
        load_public_key(tmp_path / "nope.pub")


def test_a_key_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    key = tmp_path / "ec.key"
    key.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="not an ML-DSA-65 key"):
        load_identity(key, "gateway")
    pub = tmp_path / "ec.pub"
    pub.write_bytes(
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError, match="not ML-DSA-65"):
        load_public_key(pub)


def test_garbage_files_are_refused_as_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError):
        load_identity(bad, "gateway")
    with pytest.raises(ConfigError):
        load_public_key(bad)


@pytest.mark.parametrize("name", ["", "Hospital", "a b", "x" * 65, "-lead", "é", "gate.way"])
def test_peer_names_outside_the_alphabet_are_refused(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        ChannelIdentity.generate(name)


def test_identity_repr_never_shows_the_key() -> None:
    assert "private_key" not in repr(ChannelIdentity.generate("cloud"))
