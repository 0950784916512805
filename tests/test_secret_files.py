"""One secret-file loader (pacegate/secretfile.py): a key, PSK or keyring that is missing,
readable or writable by others, not a regular file, or too large is refused with the file
and the fix; and every loader of a secret goes through it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from device_sim.fleet import load_bundle
from gateway.spool import Spool
from hospital.keyring import Keyring
from pacegate.channel.identity import load_identity
from pacegate.errors import ConfigError
from pacegate.keystore import PskStore
from pacegate.layout import PkiLayout, write_secret
from pacegate.pki import enroll_device
from pacegate.secretfile import read_secret
from pacegate.tlsconf import client_context

FIX = "restore it from the backup"


def _secret(tmp_path: Path, mode: int = 0o600, data: bytes = b"k" * 32) -> Path:
    path = tmp_path / "some.key"
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_secret_is_read(tmp_path: Path, mode: int) -> None:
    assert read_secret(_secret(tmp_path, mode), "test key", missing_fix=FIX) == b"k" * 32


def test_missing_secret_names_the_file_and_the_given_fix(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(ConfigError) as err:
        read_secret(path, "test key", missing_fix=FIX, key="store.key")
    text = str(err.value)
    assert str(path) in text
    assert "test key not found" in text
    assert FIX in text
    assert err.value.key == "store.key"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700, 0o666])
def test_secret_with_a_mode_wider_than_0600_is_refused_with_the_chmod(
    tmp_path: Path, mode: int
) -> None:
    path = _secret(tmp_path, mode)
    with pytest.raises(ConfigError) as err:
        read_secret(path, "test key", missing_fix=FIX)
    text = str(err.value)
    assert f"mode {mode:04o}" in text
    assert f"chmod 600 {path}" in text


def test_a_directory_or_fifo_in_a_secrets_place_is_refused_without_hanging(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret(directory, "test key", missing_fix=FIX)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_secret(fifo, "test key", missing_fix=FIX)


def test_a_secret_larger_than_its_bound_is_refused(tmp_path: Path) -> None:
    path = _secret(tmp_path, data=b"x" * 100)
    with pytest.raises(ConfigError, match="larger than 99 bytes"):
        read_secret(path, "test key", missing_fix=FIX, max_bytes=99)
    assert read_secret(path, "test key", missing_fix=FIX, max_bytes=100) == b"x" * 100


# -- every loader refuses a key others can read ------------------------------------------------
def _chmod_644(path: Path) -> Path:
    os.chmod(path, 0o644)
    return path


def _psk_store(pki: PkiLayout) -> object:
    _chmod_644(pki.psk_store_key)
    return PskStore.load(pki.psk_store, pki.psk_store_key)


def _channel(pki: PkiLayout) -> object:
    return load_identity(_chmod_644(pki.channel_key("gateway")), "gateway")


def _device_psk(pki: PkiLayout) -> object:
    _chmod_644(pki.device_psk("pm-0001"))
    return load_bundle(pki, "pm-0001")


def _ca_key(pki: PkiLayout) -> object:
    _chmod_644(pki.ca_key)
    return enroll_device(pki.root, "pm-0100")


def _tls_key(pki: PkiLayout) -> object:
    _chmod_644(pki.gateway_key)
    return client_context(pki.ca_cert, pki.gateway_cert, pki.gateway_key)


LOADERS: dict[str, tuple[Callable[[PkiLayout], object], Callable[[PkiLayout], Path]]] = {
    "PSK store key": (_psk_store, lambda pki: pki.psk_store_key),
    "channel private key": (_channel, lambda pki: pki.channel_key("gateway")),
    "device PSK": (_device_psk, lambda pki: pki.device_psk("pm-0001")),
    "CA private key": (_ca_key, lambda pki: pki.ca_key),
    "TLS private key": (_tls_key, lambda pki: pki.gateway_key),
}


@pytest.mark.parametrize("what", sorted(LOADERS))
def test_every_pki_secret_loader_refuses_a_key_others_can_read(pki: PkiLayout, what: str) -> None:
    load, path = LOADERS[what]
    with pytest.raises(ConfigError) as err:
        load(pki)
    assert f"chmod 600 {path(pki)}" in str(err.value)


def test_hospital_keyring_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring.create(path)
    _chmod_644(path)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        Keyring.load(path)


def test_gateway_spool_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "spool.key"
    write_secret(key, os.urandom(32))
    _chmod_644(key)
    with pytest.raises(ConfigError, match=f"chmod 600 {key}"):
        Spool(tmp_path / "spool.db", key, max_readings=10)
