"""The gateway.yaml schema: one module reads it, every error names file, line, key and fix.

The reference (every key, its default and why) is ``docs/gateway.md``; the commented example
is ``gateway.example.yaml`` at the top of the repository. Relative paths resolve against the
directory of the file (ARCHITECTURE.md).

:func:`load_gateway_config` raises :class:`GatewayConfigError` (a
:class:`~pacegate.errors.ConfigError`) that carries *every* error found, not only the first,
so that ``pacegate config check`` can list them all in one run.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pacegate.configfile import ConfigSection, load_config
from pacegate.errors import ConfigError
from pacegate.identity import TELEMETRY_FILTER
from pacegate.layout import WorkLayout
from pacegate.sealed import MAX_SEALED_SIZE, SEALED_SIZE_V2

T = TypeVar("T")

# payload format name -> versions this gateway opens. A v2 is added here and in pacegate.sealed.
# v2 (per-boot epoch key) is what devices send; v1 stays for devices that cannot be updated.
SUPPORTED_FORMATS: dict[str, frozenset[int]] = {"sealed-reading": frozenset({1, 2})}
DESTINATIONS = frozenset({"hospital"})
# What the gateway does when the spool is full. Only one policy exists because it is the only
# one that loses nothing: stop acknowledging and disconnect from MQTT, so that the broker holds
# the messages in the gateway's persistent session until the hospital is back.
SPOOL_FULL_POLICIES = frozenset({"pause-mqtt"})
MQTT_TOPIC_MAX_BYTES = 65535  # MQTT 3.1.1 §1.5.3: a UTF-8 string with a 16-bit length
DEFAULT_MAX_PAYLOAD = SEALED_SIZE_V2 * 2  # room for a slightly larger v3, nothing more
DEFAULT_CLOCK_SKEW_S = 86_400.0  # a pacemaker clock a day off is broken, not skewed
DEFAULT_SPOOL_READINGS = 1_000_000  # ~100 MB of spool; about 14 h of a 20-device ward at 1 Hz

_TOP_KEYS = {"mqtt", "psk_store", "state_dir", "hospital", "spool", "metrics", "reload", "routes"}


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
    levels: tuple[str, ...] = field(repr=False, default=())

    def device_id_from(self, topic: str) -> str | None:
        """The device id in ``topic`` if ``topic`` matches this route's filter, else None."""
        parts = topic.split("/")
        levels = self.levels
        if levels and levels[-1] == "#":
            if len(parts) < len(levels) - 1:
                return None
            fixed = levels[:-1]
        else:
            if len(parts) != len(levels):
                return None
            fixed = levels
        for want, got in zip(fixed, parts, strict=False):
            if want != "+" and want != got:
                return None
        # MQTT 3.1.1 §4.7.2: wildcards at the first level do not match '$' topics
        if parts[0].startswith("$") and levels[0] in ("+", "#"):
            return None
        return parts[self.device_id_level]


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


# -- topic filters -------------------------------------------------------------------------
def topic_filter_problem(topic: str) -> tuple[str, str] | None:
    """Why ``topic`` is not a valid MQTT subscription filter, as (problem, fix), or None."""
    if not topic:
        return "a topic filter cannot be empty", "write e.g. 'pacemakers/+/telemetry'"
    if len(topic.encode("utf-8")) > MQTT_TOPIC_MAX_BYTES:
        return f"longer than {MQTT_TOPIC_MAX_BYTES} bytes", "shorten the filter"
    if "\x00" in topic:
        return "contains a NUL character", "remove it"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return (
                f"'+' must fill a whole topic level (level {i} is {level!r})",
                "write '/+/' between slashes, e.g. 'pacemakers/+/telemetry'",
            )
        if "#" in level and level != "#":
            return (
                f"'#' must fill a whole topic level (level {i} is {level!r})",
                "write '#' alone after the last '/', e.g. 'pacemakers/#'",
            )
        if level == "#" and i != len(levels) - 1:
            return "'#' must be the last level", "move '#' to the end or use '+' for one level"
    return None


def _route(sec: ConfigSection, index: int, out: _Collector) -> Route | None:
    allowed = {"name", "topic", "device_id_level", "format", "destination", "qos", "limits"}
    out.take(lambda: sec.check_keys(allowed), None)
    name = out.take(lambda: sec.get("name", str, f"routes[{index}]"), f"routes[{index}]")
    topic = out.take(lambda: sec.get("topic", str, required=True), None)
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
        device_level = out.take(lambda: sec.get_int("device_id_level", lo=0, hi=1000), None)
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
    fmt_raw = out.take(lambda: sec.get("format", str, "sealed-reading/v2"), None)
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
    dest = out.take(lambda: sec.get("destination", str, "hospital"), None)
    if dest is not None and dest not in DESTINATIONS:
        out.errors.append(
            sec.error(
                "destination",
                f"unknown destination {dest!r}",
                fix=f"use one of: {', '.join(sorted(DESTINATIONS))}",
            )
        )
    qos = out.take(lambda: sec.get_int("qos", 1, lo=0, hi=1), None)
    lim = out.take(lambda: sec.section("limits"), None)
    limits = None
    if lim is not None:
        limits = _limits(lim, out)
    if None in (topic, device_level, dest, qos, limits) or not fmt:
        return None
    assert topic is not None and device_level is not None and dest is not None
    assert qos is not None and limits is not None
    return Route(
        name=name,
        topic=topic,
        device_id_level=device_level,
        format=fmt,
        version=version,
        destination=dest,
        qos=qos,
        limits=limits,
        levels=levels,
    )


def _limits(sec: ConfigSection, out: _Collector) -> RouteLimits | None:
    allowed = {"max_payload_bytes", "max_rate_per_device", "burst", "max_clock_skew_s"}
    n = len(out.errors)
    out.take(lambda: sec.check_keys(allowed), None)
    size = out.take(
        lambda: sec.get_int("max_payload_bytes", DEFAULT_MAX_PAYLOAD, lo=1, hi=MAX_SEALED_SIZE),
        0,
    )
    rate = out.take(lambda: sec.get_float("max_rate_per_device", 0.0, lo=0.0, hi=1e6), 0.0)
    burst = out.take(lambda: sec.get_int("burst", max(1, int(rate * 2)), lo=1, hi=10**6), 1)
    skew = out.take(
        lambda: sec.get_float(
            "max_clock_skew_s", DEFAULT_CLOCK_SKEW_S, lo=1.0, hi=10 * 365 * 86400
        ),
        0.0,
    )
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


def _file(sec: ConfigSection, key: str, default: str | None, check: bool, out: _Collector) -> Path:
    return out.take(
        lambda: sec.get_path(key, default, required=default is None, must_exist=check),
        Path("/nonexistent"),
    )


def parse_gateway_config(root: ConfigSection, *, check_files: bool = True) -> GatewayConfig:
    """Build a :class:`GatewayConfig` from a loaded YAML mapping, or raise every error."""
    out = _Collector()
    out.take(lambda: root.check_keys(_TOP_KEYS), None)

    m = out.take(lambda: root.section("mqtt", required=True), None)
    mqtt = None
    if m is not None:
        out.take(
            lambda: m.check_keys(
                {"host", "port", "client_id", "ca", "cert", "key", "keepalive_s", "server_name"}
            ),
            None,
        )
        client_id = out.take(lambda: m.get("client_id", str, "gateway"), "gateway")
        mqtt = MqttSettings(
            host=out.take(lambda: m.get("host", str, "127.0.0.1"), ""),
            port=out.take(lambda: m.get_int("port", 8883, lo=1, hi=65535), 0),
            client_id=client_id,
            ca=_file(m, "ca", None, check_files, out),
            cert=_file(m, "cert", None, check_files, out),
            key=_file(m, "key", None, check_files, out),
            keepalive_s=out.take(lambda: m.get_int("keepalive_s", 30, lo=5, hi=3600), 30),
            server_name=out.take(lambda: m.get("server_name", str, ""), "") or None,
        )

    p = out.take(lambda: root.section("psk_store", required=True), None)
    psk = None
    if p is not None:
        out.take(lambda: p.check_keys({"path", "key"}), None)
        psk = PskStoreSettings(
            path=_file(p, "path", None, check_files, out),
            key=_file(p, "key", None, check_files, out),
        )

    state_dir = out.take(lambda: root.get_path("state_dir", required=True), Path("/nonexistent"))

    h = out.take(lambda: root.section("hospital", required=True), None)
    hospital = None
    if h is not None:
        out.take(
            lambda: h.check_keys(
                {
                    "host",
                    "port",
                    "server_name",
                    "server_key",
                    "identity",
                    "batch_max_readings",
                    "batch_max_delay_ms",
                    "ack_timeout_s",
                    "reconnect_min_s",
                    "reconnect_max_s",
                }
            ),
            None,
        )
        from pacegate.ingest import MAX_BATCH_ITEMS

        rmin = out.take(lambda: h.get_float("reconnect_min_s", 0.2, lo=0.01, hi=60.0), 0.2)
        hospital = HospitalSettings(
            host=out.take(lambda: h.get("host", str, "127.0.0.1"), ""),
            port=out.take(lambda: h.get_int("port", 8884, lo=1, hi=65535), 0),
            server_name=out.take(lambda: h.get("server_name", str, "hospital"), "hospital"),
            server_key=_file(h, "server_key", None, check_files, out),
            identity=_file(h, "identity", None, check_files, out),
            batch_max_readings=out.take(
                lambda: h.get_int("batch_max_readings", 200, lo=1, hi=MAX_BATCH_ITEMS), 200
            ),
            batch_max_delay_s=out.take(
                lambda: h.get_float("batch_max_delay_ms", 50.0, lo=0.0, hi=10_000.0), 50.0
            )
            / 1000.0,
            ack_timeout_s=out.take(
                lambda: h.get_float("ack_timeout_s", 10.0, lo=0.1, hi=600), 10.0
            ),
            reconnect_min_s=rmin,
            reconnect_max_s=out.take(
                lambda: h.get_float("reconnect_max_s", 10.0, lo=rmin, hi=3600.0), 10.0
            ),
        )

    s = out.take(lambda: root.section("spool"), None)
    spool = None
    if s is not None:
        out.take(lambda: s.check_keys({"path", "key", "max_readings", "when_full"}), None)
        when_full = out.take(lambda: s.get("when_full", str, "pause-mqtt"), "pause-mqtt")
        if when_full not in SPOOL_FULL_POLICIES:
            out.errors.append(
                s.error(
                    "when_full",
                    f"unknown policy {when_full!r}",
                    fix=f"use one of: {', '.join(sorted(SPOOL_FULL_POLICIES))}",
                )
            )
        spool = SpoolSettings(
            path=out.take(lambda: s.get_path("path", str(state_dir / "spool.db")), Path()),
            key=out.take(lambda: s.get_path("key", str(state_dir / "spool.key")), Path()),
            max_readings=out.take(
                lambda: s.get_int("max_readings", DEFAULT_SPOOL_READINGS, lo=1, hi=10**9), 0
            ),
            when_full=when_full,
        )

    mt = out.take(lambda: root.section("metrics"), None)
    metrics = None
    if mt is not None:
        out.take(lambda: mt.check_keys({"enabled", "host", "port"}), None)
        metrics = MetricsSettings(
            enabled=out.take(lambda: mt.get("enabled", bool, True), True),
            host=_loopback(mt, "host", "127.0.0.1", out),
            port=out.take(lambda: mt.get_int("port", 9108, lo=0, hi=65535), 0),
        )

    rl = out.take(lambda: root.section("reload"), None)
    reload = ReloadSettings(1.0)
    if rl is not None:
        out.take(lambda: rl.check_keys({"poll_s"}), None)
        reload = ReloadSettings(out.take(lambda: rl.get_float("poll_s", 1.0, lo=0.0, hi=3600), 1.0))

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

    if spool and hospital and spool.max_readings < hospital.batch_max_readings:
        assert s is not None
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
    assert mqtt and psk and hospital and spool and metrics
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


def cli_check(args: argparse.Namespace) -> int:
    """``pacegate config check FILE``: print OK, or every error with file:line, key and fix."""
    try:
        cfg = load_gateway_config(args.file, check_files=not getattr(args, "schema_only", False))
    except GatewayConfigError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        n = len(exc.errors)
        print(f"{args.file}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK ({len(cfg.routes)} route{'s' if len(cfg.routes) != 1 else ''})")
    return 0


# -- the default file written by `pacegate up` / `demo` -------------------------------------
def render_default_config(
    work: WorkLayout,
    *,
    mqtt_host: str,
    mqtt_port: int,
    hospital_host: str,
    hospital_port: int,
    metrics_port: int,
) -> str:
    """The gateway.yaml that ``pacegate up``/``demo`` write into ``work.root`` (commented)."""

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(work.root))
        except ValueError:
            return str(p)

    pki = work.pki
    return f"""\
# gateway.yaml written by pacegate for {work.root.name}/ (reference: docs/gateway.md).
# Relative paths resolve against this file's directory. Check an edit with
#   pacegate config check {rel(work.gateway_config)}
# The running gateway reloads routes on SIGHUP or when this file changes; an invalid edit
# is refused with the reason in the log and the previous configuration stays in force.

mqtt:                       # the broker, reached with the gateway's own certificate (mTLS)
  host: {mqtt_host}
  port: {mqtt_port}
  client_id: gateway        # must match the certificate CN; the session is persistent
  ca: {rel(pki.ca_cert)}
  cert: {rel(pki.gateway_cert)}
  key: {rel(pki.gateway_key)}

psk_store:                  # device PSKs, encrypted at rest; reloaded when it changes
  path: {rel(pki.psk_store)}
  key: {rel(pki.psk_store_key)}

state_dir: {rel(work.gateway_dir)}          # replay windows (replay.db) and the spool

hospital:                   # the post-quantum channel to the hospital
  host: {hospital_host}
  port: {hospital_port}
  server_name: hospital
  server_key: {rel(pki.channel_pub("hospital"))}   # pinned ML-DSA-65 public key
  identity: {rel(pki.channel_key("gateway"))}     # our ML-DSA-65 identity
  batch_max_readings: 200
  batch_max_delay_ms: 50

spool:                      # encrypted store-and-forward while the hospital is away
  max_readings: {DEFAULT_SPOOL_READINGS}
  when_full: pause-mqtt     # stop acking and leave MQTT: the broker keeps the messages

metrics:                    # Prometheus text format, loopback only
  host: 127.0.0.1
  port: {metrics_port}

routes:
  - name: telemetry
    topic: {TELEMETRY_FILTER}
    device_id_level: 1      # pacemakers/<device_id>/telemetry
    format: sealed-reading/v2
    destination: hospital
    qos: 1
    limits:
      max_payload_bytes: {DEFAULT_MAX_PAYLOAD}
      # max_rate_per_device: 0    # messages/s per device (0 = no limit). Readings over it
      #                           # are refused and acknowledged, even a legitimate backlog
      #                           # after an outage: set it far above the devices' rate.
"""
