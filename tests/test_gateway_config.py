"""gateway.yaml: a bad hand edit is reported with file, line, key and the fix."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from console.config_admin import cli_check
from console.workdir import WorkLayout, gateway_config_text
from gateway.config import GatewayConfigError, load_gateway_config
from pacegate.topics import topic_filter_problem

REPO = Path(__file__).resolve().parent.parent


def _default(tmp_path: Path) -> str:
    return gateway_config_text(
        WorkLayout(tmp_path),
        mqtt_host="127.0.0.1",
        mqtt_port=18883,
        hospital_host="127.0.0.1",
        hospital_port=18884,
        metrics_port=0,
    )


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.yaml"
    p.write_text(text)
    return p


def _errors(path: Path) -> list[str]:
    with pytest.raises(GatewayConfigError) as err:
        load_gateway_config(path, check_files=False)
    return [str(e) for e in err.value.errors]


def test_default_config_is_valid_and_resolves_paths_against_its_directory(tmp_path: Path) -> None:
    cfg = load_gateway_config(_write(tmp_path, _default(tmp_path)), check_files=False)
    assert cfg.mqtt.port == 18883
    assert cfg.mqtt.client_id == "gateway"
    assert cfg.mqtt.cert == tmp_path / "pki" / "gateway.crt"
    assert cfg.hospital.server_key == tmp_path / "pki" / "channel" / "hospital.mldsa.pub"
    assert cfg.state_dir == tmp_path / "gateway"
    assert cfg.spool.path == tmp_path / "gateway" / "spool.db"
    (route,) = cfg.routes
    assert (route.topic, route.device_id_level, route.version, route.qos) == (
        "pacemakers/+/telemetry",
        1,
        2,
        1,
    )
    assert route.device_id_from("pacemakers/pm-1/telemetry") == "pm-1"
    assert route.device_id_from("pacemakers/pm-1/other") is None


def test_commented_example_in_repository_is_valid() -> None:
    cfg = load_gateway_config(REPO / "gateway.example.yaml", check_files=False)
    assert cfg.routes


def test_plus_inside_a_level_is_reported_with_line_key_and_fix(tmp_path: Path) -> None:
    text = _default(tmp_path).replace("topic: pacemakers/+/telemetry", "topic: pacemakers/pm+/x")
    path = _write(tmp_path, text)
    line = text.splitlines().index("    topic: pacemakers/pm+/x") + 1
    errors = _errors(path)
    assert errors[0].startswith(
        f"{path}:{line}: routes[0].topic: '+' must fill a whole topic level"
    )
    assert "(fix: " in errors[0]


def test_every_error_is_reported_not_only_the_first(tmp_path: Path) -> None:
    text = (
        _default(tmp_path)
        .replace("port: 18883", "port: 99999")
        .replace("format: sealed-reading/v2", "format: sealed-reading/v9")
        .replace("host: 127.0.0.1\n  port: 0", "host: 0.0.0.0\n  port: 0")
    )
    errors = _errors(_write(tmp_path, text))
    keys = [e.split(": ")[1] for e in errors]
    assert keys == ["mqtt.port", "metrics.host", "routes[0].format"]
    assert "sealed-reading/v1" in errors[2]  # the fix names what is supported


def test_device_id_level_must_point_at_a_plus_level(tmp_path: Path) -> None:
    text = _default(tmp_path).replace("device_id_level: 1", "device_id_level: 2")
    (error,) = _errors(_write(tmp_path, text))
    assert "routes[0].device_id_level" in error
    assert "'telemetry'" in error
    assert "set device_id_level to 1" in error


def test_unknown_key_is_refused_rather_than_ignored(tmp_path: Path) -> None:
    text = _default(tmp_path).replace("    qos: 1", "    qos: 1\n    qso: 1")
    (error,) = _errors(_write(tmp_path, text))
    assert "routes[0].qso: unknown key" in error


def test_yaml_syntax_error_carries_the_line(tmp_path: Path) -> None:
    text = _default(tmp_path).replace("  port: 18883", "  port: [18883")
    (error,) = _errors(_write(tmp_path, text))
    assert "gateway.yaml:" in error
    assert "YAML syntax error" in error


def test_missing_certificate_file_is_reported_when_files_are_checked(tmp_path: Path) -> None:
    path = _write(tmp_path, _default(tmp_path))
    with pytest.raises(GatewayConfigError) as err:
        load_gateway_config(path)
    keys = {e.key for e in err.value.errors}
    assert {"mqtt.ca", "mqtt.cert", "mqtt.key", "psk_store.path", "hospital.server_key"} <= keys


def test_config_check_prints_ok_or_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(tmp_path, _default(tmp_path))
    assert cli_check(argparse.Namespace(file=good, schema_only=True)) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(_default(tmp_path).replace("qos: 1", "qos: 2").replace("port: 18884", "port: x"))
    assert cli_check(argparse.Namespace(file=bad, schema_only=True)) == 2
    err = capsys.readouterr().err
    assert "hospital.port" in err
    assert "routes[0].qos" in err
    assert "2 errors" in err


@pytest.mark.parametrize(
    ("topic", "bad"),
    [
        ("pacemakers/+/telemetry", False),
        ("pacemakers/#", False),
        ("#", False),
        ("pacemakers/pm+/telemetry", True),
        ("pacemakers/#/telemetry", True),
        ("pacemakers/x#", True),
        ("", True),
    ],
)
def test_topic_filter_syntax(topic: str, bad: bool) -> None:
    assert (topic_filter_problem(topic) is not None) == bad


def test_spool_smaller_than_one_batch_is_refused(tmp_path: Path) -> None:
    text = _default(tmp_path).replace("max_readings: 1000000", "max_readings: 50")
    (error,) = _errors(_write(tmp_path, text))
    assert "spool.max_readings: 50 is smaller than one batch" in error


@pytest.mark.parametrize("which", ["spool", "replay"])
def test_damaged_state_database_is_a_config_error_naming_the_file_and_the_fix(
    tmp_path: Path, which: str
) -> None:
    from gateway.replay_store import ReplayStore
    from gateway.spool import Spool
    from pacegate.errors import ConfigError

    db = tmp_path / f"{which}.db"
    db.write_bytes(b"this is not an SQLite database, it was overwritten " * 200)

    def open_it() -> None:
        if which == "spool":
            Spool(db, tmp_path / "spool.key", max_readings=1000).close()
        else:
            ReplayStore(db).close()

    with pytest.raises(ConfigError) as err:
        open_it()
    text = str(err.value)
    assert str(db) in text
    assert "unreadable" in text
    assert "fix: restore it from backup" in text
