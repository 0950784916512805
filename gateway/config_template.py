"""The one gateway.yaml template: the committed ``gateway.example.yaml`` and the file that
``pacegate up``/``demo`` write into a work directory are both rendered here.

Every value the template writes that is not a path, host or port is the schema's own default
(``gateway.config``), so a changed default changes both files. ``tests/test_gateway_schema.py``
fails when the committed example differs from :func:`render_example_config`; regenerate it with
``pacegate config example --out gateway.example.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config import (
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_SPOOL_READINGS,
    GATEWAY_SCHEMA,
    HOSPITAL_SECTION,
    MQTT_SECTION,
    RELOAD_SECTION,
)
from gateway.config_schema import SCHEMA_FILE_NAME, packaged_schema_path
from pacegate.identity import TELEMETRY_FILTER
from pacegate.layout import (
    DEFAULT_GATEWAY_METRICS_PORT,
    DEFAULT_HOSPITAL_PORT,
    DEFAULT_MQTTS_PORT,
    PkiLayout,
)

EXAMPLE_FILE_NAME = "gateway.example.yaml"  # at the repository root
COMMENT_COLUMN = 32  # where trailing comments start, wide enough for the longest key


@dataclass(frozen=True)
class GatewayTemplate:
    """What differs between one written gateway.yaml and another: where things are."""

    schema_ref: str  # the yaml-language-server schema the first line names
    intro: str  # comment lines after the first, each starting with '#'
    mqtt_host: str
    mqtt_port: int
    ca: str
    cert: str
    key: str
    psk_store: str
    psk_store_key: str
    state_dir: str
    hospital_host: str
    hospital_port: int
    server_key: str
    identity: str
    metrics_port: int


def _align(text: str) -> str:
    """Pad each tab-separated trailing comment to one column, as a hand-written file is."""
    lines = []
    for line in text.splitlines(keepends=True):
        content, tab, comment = line.partition("\t")
        lines.append(f"{content:<{COMMENT_COLUMN - 2}}  {comment}" if tab else line)
    return "".join(lines)


def render(t: GatewayTemplate) -> str:
    """The commented gateway.yaml for ``t``."""
    mqtt = {name: k.default for name, k in MQTT_SECTION.keys.items()}
    h = {name: k.default for name, k in HOSPITAL_SECTION.keys.items()}
    batch_hi = HOSPITAL_SECTION.keys["batch_max_readings"].hi
    reload_s = RELOAD_SECTION.keys["poll_s"].default
    state_doc = GATEWAY_SCHEMA.keys["state_dir"].doc
    return _align(
        f"""\
# yaml-language-server: $schema={t.schema_ref}
{t.intro}
# Relative paths resolve against the directory of this file. Unknown keys are errors (a typo
# must not silently fall back to a default). The running gateway reloads `routes` on SIGHUP
# or when this file changes; an invalid edit is refused, the reason is logged, and the
# previous configuration stays in force. Changes outside `routes` take effect at restart.

mqtt:\t# the broker, over TLS with the gateway's own certificate
  host: {t.mqtt_host}
  port: {t.mqtt_port}\t# MQTT over TLS (IANA secure-mqtt)
  client_id: {mqtt["client_id"]}\t# must equal the certificate CN; the session is persistent,
\t# so the broker keeps QoS 1 messages while we are away
  ca: {t.ca}\t# verifies the broker
  cert: {t.cert}\t# the `gateway` identity made by `pacegate pki init`
  key: {t.key}\t# mode 0600
  keepalive_s: {mqtt["keepalive_s"]}
  # server_name: broker.ward3\t# TLS name to verify; default: host

psk_store:\t# every device's 32-byte PSK, AES-256-GCM at rest
  path: {t.psk_store}\t# reloaded when it changes (enrolments, revocations)
  key: {t.psk_store_key}

state_dir: {t.state_dir}\t# {state_doc}

hospital:\t# the post-quantum channel (ML-KEM-768 + X25519, AES-256-GCM)
  host: {t.hospital_host}
  port: {t.hospital_port}
  server_name: {h["server_name"]}\t# the identity we expect to find at the other end
  server_key: {t.server_key}\t# pinned ML-DSA-65 key: anyone else is refused
  identity: {t.identity}\t# our ML-DSA-65 identity
  batch_max_readings: {h["batch_max_readings"]}\t# a BATCH holds at most this many (<= {batch_hi})
  batch_max_delay_ms: {h["batch_max_delay_ms"]:g}\t# ... and waits at most this long to fill up
  ack_timeout_s: {h["ack_timeout_s"]:g}\t# no ACK within this: the hospital is treated as down
  reconnect_min_s: {h["reconnect_min_s"]:g}\t# backoff: doubles from min to max, with jitter
  reconnect_max_s: {h["reconnect_max_s"]:g}
  # failover:	# further ingest nodes (same identity), tried in order when this one is down
  #   - host: 127.0.0.1
  #     port: 8894

spool:\t# while the hospital is unreachable
  max_readings: {DEFAULT_SPOOL_READINGS}\t# bound (~100 bytes each on disk, Fernet-encrypted)
  when_full: pause-mqtt\t# the only policy, because it loses nothing: stop acking and
\t# leave the broker, which keeps the messages for us
  # path: {t.state_dir}/spool.db    default: <state_dir>/spool.db
  # key: {t.state_dir}/spool.key    default: <state_dir>/spool.key (created 0600)

metrics:\t# Prometheus text format at http://host:port/metrics
  enabled: true
  # loopback only: the endpoint has no authentication
  host: 127.0.0.1
  port: {t.metrics_port}

reload:
  poll_s: {reload_s}\t# check this file's mtime this often (0: SIGHUP only)

routes:\t# tried in order; the first filter that matches wins
  - name: telemetry
    # MQTT filter: '+' one whole level, '#' the rest
    topic: {TELEMETRY_FILTER}
    device_id_level: 1\t# which level holds the device id (from 0); must be a '+'
    format: sealed-reading/v2\t# payload format and version (docs/wire-formats.md)
    destination: hospital
    qos: 1\t# 1: acknowledged only once the reading is durably stored
    limits:
      max_payload_bytes: {DEFAULT_MAX_PAYLOAD}\t# larger payloads are refused before any parsing
      max_rate_per_device: 0\t# messages/s per device (token bucket); 0 = no limit.
\t# Readings over it are refused (and acknowledged), even
\t# a legitimate backlog after an outage: if you set one,
\t# set it far above the devices' own rate.
      # burst: 100\t# token bucket size; default: twice the rate, at least 1
      max_clock_skew_s: {DEFAULT_CLOCK_SKEW_S:g}\t# readings stamped further ahead are refused
"""
    )


def render_example_config() -> str:
    """The committed ``gateway.example.yaml``: the layout of ``pacegate pki init`` beside it."""
    pki = PkiLayout(Path("pki"))
    return render(
        GatewayTemplate(
            schema_ref=SCHEMA_FILE_NAME,
            intro=(
                f"# {EXAMPLE_FILE_NAME}: every key of the pacegate gateway's configuration, "
                "commented.\n# Reference: docs/gateway.md.  Check a file:   "
                "pacegate config check gateway.yaml\n# Run:                      "
                "                   pacegate gateway -c gateway.yaml\n#"
            ),
            mqtt_host="127.0.0.1",
            mqtt_port=DEFAULT_MQTTS_PORT,
            ca=str(pki.ca_cert),
            cert=str(pki.gateway_cert),
            key=str(pki.gateway_key),
            psk_store=str(pki.psk_store),
            psk_store_key=str(pki.psk_store_key),
            state_dir="state/gateway",
            hospital_host="127.0.0.1",
            hospital_port=DEFAULT_HOSPITAL_PORT,
            server_key=str(pki.channel_pub("hospital")),
            identity=str(pki.channel_key("gateway")),
            metrics_port=DEFAULT_GATEWAY_METRICS_PORT,
        )
    )


def render_default_config(
    path: Path,
    *,
    pki: PkiLayout,
    state_dir: Path,
    mqtt_host: str,
    mqtt_port: int,
    hospital_host: str,
    hospital_port: int,
    metrics_port: int,
) -> str:
    """The gateway.yaml to write at ``path``, as ``pacegate up``/``demo`` write it into a
    work directory: file paths relative to ``path``'s directory when under it."""

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(path.parent))
        except ValueError:
            return str(p)

    return render(
        GatewayTemplate(
            schema_ref=str(packaged_schema_path()),
            intro=(
                f"# gateway.yaml written by pacegate for {path.parent.name}/ "
                "(reference: docs/gateway.md).\n"
                f"# Check an edit with   pacegate config check {path.name}\n"
                "#"
            ),
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
            ca=rel(pki.ca_cert),
            cert=rel(pki.gateway_cert),
            key=rel(pki.gateway_key),
            psk_store=rel(pki.psk_store),
            psk_store_key=rel(pki.psk_store_key),
            state_dir=rel(state_dir),
            hospital_host=hospital_host,
            hospital_port=hospital_port,
            server_key=rel(pki.channel_pub("hospital")),
            identity=rel(pki.channel_key("gateway")),
            metrics_port=metrics_port,
        )
    )
