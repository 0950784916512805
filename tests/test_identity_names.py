"""One identity-name rule (pacegate/identity.py) for devices, services and channel peers, and
every place that takes a name refuses one outside it, with the rule in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.config import load_cloud_config
from console.workdir import WorkLayout, cloud_config_text, gateway_config_text, hospital_config_text
from gateway.config import GatewayConfigError, load_gateway_config
from hospital.config import load_hospital_config
from pacegate.channel.identity import ChannelIdentity, validate_peer_name
from pacegate.errors import ConfigError, LocalProtocolError
from pacegate.identity import (
    IDENTITY_NAME_RULE,
    RESERVED_IDS,
    is_identity_name,
    validate_device_id,
    validate_identity_name,
)
from pacegate.layout import PkiLayout
from pacegate.pki import PkiError, add_channel_identity, enroll_device

GOOD = ["gateway", "hospital", "pm-0001", "ward_3", "0", "a" * 64, "gw-2"]
BAD = [
    "",
    "gate.way",  # a dot: <name>.mldsa.key would not split back into one name
    "..",
    "Gateway",
    "a b",
    "a" * 65,
    "-lead",
    "_lead",
    "pm+1",
    "pm#",
    "pacemakers/x",
    "é",
    "pm\x00",
]


@pytest.mark.parametrize("name", GOOD)
def test_identity_name_rule_accepts(name: str) -> None:
    assert is_identity_name(name)
    assert validate_identity_name(name) == name


@pytest.mark.parametrize("name", [*BAD, None, 7])
def test_identity_name_rule_refuses_with_the_rule_in_the_message(name: object) -> None:
    assert not is_identity_name(name)
    with pytest.raises(ValueError, match="is not allowed") as err:
        validate_identity_name(name, "peer")
    assert IDENTITY_NAME_RULE in str(err.value)


@pytest.mark.parametrize("name", sorted(RESERVED_IDS))
def test_a_device_cannot_take_a_service_name(name: str) -> None:
    assert is_identity_name(name)
    with pytest.raises(ValueError, match="reserved"):
        validate_device_id(name)


@pytest.mark.parametrize("name", ["gate.way", "Gateway", "é"])
def test_channel_peer_name_outside_the_rule_is_refused(name: str) -> None:
    with pytest.raises(LocalProtocolError, match="is not allowed"):
        validate_peer_name(name)
    with pytest.raises(LocalProtocolError):
        ChannelIdentity.generate(name)


@pytest.mark.parametrize("name", ["gate.way", "é", "Gw"])
def test_pki_refuses_a_channel_identity_outside_the_rule_and_writes_nothing(
    name: str, tmp_path: Path
) -> None:
    layout = PkiLayout(tmp_path)
    with pytest.raises(PkiError, match="is not allowed"):
        add_channel_identity(tmp_path, name)
    assert not layout.channel_key(name).exists()


def test_pki_refuses_a_device_id_outside_the_rule(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="is not allowed"):
        enroll_device(tmp_path, "pm.0001")


def test_hospital_config_refuses_a_gateway_name_with_a_dot(tmp_path: Path) -> None:
    work = WorkLayout(tmp_path)
    text = hospital_config_text(work).replace("  gateway: pki", "  gate.way: pki")
    assert "gate.way" in text
    work.hospital_config.write_text(text)
    with pytest.raises(ConfigError, match="not a valid identity name") as err:
        load_hospital_config(work.hospital_config)
    assert IDENTITY_NAME_RULE in str(err.value)


def _cloud(tmp_path: Path, old: str, new: str) -> Path:
    work = WorkLayout(tmp_path)
    pki = work.pki
    pki.channel_dir.mkdir(parents=True)
    for path in (pki.channel_key("cloud"), pki.channel_pub("hospital")):
        path.write_text("placeholder: the name is checked first\n")
    text = cloud_config_text(work)
    assert old in text
    work.cloud_config.write_text(text.replace(old, new))
    return work.cloud_config


def test_cloud_config_refuses_a_client_name_with_a_dot(tmp_path: Path) -> None:
    path = _cloud(tmp_path, "  hospital: ", "  hospital.ward3: ")
    with pytest.raises(ConfigError, match="not a valid identity name") as err:
        load_cloud_config(path)
    assert IDENTITY_NAME_RULE in str(err.value)


def test_cloud_config_refuses_its_own_name_outside_the_rule(tmp_path: Path) -> None:
    path = _cloud(tmp_path, "  name: cloud", "  name: Cloud.1")
    with pytest.raises(ConfigError, match=r"identity\.name: 'Cloud\.1' is not a valid identity"):
        load_cloud_config(path)


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("client_id: gateway", "client_id: gate.way", "mqtt.client_id"),
        ("server_name: hospital", "server_name: Hospital", "hospital.server_name"),
    ],
)
def test_gateway_config_refuses_identity_names_outside_the_rule(
    tmp_path: Path, old: str, new: str, key: str
) -> None:
    text = gateway_config_text(
        WorkLayout(tmp_path),
        mqtt_host="127.0.0.1",
        mqtt_port=8883,
        hospital_host="127.0.0.1",
        hospital_port=8884,
        metrics_port=0,
    )
    assert old in text
    path = tmp_path / "gateway.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(GatewayConfigError) as err:
        load_gateway_config(path, check_files=False)
    (error,) = err.value.errors
    assert error.key == key
    assert "not a valid identity name" in str(error)
