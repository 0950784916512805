"""broker.yaml: the schema, its error messages, and the shipped files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import (
    EXAMPLE_FILE_NAME,
    load_broker_config,
    render_default_config,
    render_example_config,
)
from pacegate.errors import ConfigError
from pacegate.layout import PkiLayout

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, pki: PkiLayout, **replace: str) -> Path:
    text = render_default_config(pki.root, host="127.0.0.1", port=18883, config_dir=tmp_path)
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "broker.yaml"
    path.write_text(text)
    return path


def test_default_config_loads_with_paths_relative_to_its_file(
    pki: PkiLayout, tmp_path: Path
) -> None:
    cfg = load_broker_config(_write(tmp_path, pki))
    assert cfg.tls.crl.resolve() == pki.crl.resolve()
    assert "pki/" in (tmp_path / "broker.yaml").read_text()  # relative, not absolute
    assert cfg.port == 18883
    assert cfg.max_payload == 4096


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("max_payload: 4096", "max_payload: lots", "limits.max_payload"),
        ("max_connections: 10000", "max_connections: 0", "limits.max_connections"),
        ("port: 18883", "port: 70000", "listener.port"),
        (
            "gateway_identity: gateway",
            "gateway_identity: gateway\n  gateway_idnetity: x",
            "acl.gateway_idnetity",
        ),
        ("crl: ", "crl: missing/", "tls.crl"),
    ],
)
def test_malformed_broker_yaml_names_the_file_line_and_key(
    pki: PkiLayout, tmp_path: Path, old: str, new: str, key: str
) -> None:
    path = _write(tmp_path, pki, **{old: new})
    with pytest.raises(ConfigError) as err:
        load_broker_config(path)
    assert err.value.key == key
    assert str(err.value).startswith(f"{path}:")
    assert err.value.line is not None


@pytest.mark.integration
def test_broker_command_reports_a_malformed_config_and_exits_2(
    pki: PkiLayout, tmp_path: Path
) -> None:
    path = _write(tmp_path, pki, **{"handshake_timeout: 10.0": "handshake_timeout: [1]"})
    proc = subprocess.run(
        [sys.executable, "-m", "console", "broker", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert f"{path}:" in proc.stderr
    assert "limits.handshake_timeout" in proc.stderr


def test_shipped_broker_yaml_is_the_rendered_template() -> None:
    # One template writes both the shipped file and a work directory's broker.yaml.
    assert (REPO / EXAMPLE_FILE_NAME).read_text() == render_example_config(), (
        f"{EXAMPLE_FILE_NAME} is stale: write broker.config.render_example_config() into it"
    )


def test_shipped_broker_yaml_points_at_certs_and_has_no_plaintext_listener() -> None:
    text = (REPO / "broker.yaml").read_text()
    assert "ca: certs/ca.crt" in text
    assert "crl: certs/crl.pem" in text
    assert "1883" not in text


def test_shipped_mosquitto_conf_requires_certificates() -> None:
    text = (REPO / "mosquitto" / "pacegate.conf").read_text()
    for line in (
        "require_certificate true",
        "plugin mosquitto/plugin/build/pacegate_cert_identity.so",
        "crlfile certs/crl.pem",
        "allow_anonymous false",
    ):
        assert line in text


def test_shipped_mosquitto_conf_has_the_generated_security_settings(tmp_path: Path) -> None:
    """The repository's mosquitto/pacegate.conf limits TLS 1.2 to the embedded broker's
    suites and leaves the certificate identity to pacegate's plugin, exactly as the
    generated one does."""
    from pacegate.pki.mosquitto import mosquitto_conf
    from pacegate.tlsconf import TLS12_CIPHERS

    shipped = set((REPO / "mosquitto" / "pacegate.conf").read_text().splitlines())
    generated = set(mosquitto_conf(PkiLayout(tmp_path)).splitlines())
    for line in (
        "tls_version tlsv1.2",
        f"ciphers {TLS12_CIPHERS}",
        "allow_anonymous false",
        "require_certificate true",
        "retain_available false",
    ):
        assert line in shipped, line
        assert line in generated, line
    # either would make mosquitto skip every authentication plugin for certificate clients
    for setting in ("use_identity_as_username", "use_username_as_clientid"):
        assert not any(line.startswith(setting) for line in shipped | generated), setting


def _plugin_lines(conf: str) -> list[str]:
    return [line.split(None, 1)[1] for line in conf.splitlines() if line.startswith("plugin ")]


def test_generated_mosquitto_conf_loads_the_identity_plugin_before_dynamic_security(
    tmp_path: Path,
) -> None:
    """Mosquitto asks the basic-auth plugins in configuration order and the first answer
    that is not "defer" decides: the identity plugin must come first, in both files."""
    from pacegate.pki.mosquitto import IDENTITY_PLUGIN, mosquitto_conf

    generated = _plugin_lines(mosquitto_conf(PkiLayout(tmp_path)))
    assert generated[0] == str(IDENTITY_PLUGIN)
    assert all("dynamic_security" in p for p in generated[1:])
    shipped = _plugin_lines((REPO / "mosquitto" / "pacegate.conf").read_text())
    assert shipped[0] == "mosquitto/plugin/build/pacegate_cert_identity.so"
    assert (REPO / shipped[0]).resolve() == IDENTITY_PLUGIN
