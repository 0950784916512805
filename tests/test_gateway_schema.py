"""gateway.yaml's JSON Schema (for editors) is generated from gateway/config.py and agrees with
the parser: what the schema refuses, ``pacegate config check`` refuses too, and the other way
round, except for the cross-key rules the schema documents as the parser's alone."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from ruamel.yaml import YAML

from console.workdir import WorkLayout, gateway_config_text
from gateway.config import GatewayConfigError, load_gateway_config
from gateway.config_schema import (
    SCHEMA_FILE_NAME,
    json_schema,
    packaged_schema_path,
    render_json_schema,
)
from gateway.config_template import EXAMPLE_FILE_NAME, render_example_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / EXAMPLE_FILE_NAME
Doc = dict[str, Any]


def example() -> Doc:
    data: Doc = YAML(typ="safe").load(EXAMPLE.read_text())
    return data


def validator() -> Draft7Validator:
    schema = json_schema()
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def parser_accepts(doc: Any, tmp_path: Path) -> bool:
    path = tmp_path / "gateway.yaml"
    with path.open("w") as f:  # YAML, so that .inf and .nan stay numbers
        YAML(typ="safe").dump(doc, f)
    try:
        load_gateway_config(path, check_files=False)
    except GatewayConfigError:
        return False
    return True


def schema_accepts(doc: Any) -> bool:
    return bool(validator().is_valid(doc))


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    """A mutation that sets (or, with ``...``, deletes) a dotted key; ``routes.0`` indexes."""

    def apply(doc: Doc) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if value is ...:
            del node[key]
        else:
            node[key] = value

    return apply


def _minimal(doc: Doc) -> None:
    for key in ("spool", "metrics", "reload"):
        del doc[key]
    for key in ("host", "port", "client_id", "keepalive_s"):
        del doc["mqtt"][key]
    doc["routes"] = [{"topic": "pacemakers/+/telemetry"}]


def _two_routes(doc: Doc) -> None:
    doc["routes"].append({"name": "alarms", "topic": "pacemakers/+/alarm", "qos": 0})


VALID: dict[str, Callable[[Doc], None]] = {
    "the example as shipped": lambda doc: None,
    "only the required keys": _minimal,
    "an empty value means the default": _set("mqtt.port", None),
    "an empty optional section": _set("metrics", None),
    "metrics on IPv6 loopback": _set("metrics.host", "::1"),
    "device id level implied by the one '+'": _set("routes.0.device_id_level", ...),
    "qos 0": _set("routes.0.qos", 0),
    "no spool section": _set("spool", ...),
    "a second route": _two_routes,
    "ephemeral metrics port": _set("metrics.port", 0),
    "rate limit with its own burst": _set("routes.0.limits.burst", 5),
}
INVALID: dict[str, Callable[[Doc], None]] = {
    "unknown top-level key": _set("mqt", {"host": "x"}),
    "unknown key in a section": _set("mqtt.hots", "127.0.0.1"),
    "unknown key in limits": _set("routes.0.limits.max_size", 10),
    "port 0": _set("mqtt.port", 0),
    "port above 65535": _set("mqtt.port", 70000),
    "port as a string": _set("mqtt.port", "8883"),
    "port as a boolean": _set("mqtt.port", True),
    "missing required key": _set("mqtt.ca", ...),
    "required key left empty": _set("mqtt.cert", None),
    "missing required section": _set("hospital", ...),
    "required section left empty": _set("psk_store", None),
    "missing state_dir": _set("state_dir", ...),
    "a section that is a list": _set("metrics", [1, 2]),
    "batch larger than the ingest format allows": _set("hospital.batch_max_readings", 501),
    "ack timeout below the floor": _set("hospital.ack_timeout_s", 0.05),
    "unknown spool policy": _set("spool.when_full", "drop-oldest"),
    "hospital name outside the identity-name rule": _set("hospital.server_name", "hosp.ital"),
    "client id outside the identity-name rule": _set("mqtt.client_id", "Gateway"),
    "metrics on every interface": _set("metrics.host", "0.0.0.0"),
    "metrics on a LAN address": _set("metrics.host", "10.0.0.5"),
    "yes is not a boolean": _set("metrics.enabled", "yes"),
    "negative poll period": _set("reload.poll_s", -1),
    "no route": _set("routes", []),
    "routes not a list": _set("routes", "pacemakers/+/telemetry"),
    "'+' inside a level": _set("routes.0.topic", "pacemakers/pm+/telemetry"),
    "'#' not at the end": _set("routes.0.topic", "pacemakers/#/telemetry"),
    "empty topic": _set("routes.0.topic", ""),
    "route without a topic": _set("routes.0.topic", ...),
    "unknown payload format": _set("routes.0.format", "sealed-reading/v9"),
    "unknown destination": _set("routes.0.destination", "cloud"),
    "qos 2": _set("routes.0.qos", 2),
    "payload limit above the sealed format's": _set("routes.0.limits.max_payload_bytes", 300),
    "zero burst": _set("routes.0.limits.burst", 0),
    "a route that is not a mapping": _set("routes.0", "telemetry"),
    "infinite clock skew": _set("routes.0.limits.max_clock_skew_s", math.inf),
}
# What only the parser can check (the schema's description lists them): valid for the schema,
# refused by `pacegate config check`.
PARSER_ONLY: dict[str, Callable[[Doc], None]] = {
    "device id level not on a '+'": _set("routes.0.device_id_level", 0),
    "reconnect max below min": _set("hospital.reconnect_max_s", 0.1),
    "spool smaller than a batch": _set("spool.max_readings", 10),
    "duplicate route name": lambda doc: doc["routes"].append(
        {"name": "telemetry", "topic": "pacemakers/+/alarm"}
    ),
    "integer written with a decimal point": _set("mqtt.port", 8883.0),
    "NaN rate": _set("routes.0.limits.max_rate_per_device", math.nan),
}


@pytest.mark.integration
def test_shipped_schema_files_are_the_generated_schema() -> None:
    generated = render_json_schema()
    assert (REPO / SCHEMA_FILE_NAME).read_text() == generated, (
        "gateway.schema.json is stale: run `pacegate config schema --out gateway.schema.json` "
        "and copy it to gateway/"
    )
    assert packaged_schema_path().read_text() == generated
    proc = subprocess.run(
        [sys.executable, "-m", "console", "config", "schema"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout == generated


def test_committed_example_is_the_rendered_template() -> None:
    # One template writes both the example and a work directory's gateway.yaml, so the
    # example cannot document a key or default the written file does not have.
    assert EXAMPLE.read_text() == render_example_config(), (
        f"{EXAMPLE_FILE_NAME} is stale: run `pacegate config example --out {EXAMPLE_FILE_NAME}`"
    )


@pytest.mark.integration
def test_config_example_command_writes_the_committed_example(tmp_path: Path) -> None:
    out = tmp_path / EXAMPLE_FILE_NAME
    proc = subprocess.run(
        [sys.executable, "-m", "console", "config", "example", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == EXAMPLE.read_text()


def test_example_names_the_schema_on_its_first_line_for_editors() -> None:
    first = EXAMPLE.read_text().splitlines()[0]
    assert first == f"# yaml-language-server: $schema={SCHEMA_FILE_NAME}"
    assert (EXAMPLE.parent / SCHEMA_FILE_NAME).exists()


def test_written_default_config_is_valid_and_names_the_packaged_schema(tmp_path: Path) -> None:
    work = WorkLayout(tmp_path)
    text = gateway_config_text(
        work,
        mqtt_host="127.0.0.1",
        mqtt_port=8883,
        hospital_host="127.0.0.1",
        hospital_port=8884,
        metrics_port=9108,
    )
    assert text.splitlines()[0] == f"# yaml-language-server: $schema={packaged_schema_path()}"
    doc = YAML(typ="safe").load(text)
    assert list(validator().iter_errors(doc)) == []
    assert parser_accepts(doc, tmp_path)


@pytest.mark.parametrize("case", sorted(VALID))
def test_schema_and_parser_both_accept(case: str, tmp_path: Path) -> None:
    doc = copy.deepcopy(example())
    VALID[case](doc)
    assert [e.message for e in validator().iter_errors(doc)] == []
    assert parser_accepts(doc, tmp_path)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_schema_and_parser_both_refuse(case: str, tmp_path: Path) -> None:
    doc = copy.deepcopy(example())
    INVALID[case](doc)
    assert not schema_accepts(doc)
    assert not parser_accepts(doc, tmp_path)


@pytest.mark.parametrize("case", sorted(PARSER_ONLY))
def test_cross_key_rules_are_the_parsers_and_documented_in_the_schema(
    case: str, tmp_path: Path
) -> None:
    doc = copy.deepcopy(example())
    PARSER_ONLY[case](doc)
    assert schema_accepts(doc)
    assert not parser_accepts(doc, tmp_path)
    note = json_schema()["description"]
    for rule in ("device_id_level", "reconnect_max_s", "spool.max_readings", "unique", "finite"):
        assert rule in note
