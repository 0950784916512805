"""The gateway.yaml schema: one module reads it, every error names file, line, key and fix.

The reference (every key, its default and why) is ``docs/gateway.md``; the commented example
is ``gateway.example.yaml`` at the top of the repository. Relative paths resolve against the
directory of the file (ARCHITECTURE.md).

:func:`load_gateway_config` raises :class:`GatewayConfigError` (a
:class:`~pacegate.errors.ConfigError`) that carries *every* error found, not only the first,
so that ``pacegate config check`` can list them all in one run.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from gateway.topics import device_id_in
from pacegate.configfile import ConfigSection, load_config
from pacegate.errors import ConfigError, InvariantError
from pacegate.identity import IDENTITY_NAME_PATTERN, IDENTITY_NAME_RULE, is_identity_name
from pacegate.ingest import MAX_BATCH_ITEMS
from pacegate.ports import GATEWAY_METRICS, HOSPITAL, MQTT
from pacegate.sealed import MAX_SEALED_SIZE, SEALED_SIZE_V2
from pacegate.topics import TOPIC_FILTER_PATTERN, topic_filter_problem

T = TypeVar("T")

# payload format name -> versions this gateway opens. A v2 is added here and in pacegate.sealed.
# v2 (per-boot epoch key) is what devices send; v1 stays for devices that cannot be updated.
SUPPORTED_FORMATS: dict[str, frozenset[int]] = {"sealed-reading": frozenset({1, 2})}
DESTINATIONS = frozenset({"hospital"})
# What the gateway does when the spool is full. Only one policy exists because it is the only
# one that loses nothing: stop acknowledging and disconnect from MQTT, so that the broker holds
# the messages in the gateway's persistent session until the hospital is back.
SPOOL_FULL_POLICIES = frozenset({"pause-mqtt"})
DEFAULT_MAX_PAYLOAD = SEALED_SIZE_V2 * 2  # room for a slightly larger v3, nothing more
DEFAULT_CLOCK_SKEW_S = 86_400.0  # a pacemaker clock a day off is broken, not skewed
DEFAULT_SPOOL_READINGS = 1_000_000  # ~100 MB of spool; about 14 h of a 20-device ward at 1 Hz


# -- the schema: every key, its type, default, bounds and meaning ------------------------------
# The parser below reads each key through these tables, and `pacegate config schema` turns them
# into the JSON Schema that editors use (gateway.schema.json), so the two cannot drift.
# Rules that span keys (device_id_level must point at a '+', reconnect_max_s >= reconnect_min_s,
# spool.max_readings >= one batch, unique route names and topics, files that must exist) are
# the parser's alone; the schema's description says so.
@dataclass(frozen=True)
class Key:
    """One key of gateway.yaml."""

    kind: str  # "str", "int", "float", "bool", "path"
    doc: str
    default: str | int | float | bool | None = None
    required: bool = False
    lo: int | float | None = None
    hi: int | float | None = None
    choices: tuple[str, ...] = ()
    pattern: str | None = None  # JSON Schema only: the parser's own check has the message


@dataclass(frozen=True)
class Section:
    """A mapping of keys (``keys``) and nested sections (``sections``); ``many``: a list of them."""

    doc: str
    keys: dict[str, Key] = field(default_factory=dict)
    sections: dict[str, Section] = field(default_factory=dict)
    required: bool = False
    many: bool = False

    @property
    def names(self) -> set[str]:
        return set(self.keys) | set(self.sections)


_LOOPBACK_PATTERN = r"^(?:localhost|127(?:\.[0-9]{1,3}){3}|::1)$"

MQTT_SECTION = Section(
    "the broker, over TLS with the gateway's own certificate (mTLS)",
    {
        "host": Key("str", "broker address", MQTT.host),
        "port": Key("int", "MQTT over TLS (IANA secure-mqtt)", MQTT.port, lo=1, hi=65535),
        "client_id": Key(
            "str",
            "must equal the certificate CN; the session is persistent",
            "gateway",
            pattern=IDENTITY_NAME_PATTERN,
        ),
        "ca": Key("path", "CA certificate that verifies the broker", required=True),
        "cert": Key("path", "the gateway's certificate (pacegate pki init)", required=True),
        "key": Key("path", "the gateway's private key (mode 0600)", required=True),
        "keepalive_s": Key("int", "MQTT keepalive, seconds", 30, lo=5, hi=3600),
        "server_name": Key("str", "TLS name to verify; default: host", ""),
    },
    required=True,
)
PSK_STORE_SECTION = Section(
    "every device's 32-byte PSK, AES-256-GCM at rest; reloaded when it changes",
    {
        "path": Key("path", "the encrypted PSK store", required=True),
        "key": Key("path", "the store's key file (mode 0600)", required=True),
    },
    required=True,
)
HOSPITAL_SECTION = Section(
    "the post-quantum channel to the hospital (ML-KEM-768 + X25519, AES-256-GCM)",
    {
        "host": Key("str", "hospital ingest address", HOSPITAL.host),
        "port": Key("int", "hospital ingest port", HOSPITAL.port, lo=1, hi=65535),
        "server_name": Key(
            "str",
            "the identity expected at the other end",
            "hospital",
            pattern=IDENTITY_NAME_PATTERN,
        ),
        "server_key": Key("path", "pinned ML-DSA-65 public key of the hospital", required=True),
        "identity": Key("path", "the gateway's ML-DSA-65 identity (private key)", required=True),
        "batch_max_readings": Key(
            "int", "readings per BATCH at most", 200, lo=1, hi=MAX_BATCH_ITEMS
        ),
        "batch_max_delay_ms": Key(
            "float", "how long a batch waits to fill up, ms", 50.0, lo=0.0, hi=10_000.0
        ),
        "ack_timeout_s": Key(
            "float", "no ACK within this: the hospital is treated as down", 10.0, lo=0.1, hi=600
        ),
        "reconnect_min_s": Key("float", "reconnect backoff start", 0.2, lo=0.01, hi=60.0),
        "reconnect_max_s": Key(
            "float", "reconnect backoff ceiling (>= reconnect_min_s)", 10.0, lo=0.01, hi=3600.0
        ),
    },
    sections={
        "failover": Section(
            "further hospital ingest nodes (the same pinned identity), tried in order when the "
            "current one cannot be reached; a batch not acknowledged is resent to the next",
            {
                "host": Key("str", "hospital ingest address", required=True),
                "port": Key("int", "hospital ingest port", required=True, lo=1, hi=65535),
            },
            many=True,
        )
    },
    required=True,
)
SPOOL_SECTION = Section(
    "encrypted store-and-forward while the hospital is unreachable",
    {
        "path": Key("path", "default: <state_dir>/spool.db"),
        "key": Key("path", "default: <state_dir>/spool.key (created 0600)"),
        "max_readings": Key(
            "int", "bound on spooled readings", DEFAULT_SPOOL_READINGS, lo=1, hi=10**9
        ),
        "when_full": Key(
            "str",
            "stop acking and leave MQTT: the broker keeps the messages",
            "pause-mqtt",
            choices=tuple(sorted(SPOOL_FULL_POLICIES)),
        ),
    },
)
METRICS_SECTION = Section(
    "Prometheus text format at http://host:port/metrics",
    {
        "enabled": Key("bool", "serve the metrics endpoint", True),
        "host": Key(
            "str",
            "loopback only: the endpoint has no authentication",
            GATEWAY_METRICS.host,
            pattern=_LOOPBACK_PATTERN,
        ),
        "port": Key("int", "0: an ephemeral port", GATEWAY_METRICS.port, lo=0, hi=65535),
    },
)
RELOAD_SECTION = Section(
    "how the running gateway notices edits of this file",
    {"poll_s": Key("float", "mtime check period (0: SIGHUP only)", 1.0, lo=0.0, hi=3600)},
)
LIMITS_SECTION = Section(
    "per-route limits, checked before any cryptography",
    {
        "max_payload_bytes": Key(
            "int",
            "larger payloads are refused before parsing",
            DEFAULT_MAX_PAYLOAD,
            lo=1,
            hi=MAX_SEALED_SIZE,
        ),
        "max_rate_per_device": Key(
            "float", "messages/s per device (token bucket); 0 = no limit", 0.0, lo=0.0, hi=1e6
        ),
        "burst": Key(
            "int", "token bucket size; default: twice the rate, at least 1", lo=1, hi=10**6
        ),
        "max_clock_skew_s": Key(
            "float",
            "readings stamped further in the future are refused",
            DEFAULT_CLOCK_SKEW_S,
            lo=1.0,
            hi=10 * 365 * 86400,
        ),
    },
)
ROUTE_SECTION = Section(
    "a route: tried in order, the first filter that matches wins",
    {
        "name": Key("str", "default: routes[<index>]"),
        "topic": Key(
            "str",
            "MQTT filter: '+' one whole level, '#' the rest",
            required=True,
            pattern=TOPIC_FILTER_PATTERN,
        ),
        "device_id_level": Key(
            "int",
            "which level holds the device id (from 0); must be a '+'; "
            "required unless the filter has exactly one '+'",
            lo=0,
            hi=1000,
        ),
        "format": Key(
            "str",
            "payload format and version (docs/wire-formats.md)",
            "sealed-reading/v2",
            choices=tuple(
                f"{f}/v{v}" for f, vs in sorted(SUPPORTED_FORMATS.items()) for v in sorted(vs)
            ),
        ),
        "destination": Key(
            "str", "where readings go", "hospital", choices=tuple(sorted(DESTINATIONS))
        ),
        "qos": Key("int", "1: acknowledged only once durably stored", 1, lo=0, hi=1),
    },
    {"limits": LIMITS_SECTION},
    many=True,
)
GATEWAY_SCHEMA = Section(
    "pacegate gateway configuration (docs/gateway.md)",
    {"state_dir": Key("path", "replay.db (replay windows) and the spool live here", required=True)},
    {
        "mqtt": MQTT_SECTION,
        "psk_store": PSK_STORE_SECTION,
        "hospital": HOSPITAL_SECTION,
        "spool": SPOOL_SECTION,
        "metrics": METRICS_SECTION,
        "reload": RELOAD_SECTION,
        "routes": ROUTE_SECTION,
    },
)
_TOP_KEYS = GATEWAY_SCHEMA.names


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    client_id: str
    ca: Path
    cert: Path
    key: Path
    keepalive_s: int
    server_name: str | None  # TLS name to verify; default: host


@dataclass(frozen=True)
class PskStoreSettings:
    path: Path
    key: Path


@dataclass(frozen=True)
class HospitalSettings:
    host: str
    port: int
    server_name: str
    server_key: Path
    identity: Path
    batch_max_readings: int
    batch_max_delay_s: float
    ack_timeout_s: float
    reconnect_min_s: float
    reconnect_max_s: float
    # further ingest nodes after (host, port), in the order they are tried
    failover: tuple[tuple[str, int], ...] = ()

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        return ((self.host, self.port), *self.failover)


@dataclass(frozen=True)
class SpoolSettings:
    path: Path
    key: Path
    max_readings: int
    when_full: str


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool
    host: str
    port: int  # 0: an ephemeral port (tests)


@dataclass(frozen=True)
class RouteLimits:
    max_payload_bytes: int
    max_rate_per_device: float  # messages/s, 0 = no limit
    burst: int
    max_clock_skew_s: float


@dataclass(frozen=True)
class Route:
    name: str
    topic: str
    device_id_level: int
    format: str
    version: int
    destination: str
    qos: int
    limits: RouteLimits

    def device_id_from(self, topic: str) -> str | None:
        """The device id in ``topic`` if ``topic`` matches this route's filter, else None."""
        return device_id_in(self.topic, self.device_id_level, topic)


@dataclass(frozen=True)
class ReloadSettings:
    poll_s: float  # 0: only SIGHUP


@dataclass(frozen=True)
class GatewayConfig:
    path: Path
    mqtt: MqttSettings
    psk_store: PskStoreSettings
    state_dir: Path
    hospital: HospitalSettings
    spool: SpoolSettings
    metrics: MetricsSettings
    reload: ReloadSettings
    routes: tuple[Route, ...]

    @property
    def replay_db(self) -> Path:
        return self.state_dir / "replay.db"


class GatewayConfigError(ConfigError):
    """One or more errors in a gateway.yaml; ``errors`` holds each, in file order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.path, first.key, first.problem, fix=first.fix, line=first.line)
        self.errors = errors
        if len(errors) > 1:
            self.args = ("\n".join(str(e) for e in errors),)


class _Collector:
    """Run each accessor and keep going after an error, so that one run reports them all."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def take(self, fn: Callable[[], T], fallback: T) -> T:
        try:
            return fn()
        except GatewayConfigError as exc:
            self.errors.extend(exc.errors)
        except ConfigError as exc:
            self.errors.append(exc)
        return fallback


def _read(
    sec: ConfigSection,
    spec: Section,
    name: str,
    out: _Collector,
    fallback: Any,
    *,
    default: Any = None,
    lo: float | None = None,
    check_files: bool = False,
) -> Any:
    """Read key ``name`` of ``sec`` as ``spec`` describes it (type, default, bounds);
    ``default``/``lo`` override the table where they depend on other keys."""
    k = spec.keys[name]
    d: Any = k.default if default is None else default
    low = k.lo if lo is None else lo

    def read() -> Any:
        if k.kind == "int":
            ilo = None if low is None else int(low)
            ihi = None if k.hi is None else int(k.hi)
            return sec.get_int(name, d, lo=ilo, hi=ihi, required=k.required)
        if k.kind == "float":
            return sec.get_float(name, d, lo=low, hi=k.hi, required=k.required)
        if k.kind == "bool":
            return sec.get(name, bool, d, required=k.required)
        if k.kind == "path":
            exist = check_files and k.required
            return sec.get_path(name, d, required=k.required, must_exist=exist)
        return sec.get(name, str, d, required=k.required)

    return out.take(read, fallback)


def _route(sec: ConfigSection, index: int, out: _Collector) -> Route | None:
    spec = ROUTE_SECTION
    out.take(lambda: sec.check_keys(spec.names), None)
    name = _read(sec, spec, "name", out, f"routes[{index}]", default=f"routes[{index}]")
    topic = _read(sec, spec, "topic", out, None)
    levels: tuple[str, ...] = ()
    if topic is not None:
        problem = topic_filter_problem(topic)
        if problem is not None:
            out.errors.append(sec.error("topic", problem[0], fix=problem[1]))
            topic = None
        else:
            levels = tuple(topic.split("/"))
    plus = [i for i, lv in enumerate(levels) if lv == "+"]
    device_level: int | None
    if "device_id_level" in sec.data or len(plus) != 1:
        device_level = _read(sec, spec, "device_id_level", out, None)
        if topic is not None and device_level is not None and device_level not in plus:
            here = levels[device_level] if device_level < len(levels) else None
            what = f"is {here!r}" if here is not None else "does not exist"
            hint = (
                f"set device_id_level to {plus[0]} (levels count from 0)"
                if len(plus) == 1
                else "put '+' where the device id stands and point device_id_level at it"
            )
            out.errors.append(
                sec.error(
                    "device_id_level",
                    f"level {device_level} of {topic!r} {what}; the device id must come "
                    "from a '+' level",
                    fix=hint,
                )
            )
    else:
        device_level = plus[0]
    fmt_raw = _read(sec, spec, "format", out, None)
    fmt, version = "", 0
    if fmt_raw is not None:
        known = ", ".join(f"{f}/v{v}" for f, vs in SUPPORTED_FORMATS.items() for v in sorted(vs))
        base, sep, ver = fmt_raw.rpartition("/v")
        if not sep or not ver.isdigit() or int(ver) not in SUPPORTED_FORMATS.get(base, ()):
            out.errors.append(
                sec.error(
                    "format",
                    f"payload format {fmt_raw!r} is not supported",
                    fix=f"use one of: {known}",
                )
            )
        else:
            fmt, version = base, int(ver)
    dest = _read(sec, spec, "destination", out, None)
    if dest is not None and dest not in DESTINATIONS:
        out.errors.append(
            sec.error(
                "destination",
                f"unknown destination {dest!r}",
                fix=f"use one of: {', '.join(sorted(DESTINATIONS))}",
            )
        )
    qos = _read(sec, spec, "qos", out, None)
    lim = out.take(lambda: sec.section("limits"), None)
    limits = None
    if lim is not None:
        limits = _limits(lim, out)
    if topic is None or device_level is None or dest is None or qos is None or limits is None:
        return None
    if not fmt:
        return None
    return Route(
        name=name,
        topic=topic,
        device_id_level=device_level,
        format=fmt,
        version=version,
        destination=dest,
        qos=qos,
        limits=limits,
    )


def _limits(sec: ConfigSection, out: _Collector) -> RouteLimits | None:
    spec = LIMITS_SECTION
    n = len(out.errors)
    out.take(lambda: sec.check_keys(spec.names), None)
    size = _read(sec, spec, "max_payload_bytes", out, 0)
    rate = _read(sec, spec, "max_rate_per_device", out, 0.0)
    burst = _read(sec, spec, "burst", out, 1, default=max(1, int(rate * 2)))
    skew = _read(sec, spec, "max_clock_skew_s", out, 0.0)
    if len(out.errors) != n:
        return None
    return RouteLimits(size, rate, burst, skew)


def _loopback(sec: ConfigSection, key: str, default: str, out: _Collector) -> str:
    host = out.take(lambda: sec.get(key, str, default), default)
    if host == "localhost":
        return host
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        out.errors.append(
            sec.error(
                key,
                f"{host!r} is not a loopback address; metrics are served without authentication",
                fix="use 127.0.0.1 or ::1 (put a reverse proxy in front for remote scraping)",
            )
        )
    return host


def _identity_name(sec: ConfigSection, value: str, key: str, out: _Collector) -> str:
    """``value`` if it is an identity name (pacegate.identity), else the error is collected."""
    if not is_identity_name(value):
        out.errors.append(
            sec.error(
                key, f"{value!r} is not a valid identity name", fix=f"use {IDENTITY_NAME_RULE}"
            )
        )
    return value


def _file(sec: ConfigSection, key: str, default: str | None, check: bool, out: _Collector) -> Path:
    return out.take(
        lambda: sec.get_path(key, default, required=default is None, must_exist=check),
        Path("/nonexistent"),
    )


def _failover(h: ConfigSection, out: _Collector) -> tuple[tuple[str, int], ...]:
    fs = HOSPITAL_SECTION.sections["failover"]
    nodes: list[tuple[str, int]] = []
    empty: list[ConfigSection] = []
    for node in out.take(lambda: h.sections("failover"), empty):
        out.take(partial(node.check_keys, fs.names), None)
        nodes.append((_read(node, fs, "host", out, ""), _read(node, fs, "port", out, 0)))
    return tuple(nodes)


def parse_gateway_config(root: ConfigSection, *, check_files: bool = True) -> GatewayConfig:
    """Build a :class:`GatewayConfig` from a loaded YAML mapping, or raise every error."""
    out = _Collector()
    out.take(lambda: root.check_keys(_TOP_KEYS), None)

    m = out.take(lambda: root.section("mqtt", required=True), None)
    mqtt = None
    if m is not None:
        ms = MQTT_SECTION
        out.take(lambda: m.check_keys(ms.names), None)
        files = {k: _read(m, ms, k, out, Path("/nonexistent"), check_files=check_files)
                 for k in ("ca", "cert", "key")}  # fmt: skip
        mqtt = MqttSettings(
            host=_read(m, ms, "host", out, ""),
            port=_read(m, ms, "port", out, 0),
            client_id=_identity_name(
                m, _read(m, ms, "client_id", out, "gateway"), "client_id", out
            ),
            ca=files["ca"],
            cert=files["cert"],
            key=files["key"],
            keepalive_s=_read(m, ms, "keepalive_s", out, 30),
            server_name=_read(m, ms, "server_name", out, "") or None,
        )

    p = out.take(lambda: root.section("psk_store", required=True), None)
    psk = None
    if p is not None:
        ps = PSK_STORE_SECTION
        out.take(lambda: p.check_keys(ps.names), None)
        psk = PskStoreSettings(
            path=_read(p, ps, "path", out, Path("/nonexistent"), check_files=check_files),
            key=_read(p, ps, "key", out, Path("/nonexistent"), check_files=check_files),
        )

    state_dir = _read(root, GATEWAY_SCHEMA, "state_dir", out, Path("/nonexistent"))

    h = out.take(lambda: root.section("hospital", required=True), None)
    hospital = None
    if h is not None:
        hs = HOSPITAL_SECTION
        out.take(lambda: h.check_keys(hs.names), None)
        rmin = _read(h, hs, "reconnect_min_s", out, 0.2)
        hospital = HospitalSettings(
            host=_read(h, hs, "host", out, ""),
            port=_read(h, hs, "port", out, 0),
            server_name=_identity_name(
                h, _read(h, hs, "server_name", out, "hospital"), "server_name", out
            ),
            server_key=_read(
                h, hs, "server_key", out, Path("/nonexistent"), check_files=check_files
            ),
            identity=_read(h, hs, "identity", out, Path("/nonexistent"), check_files=check_files),
            batch_max_readings=_read(h, hs, "batch_max_readings", out, 200),
            batch_max_delay_s=_read(h, hs, "batch_max_delay_ms", out, 50.0) / 1000.0,
            ack_timeout_s=_read(h, hs, "ack_timeout_s", out, 10.0),
            reconnect_min_s=rmin,
            reconnect_max_s=_read(h, hs, "reconnect_max_s", out, 10.0, lo=rmin),
            failover=_failover(h, out),
        )

    s = out.take(lambda: root.section("spool"), None)
    spool = None
    if s is not None:
        ss = SPOOL_SECTION
        out.take(lambda: s.check_keys(ss.names), None)
        when_full = _read(s, ss, "when_full", out, "pause-mqtt")
        if when_full not in SPOOL_FULL_POLICIES:
            out.errors.append(
                s.error(
                    "when_full",
                    f"unknown policy {when_full!r}",
                    fix=f"use one of: {', '.join(sorted(SPOOL_FULL_POLICIES))}",
                )
            )
        spool = SpoolSettings(
            path=_read(s, ss, "path", out, Path(), default=str(state_dir / "spool.db")),
            key=_read(s, ss, "key", out, Path(), default=str(state_dir / "spool.key")),
            max_readings=_read(s, ss, "max_readings", out, 0),
            when_full=when_full,
        )

    mt = out.take(lambda: root.section("metrics"), None)
    metrics = None
    if mt is not None:
        mts = METRICS_SECTION
        out.take(lambda: mt.check_keys(mts.names), None)
        metrics = MetricsSettings(
            enabled=_read(mt, mts, "enabled", out, True),
            host=_loopback(mt, "host", str(mts.keys["host"].default), out),
            port=_read(mt, mts, "port", out, 0),
        )

    rl = out.take(lambda: root.section("reload"), None)
    reload = ReloadSettings(1.0)
    if rl is not None:
        out.take(lambda: rl.check_keys(RELOAD_SECTION.names), None)
        reload = ReloadSettings(_read(rl, RELOAD_SECTION, "poll_s", out, 1.0))

    routes: list[Route] = []
    no_sections: list[ConfigSection] = []
    secs = out.take(lambda: root.sections("routes", required=True), no_sections)
    if "routes" in root.data and not secs and not out.errors:
        out.errors.append(
            root.error("routes", "no route: the gateway would receive nothing", fix="add a route")
        )
    seen_names: dict[str, int] = {}
    seen_topics: dict[str, int] = {}
    for i, sec in enumerate(secs):
        route = _route(sec, i, out)
        if route is None:
            continue
        if route.name in seen_names:
            out.errors.append(
                sec.error("name", f"duplicate route name (also routes[{seen_names[route.name]}])")
            )
        if route.topic in seen_topics:
            out.errors.append(
                sec.error(
                    "topic",
                    f"the same filter as routes[{seen_topics[route.topic]}]",
                    fix="merge the two routes: the first would always win",
                )
            )
        seen_names.setdefault(route.name, i)
        seen_topics.setdefault(route.topic, i)
        routes.append(route)

    if s is not None and spool and hospital and spool.max_readings < hospital.batch_max_readings:
        out.errors.append(
            s.error(
                "max_readings",
                f"{spool.max_readings} is smaller than one batch "
                f"(hospital.batch_max_readings: {hospital.batch_max_readings})",
                fix="give the spool room for many batches, or make batches smaller",
            )
        )
    if out.errors:
        out.errors.sort(key=lambda e: e.line or 0)
        raise GatewayConfigError(out.errors)
    if mqtt is None or psk is None or hospital is None or spool is None or metrics is None:
        # every missing section was an error collected above
        raise InvariantError("gateway.yaml parsed without errors but a section is missing")
    return GatewayConfig(
        path=root.path,
        mqtt=mqtt,
        psk_store=psk,
        state_dir=state_dir,
        hospital=hospital,
        spool=spool,
        metrics=metrics,
        reload=reload,
        routes=tuple(routes),
    )


def load_gateway_config(path: str | Path, *, check_files: bool = True) -> GatewayConfig:
    """Read and validate ``path``; raise :class:`GatewayConfigError` listing every error.

    ``check_files`` also requires the certificate, key and key-store files to exist.
    """
    try:
        root = load_config(path)
    except ConfigError as exc:
        raise GatewayConfigError([exc]) from None
    return parse_gateway_config(root, check_files=check_files)
