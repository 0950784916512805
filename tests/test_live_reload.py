"""Live reloads on the one file watcher (pacegate.filewatch): the hospital's keyring and the
gateway's PSK store follow their files; what is refused stays refused."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from console.workdir import WorkLayout, gateway_config_text
from gateway.config import load_gateway_config
from gateway.pipeline import Accepted
from gateway.service import Gateway
from hospital.keyring import Keyring
from pacegate.errors import ConfigError
from pacegate.identity import telemetry_topic
from pacegate.layout import PkiLayout
from pacegate.reading import Reading
from pacegate.sealed import new_epoch, seal_reading
from tests.support import free_port


def test_a_key_added_by_another_process_is_picked_up_once(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring.create(path)
    running = Keyring.load(path)
    admin = Keyring.load(path)
    version = admin.add_key()
    admin.save()  # an atomic replace, as 'pacegate hospital rotate-key' does
    assert running.refresh()
    assert running.current_version == version
    assert not running.refresh()
    assert not admin.refresh()  # its own save is not a change


def test_a_changed_integrity_key_is_refused_at_every_refresh_until_restored(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keyring.json"
    Keyring.create(path)
    running = Keyring.load(path)
    original = path.read_bytes()
    data = json.loads(original)
    data["mac_keys"][0]["key"] = base64.b64encode(os.urandom(32)).decode()
    path.write_text(json.dumps(data))
    for _ in range(3):  # not once and then silently ignored
        with pytest.raises(ConfigError, match="mac_keys"):
            running.refresh()
    path.write_bytes(original)
    assert running.refresh()
    assert not running.refresh()


def test_a_deleted_psk_store_keeps_the_held_keys_and_is_reported_once(
    pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway is built but not run: its reload and decision seams, called directly."""
    text = gateway_config_text(
        WorkLayout(tmp_path),
        mqtt_host="127.0.0.1",
        mqtt_port=free_port(),
        hospital_host="127.0.0.1",
        hospital_port=free_port(),
        metrics_port=0,
    )
    (tmp_path / "gateway.yaml").write_text(text)
    pki = PkiLayout(pki_dir)
    psk = pki.device_psk("pm-0001").read_bytes()
    reading = Reading(age=64, heart_rate_bpm=72, sensor_id=7, timestamp=datetime.now(UTC))
    epoch = new_epoch()
    store = pki.psk_store.read_bytes()
    gw = Gateway(load_gateway_config(tmp_path / "gateway.yaml"), use_channel=False)
    try:
        pki.psk_store.unlink()
        assert [gw.refresh_keys() for _ in range(5)] == [False] * 5
        missing = [r for r in caplog.records if "is missing" in r.getMessage()]
        assert len(missing) == 1
        assert str(pki.psk_store) in missing[0].getMessage()
        assert gw.metrics.value("pacegate_gateway_psk_store_reloads_total", result="refused") == 1
        sealed = seal_reading(psk, "pm-0001", 1, reading, epoch=epoch)
        assert isinstance(gw.decide(telemetry_topic("pm-0001"), sealed), Accepted)
        pki.psk_store.write_bytes(store)  # put back: one change, reloaded once
        assert gw.refresh_keys()
        assert not gw.refresh_keys()
        assert gw.metrics.value("pacegate_gateway_psk_store_reloads_total", result="applied") == 1
    finally:
        gw.spool.close()
        gw.replay.close()
