"""``broker.yaml``: the embedded broker's one configuration schema.

Example (every key; relative paths resolve against the file's directory)::

    listener:
      host: 127.0.0.1          # MQTT over TLS only: there is no plaintext listener
      port: 8883
    tls:
      ca: certs/ca.crt         # client certificates must chain to this CA
      cert: certs/broker.crt
      key: certs/broker.key
      crl: certs/crl.pem       # watched: a revocation applies within crl_reload_interval
      crl_reload_interval: 1.0
    limits:
      max_connections: 10000   # refused beyond this (a security event), never queued
      max_payload: 4096        # bytes of PUBLISH payload; larger closes the connection
      handshake_timeout: 10.0  # seconds for the TLS handshake
      connect_timeout: 10.0    # seconds from handshake to CONNECT
    acl:
      gateway_identity: gateway   # the only identity allowed to subscribe to pacemakers/#
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pacegate.configfile import ConfigSection, load_config
from pacegate.layout import PkiLayout
from pacegate.ports import DEFAULT_HOST, DEFAULT_MQTTS_PORT

# A sealed reading is ~100 bytes; 4 KiB leaves room for growth and bounds memory per
# message (2,000 devices x a few messages in flight).
DEFAULT_MAX_PAYLOAD = 4096
DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CRL_RELOAD_INTERVAL = 1.0


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    crl: Path


@dataclass(frozen=True)
class BrokerConfig:
    path: Path
    host: str
    port: int
    tls: TlsFiles
    crl_reload_interval: float
    max_connections: int
    max_payload: int
    handshake_timeout: float
    connect_timeout: float
    gateway_identity: str


def load_broker_config(path: str | Path) -> BrokerConfig:
    """Parse and check ``broker.yaml``; every error names the file, line, key and fix."""
    top = load_config(path)
    top.check_keys({"listener", "tls", "limits", "acl"})
    listener = top.section("listener", required=True)
    listener.check_keys({"host", "port"})
    tls = top.section("tls", required=True)
    tls.check_keys({"ca", "cert", "key", "crl", "crl_reload_interval"})
    limits = top.section("limits")
    limits.check_keys({"max_connections", "max_payload", "handshake_timeout", "connect_timeout"})
    acl = top.section("acl")
    acl.check_keys({"gateway_identity"})

    files = TlsFiles(
        ca=_tls_file(tls, "ca"),
        cert=_tls_file(tls, "cert"),
        key=_tls_file(tls, "key"),
        crl=_tls_file(tls, "crl"),
    )
    host = listener.get("host", str, DEFAULT_HOST)
    if not host:
        raise listener.error("host", "must not be empty", fix="use 127.0.0.1 or an interface IP")
    return BrokerConfig(
        path=top.path,
        host=host,
        port=listener.get_int("port", DEFAULT_MQTTS_PORT, lo=0, hi=65535),
        tls=files,
        crl_reload_interval=tls.get_float(
            "crl_reload_interval", DEFAULT_CRL_RELOAD_INTERVAL, lo=0.1, hi=3600.0
        ),
        max_connections=limits.get_int(
            "max_connections", DEFAULT_MAX_CONNECTIONS, lo=1, hi=1_000_000
        ),
        max_payload=limits.get_int("max_payload", DEFAULT_MAX_PAYLOAD, lo=16, hi=268_435_455),
        handshake_timeout=limits.get_float(
            "handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT, lo=0.1, hi=600.0
        ),
        connect_timeout=limits.get_float(
            "connect_timeout", DEFAULT_CONNECT_TIMEOUT, lo=0.1, hi=600.0
        ),
        gateway_identity=acl.get("gateway_identity", str, "gateway"),
    )


def _tls_file(section: ConfigSection, key: str) -> Path:
    return section.get_path(key, required=True, must_exist=True)


EXAMPLE_FILE_NAME = "broker.yaml"  # at the repository root, for a PKI in certs/
_WRITTEN_INTRO = """\
# pacegate embedded broker (amqtt). MQTT over TLS only; client certificates required.
# Relative paths resolve against this file's directory. Docs: docs/pki-and-broker.md"""
_EXAMPLE_INTRO = """\
# pacegate embedded broker (amqtt): `pacegate broker -c broker.yaml`.
# MQTT over TLS only, client certificates required (there is no plaintext listener).
# Relative paths resolve against this file's directory: create the PKI with
#   pacegate pki init --dir certs && pacegate pki enroll pm-0001 --dir certs
# Docs: docs/pki-and-broker.md"""


def render_default_config(
    pki_dir: Path, *, host: str, port: int, config_dir: Path, intro: str = _WRITTEN_INTRO
) -> str:
    """The default ``broker.yaml`` for a PKI directory, paths relative to ``config_dir``.

    The one broker template: the committed example (:func:`render_example_config`) is this
    with the repository's ``certs/``."""
    pki = PkiLayout(Path(pki_dir))

    def rel(p: Path) -> str:
        return os.path.relpath(p.absolute(), Path(config_dir).absolute())

    return f"""\
{intro}
listener:
  host: {host}
  port: {port}
tls:
  ca: {rel(pki.ca_cert)}
  cert: {rel(pki.broker_cert)}
  key: {rel(pki.broker_key)}
  crl: {rel(pki.crl):<22} # watched: a revocation applies within crl_reload_interval s
  crl_reload_interval: {DEFAULT_CRL_RELOAD_INTERVAL}
limits:
  max_connections: {DEFAULT_MAX_CONNECTIONS:<10} # refused (not queued) beyond this
  max_payload: {DEFAULT_MAX_PAYLOAD:<14} # bytes; a sealed reading is ~100
  handshake_timeout: {DEFAULT_HANDSHAKE_TIMEOUT:<8} # seconds for the TLS handshake
  connect_timeout: {DEFAULT_CONNECT_TIMEOUT:<10} # seconds from handshake to MQTT CONNECT
acl:
  gateway_identity: gateway   # the only identity that may subscribe to pacemakers/#
"""


def render_example_config() -> str:
    """The committed ``broker.yaml``: the default template for a PKI in ``certs/`` beside it."""
    return render_default_config(
        Path("certs"),
        host=DEFAULT_HOST,
        port=DEFAULT_MQTTS_PORT,
        config_dir=Path("."),
        intro=_EXAMPLE_INTRO,
    )
