"""A running hospital's keyring follows its file (hospital.keyring on pacegate.filewatch)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from hospital.keyring import Keyring
from pacegate.errors import ConfigError


def test_a_key_added_by_another_process_is_picked_up_once(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring.create(path)
    running = Keyring.load(path)
    admin = Keyring.load(path)
    version = admin.add_key()
    admin.save()  # an atomic replace, as 'pacegate hospital rotate-key' does
    assert running.refresh() and running.current_version == version
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
