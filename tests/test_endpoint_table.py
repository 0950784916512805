"""One endpoint table (pacegate.ports): every default host and port in the configs, the
endpoints file, capture, the Wireshark dissector and the docs is the table's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from broker.config import load_broker_config
from broker.config import render_default_config as render_broker_config
from cloud.config import load_cloud_config
from console.capture import Ports
from console.endpoints import Endpoints
from console.workdir import WorkLayout, cloud_config_text, hospital_config_text
from gateway.config import HOSPITAL_SECTION, METRICS_SECTION, MQTT_SECTION
from hospital.config import load_hospital_config
from pacegate.ports import (
    CLOUD,
    DEFAULT_ENDPOINTS,
    GATEWAY_METRICS,
    HOSPITAL,
    HOSPITAL_METRICS,
    MQTT,
)

ROOT = Path(__file__).resolve().parent.parent


def test_every_listener_has_one_name_one_port_and_a_reason() -> None:
    names = [e.name for e in DEFAULT_ENDPOINTS]
    ports = [e.port for e in DEFAULT_ENDPOINTS]
    assert len(set(names)) == len(names)
    assert len(set(ports)) == len(ports)
    assert all(e.why and e.clients and e.host == "127.0.0.1" for e in DEFAULT_ENDPOINTS)


def test_the_endpoints_file_names_every_listener_with_the_tables_default() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(Endpoints)}
    assert fields == {e.name: e.address for e in DEFAULT_ENDPOINTS}
    assert Endpoints().to_json()["hospital_metrics"] == {"host": "127.0.0.1", "port": 9109}


def _without_ports(text: str) -> str:
    """A config text with every ``port:`` line removed, so its loader's defaults apply."""
    text = re.sub(r"^\s*port: \d+\s*(#.*)?$\n", "", text, flags=re.MULTILINE)
    return re.sub(r",? port: \d+", "", text)


def test_the_service_configs_default_to_the_table(pki_dir: Path, tmp_path: Path) -> None:
    work = WorkLayout(tmp_path)
    broker_yaml = tmp_path / "broker.yaml"
    broker_yaml.write_text(
        _without_ports(render_broker_config(pki_dir, host="::1", port=1, config_dir=tmp_path))
    )
    assert load_broker_config(broker_yaml).port == MQTT.port
    hospital_yaml = tmp_path / "hospital.yaml"
    hospital_yaml.write_text(
        _without_ports(hospital_config_text(work, port=1, metrics_port=2, cloud_port=3))
    )
    hospital = load_hospital_config(hospital_yaml)
    assert hospital.listen_port == HOSPITAL.port
    assert hospital.metrics_port == HOSPITAL_METRICS.port
    assert hospital.cloud.port == CLOUD.port
    cloud_yaml = tmp_path / "cloud.yaml"
    cloud_yaml.write_text(_without_ports(cloud_config_text(work, port=4)))
    assert load_cloud_config(cloud_yaml).port == CLOUD.port
    # gateway.yaml's defaults are its schema's
    assert MQTT_SECTION.keys["port"].default == MQTT.port
    assert HOSPITAL_SECTION.keys["port"].default == HOSPITAL.port
    assert METRICS_SECTION.keys["port"].default == GATEWAY_METRICS.port
    assert (Ports().mqtt, Ports().hospital, Ports().cloud) == (MQTT.port, HOSPITAL.port, CLOUD.port)


def test_the_channel_dissector_defaults_to_the_channel_ports() -> None:
    lua = (ROOT / "console" / "wireshark" / "pacegate_channel.lua").read_text()
    found = re.search(r'^local DEFAULT_PORTS = "(\d+)-(\d+)"$', lua, re.MULTILINE)
    assert found is not None
    assert (int(found[1]), int(found[2])) == (HOSPITAL.port, CLOUD.port)


def test_the_docs_table_of_default_endpoints_is_the_table() -> None:
    doc = (ROOT / "docs" / "operating.md").read_text()
    section = doc.split("## Default endpoints", 1)[1].split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `")
    ]
    assert rows == [
        [f"`{e.name}`", e.service, f"{e.host}:{e.port}", e.clients, e.why]
        for e in DEFAULT_ENDPOINTS
    ]


def test_the_shipped_example_configs_listen_on_the_tables_ports() -> None:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe")
    broker = yaml.load((ROOT / "broker.yaml").read_text())
    assert (broker["listener"]["host"], broker["listener"]["port"]) == MQTT.address
    gateway = yaml.load((ROOT / "gateway.example.yaml").read_text())
    assert (gateway["mqtt"]["host"], gateway["mqtt"]["port"]) == MQTT.address
    assert (gateway["hospital"]["host"], gateway["hospital"]["port"]) == HOSPITAL.address
    assert (gateway["metrics"]["host"], gateway["metrics"]["port"]) == GATEWAY_METRICS.address
    mosquitto = (ROOT / "mosquitto" / "pacegate.conf").read_text()
    assert re.findall(r"^listener (\d+) (\S+)$", mosquitto, re.MULTILINE) == [
        (str(MQTT.port), MQTT.host)
    ]
