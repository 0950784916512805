"""``pacegate capture``: record pacegate's loopback traffic and verify it with tshark.

What the report checks, and how:

- **TLS versions and cipher suites** of every MQTT handshake (ServerHello fields).
- **Client certificates required**: with the key log, the encrypted TLS 1.3 handshake is
  readable, so we count the broker's CertificateRequest and the clients' Certificate messages.
- **MQTT payloads still sealed**: with the key log, tshark decrypts TLS and dissects MQTT; every
  PUBLISH payload must parse as a sealed reading (``pacegate.sealed``) and, when the work
  directory's device bundles are at hand, open under that device's PSK. Opening them is how we
  learn the readings that were sent...
- **No reading in clear on any port**: ...so that we can then search every TCP payload of the
  capture, on every port (MQTT/TLS, the post-quantum channels, metrics), raw and TLS-decrypted,
  for each reading's wire encoding and for the reading's JSON field names.
- **What pacegate's Wireshark dissectors see** (``console/wireshark/*.lua``, loaded with
  ``-X lua_script:``): the sealed readings the devices sent, counted per device, must be as
  many as the devices say they sent, agree with :mod:`pacegate.sealed`'s own parse, and never
  show one nonce with two ciphertexts (a nonce reused under one key: for v1 the same (device,
  counter), for v2 the same (device, boot epoch, counter), since v2's key is per epoch); a
  version the dissector does not know, or a malformed reading, is a finding, never a crash.
  The PQ channel ports must carry nothing but channel frames (hellos or an alert, then AES-256-GCM
  records).

The pcapng and the key log open in Wireshark (docs/wireshark.md gives the display filters).
Capturing needs ``dumpcap`` (Debian's ``tshark`` package) and the right to capture on ``lo``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from console.endpoints import Endpoints, read_endpoints
from console.wireshark import tshark_lua_args
from console.workdir import WorkLayout
from pacegate.errors import ConfigError, InvariantError, PacegateError, RemoteProtocolError
from pacegate.layout import SECRET_FILE_MODE
from pacegate.ports import DEFAULT_CLOUD_PORT, DEFAULT_HOSPITAL_PORT, DEFAULT_MQTTS_PORT
from pacegate.sealed import VERSION_2, open_reading, parse_header
from pacegate.secretfile import read_secret
from pacegate.tlsconf import KEYLOG_ENV

log = logging.getLogger("pacegate.capture")

# (device, v2 boot epoch as hex or None for v1, counter): what one nonce under one key is.
NonceKey = tuple[str, str | None, int]

# JSON field names of the specification's reading: none may cross the wire in clear.
READING_FIELD_NAMES = (b"heart_rate_bpm", b"sensor_id", b'"age"', b'"timestamp"')
TLS_VERSION_NAMES = {
    "0x0301": "TLS 1.0",
    "0x0302": "TLS 1.1",
    "0x0303": "TLS 1.2",
    "0x0304": "TLS 1.3",
}
DUMPCAP_START_TIMEOUT_S = 10.0
# Demo runs inside a capture are short: the capture's own bound.
CAPTURE_DEMO_DEVICES = 5
CAPTURE_DEMO_DURATION_S = 6.0


# docs/channel.md's frame types (pacegate.channel.wire.FrameType), as the dissector shows them.
CHANNEL_CLIENT_HELLO, CHANNEL_SERVER_HELLO, CHANNEL_ALERT, CHANNEL_RECORD = 0x01, 0x02, 0x15, 0x17


class CaptureError(PacegateError):
    """tshark/dumpcap is missing or failed."""


@dataclass
class Ports:
    mqtt: int = DEFAULT_MQTTS_PORT
    hospital: int = DEFAULT_HOSPITAL_PORT
    cloud: int = DEFAULT_CLOUD_PORT

    @classmethod
    def of(cls, work: WorkLayout | None) -> Ports:
        ep = (read_endpoints(work) if work is not None else None) or Endpoints()
        return cls(ep.mqtt[1], ep.hospital[1], ep.cloud[1])


@dataclass
class CaptureReport:
    pcap: str
    keylog: str | None
    pcap_with_keys: str | None = None  # the capture with the key log embedded (one file)
    ports: dict[str, int] = field(default_factory=dict)
    packets: int = 0
    tls_handshakes: int = 0
    tls_versions: dict[str, int] = field(default_factory=dict)
    cipher_suites: dict[str, int] = field(default_factory=dict)
    certificate_requests: int = 0
    client_certificates: int = 0
    mqtt_publishes_decrypted: int = 0
    mqtt_payloads_sealed: int = 0
    mqtt_payloads_opened_with_psk: int = 0
    pq_channel_bytes: int = 0
    # what pacegate's Lua dissectors found (docs/wireshark.md)
    devices_sent: int | None = None  # the demo's own count, when the capture ran one
    sealed_readings_dissected: int = 0  # distinct (device, epoch, counter), device -> broker
    sealed_unknown_versions: int = 0
    sealed_malformed: int = 0  # a known version the dissector could not read (size, fields)
    sealed_counters: dict[str, dict[str, int]] = field(default_factory=dict)
    channel_handshakes: int = 0  # ClientHello frames
    channel_records: int = 0
    channel_alerts: int = (
        0  # a server refused a ClientHello (reason in pacegate.channel.alert.reason)
    )
    channel_rekeys: int = 0  # KeyUpdateDone records (inferred from the handshake's shape)
    channel_unknown_frames: int = 0
    readings_searched: int = 0
    plaintext_findings: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    ok: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def _need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/bin/{tool}" if Path(f"/usr/bin/{tool}").exists() else None)
    if path is None:
        raise CaptureError(
            f"{tool} not found: install Debian's 'tshark' package (./dev setup does it)"
        )
    return path


TSHARK_TIMEOUT_S = (
    300  # reading a demo-sized capture takes seconds; a stuck tshark must not hang us
)


def _run_tshark(pcap: Path, keylog: Path | None, ports: Ports, *args: str) -> str:
    """Run tshark on ``pcap`` with the MQTT port decoded as TLS, then MQTT (and decrypted
    with ``keylog`` when given); return its standard output."""
    argv = [
        _need("tshark"),
        "-n",
        "-r",
        str(pcap),
        "-d",
        f"tcp.port=={ports.mqtt},tls",
        "-d",
        f"tls.port=={ports.mqtt},mqtt",
        *tshark_lua_args(),
        "-o",
        f"pacegate.channel.ports:{ports.hospital},{ports.cloud}",
    ]
    if keylog is not None and keylog.exists():
        argv += ["-o", f"tls.keylog_file:{keylog}"]
    # An empty home: the user's own Wireshark profile (Decode As, older pacegate plugins)
    # must not change what the checks see.
    with tempfile.TemporaryDirectory(prefix="pacegate-tshark-") as home:
        env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=home)
        proc = subprocess.run(
            [*argv, *args],
            capture_output=True,
            text=True,
            timeout=TSHARK_TIMEOUT_S,
            check=False,
            env=env,
        )
    if proc.returncode != 0:
        raise CaptureError(f"tshark failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return proc.stdout


def _tshark(
    pcap: Path,
    keylog: Path | None,
    ports: Ports,
    display_filter: str,
    fields: list[str],
    *,
    occurrence: str = "a",
) -> list[list[str]]:
    """The values of ``fields`` for each packet matching ``display_filter``."""
    args = [
        "-Y",
        display_filter,
        "-T",
        "fields",
        "-E",
        "separator=\t",
        "-E",
        f"occurrence={occurrence}",
        "-E",
        "aggregator=,",
    ]
    for f in fields:
        args += ["-e", f]
    out = _run_tshark(pcap, keylog, ports, *args)
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def _load_psks(work: WorkLayout | None) -> dict[str, bytes]:
    if work is None or not work.pki.devices_dir.exists():
        return {}
    out = {}
    for d in work.pki.devices_dir.iterdir():
        psk = d / "device.psk"
        with contextlib.suppress(ConfigError):  # a bundle without its PSK has none to find
            out[d.name] = read_secret(psk, "device PSK", missing_fix="re-enroll the device")
    return out


def analyse(
    pcap: Path,
    keylog: Path | None,
    ports: Ports,
    work: WorkLayout | None = None,
    devices_sent: int | None = None,
) -> CaptureReport:
    """Verify a capture; see the module docstring for what is checked. ``devices_sent`` is
    how many distinct readings the devices say they sent during the capture, if known."""
    report = CaptureReport(str(pcap), str(keylog) if keylog else None, ports=vars(ports).copy())
    report.devices_sent = devices_sent
    report.packets = len(_tshark(pcap, None, ports, "frame", ["frame.number"]))

    hello = _tshark(
        pcap,
        keylog,
        ports,
        f"tcp.port=={ports.mqtt} && tls.handshake.type==2",
        [
            "tls.handshake.version",
            "tls.handshake.extensions.supported_version",
            "tls.handshake.ciphersuite",
        ],
    )
    versions: Counter[str] = Counter()
    suites: Counter[str] = Counter()
    for legacy, supported, suite in (([*row, "", "", ""])[:3] for row in hello):
        v = supported.split(",")[0] if supported else legacy
        versions[TLS_VERSION_NAMES.get(v, v)] += 1
        suites[suite] += 1
    report.tls_handshakes = sum(versions.values())
    report.tls_versions = dict(versions)
    report.cipher_suites = _suite_names(pcap, ports, suites)

    hs = _tshark(
        pcap,
        keylog,
        ports,
        f"tcp.port=={ports.mqtt} && tls.handshake",
        ["tcp.srcport", "tls.handshake.type"],
    )
    for srcport, types in (([*r, ""])[:2] for r in hs):
        kinds = types.split(",")
        if srcport == str(ports.mqtt):
            report.certificate_requests += kinds.count("13")
        else:
            report.client_certificates += kinds.count("11")

    psks = _load_psks(work)
    readings: list[bytes] = []
    decrypted_payloads: list[bytes] = []
    sent_by_devices: set[NonceKey] = set()  # device -> broker
    pubs = _tshark(
        pcap,
        keylog,
        ports,
        "mqtt.msgtype==3",
        ["mqtt.topic", "mqtt.msg", "tcp.dstport"],
        occurrence="a",
    )
    for row in pubs:
        topics = row[0].split(",") if row and row[0] else []
        msgs = row[1].split(",") if len(row) > 1 and row[1] else []
        to_broker = len(row) > 2 and row[2] == str(ports.mqtt)
        for topic, hexmsg in zip(topics, msgs, strict=False):
            report.mqtt_publishes_decrypted += 1
            payload = bytes.fromhex(hexmsg.replace(":", ""))
            decrypted_payloads.append(payload)
            try:
                header = parse_header(payload)
            except RemoteProtocolError:
                report.findings.append(f"MQTT payload on {topic} is not a sealed reading")
                continue
            report.mqtt_payloads_sealed += 1
            parts = topic.split("/")
            device = parts[1] if len(parts) == 3 else ""
            if to_broker:
                epoch = header.epoch.hex() if header.epoch is not None else None
                sent_by_devices.add((device, epoch, header.counter))
            if device in psks:
                try:
                    _, reading = open_reading(psks[device], device, payload)
                except RemoteProtocolError:
                    continue
                report.mqtt_payloads_opened_with_psk += 1
                readings.append(reading.to_bytes())

    # Every byte that crossed loopback, raw, plus the TLS-decrypted application data.
    blobs: list[bytes] = list(decrypted_payloads)  # what TLS hid, as the broker saw it
    pq_ports = {str(ports.hospital), str(ports.cloud)}
    tcp_fields = ["tcp.srcport", "tcp.dstport", "tcp.payload"]
    for row in _tshark(pcap, None, ports, "tcp.len > 0", tcp_fields, occurrence="f"):
        src, dst, hexdata = (*row, "", "", "")[:3]
        data = bytes.fromhex(hexdata.replace(":", ""))
        blobs.append(data)
        if src in pq_ports or dst in pq_ports:
            report.pq_channel_bytes += len(data)
    report.readings_searched = len(readings)
    wanted = set(readings)
    for blob in blobs:
        for name in READING_FIELD_NAMES:
            if name in blob:
                report.plaintext_findings.append(f"reading field name {name.decode()} in clear")
        for r in wanted:
            if r in blob:
                report.plaintext_findings.append(f"a reading's encoding {r.hex()} in clear")
    report.plaintext_findings = sorted(set(report.plaintext_findings))

    if report.tls_handshakes == 0:
        report.findings.append("no TLS handshake on the MQTT port was captured")
    if any(v not in ("TLS 1.2", "TLS 1.3") for v in report.tls_versions):
        report.findings.append(f"weak TLS version negotiated: {report.tls_versions}")
    if keylog is not None and report.tls_handshakes:
        if report.certificate_requests < report.tls_handshakes:
            report.findings.append("a TLS handshake completed without a CertificateRequest")
        if report.mqtt_publishes_decrypted == 0:
            report.findings.append("no MQTT PUBLISH could be decrypted with the key log")
    if report.mqtt_payloads_sealed < report.mqtt_publishes_decrypted:
        report.findings.append("some MQTT payloads were not sealed readings")
    report.findings += report.plaintext_findings
    _dissector_checks(report, pcap, keylog, ports, sent_by_devices)
    report.ok = not report.findings
    return report


def _tshark_trees(
    pcap: Path, keylog: Path | None, ports: Ports, display_filter: str, proto: str
) -> list[dict[str, Any]]:
    """Every ``proto`` tree of the packets matching ``display_filter``, one dict of its fields
    each. Read as JSON, not as ``-T fields`` columns: a frame may carry several PUBLISH, and
    an unknown version has no counter, so flat columns cannot tell which field is whose."""
    out = _run_tshark(
        pcap, keylog, ports, "-Y", display_filter, "-T", "json", "--no-duplicate-keys",
        "-j", proto,
    )  # fmt: skip
    try:
        packets = json.loads(out) if out.strip() else []
    except ValueError as exc:
        raise CaptureError(f"tshark's JSON output could not be read: {exc}") from None
    trees: list[dict[str, Any]] = []
    for packet in packets if isinstance(packets, list) else []:
        layers = packet.get("_source", {}).get("layers", {}) if isinstance(packet, dict) else {}
        found = layers.get(proto) if isinstance(layers, dict) else None
        # one tree is an object, several (merged duplicate keys) a list of them
        for tree in found if isinstance(found, list) else [found]:
            if isinstance(tree, dict):
                trees.append(tree)
    return trees


SEALED_FIELD_PREFIX = "pacegate.sealed."


def _hex(value: Any) -> str | None:
    return value.replace(":", "").lower() if isinstance(value, str) else None


def check_dissected_readings(
    report: CaptureReport, trees: list[dict[str, Any]], parsed: set[NonceKey]
) -> None:
    """Compare the sealed-reading dissector's trees (device -> broker) with what
    :mod:`pacegate.sealed` parsed; record counts and findings in ``report``. Whatever the
    dissector shows (an unknown version, a malformed or truncated reading, a field missing or
    not a number) is counted and reported, never raised."""
    seen: dict[NonceKey, str] = {}  # nonce -> ciphertext and tag, hex
    reused: set[NonceKey] = set()
    unknown: Counter[str] = Counter()
    for raw in trees:
        # the dissector's field names without their "pacegate.sealed." prefix
        tree = {k.removeprefix(SEALED_FIELD_PREFIX): v for k, v in raw.items()}
        get = tree.get
        version = get("version")
        if not isinstance(version, str):
            report.sealed_malformed += 1  # empty or oversized: the dissector read no version
            continue
        if get("version_known") not in ("1", "True"):
            report.sealed_unknown_versions += 1
            unknown[str(version)] += 1
            continue
        device, counter, ct, tag = (
            get("device"),
            get("counter"),
            _hex(get("ciphertext")),
            _hex(get("tag")),
        )
        epoch = _hex(get("epoch"))
        if (
            not isinstance(device, str)
            or not isinstance(counter, str)
            or not (counter.isascii() and counter.isdigit())
            or ct is None
            or tag is None
            or (version == str(VERSION_2)) != (epoch is not None)
        ):
            report.sealed_malformed += 1  # wrong size for its version: no fields to pair
            continue
        key: NonceKey = (device, epoch, int(counter))
        if seen.setdefault(key, ct + tag) != ct + tag:
            reused.add(key)
    report.sealed_readings_dissected = len(seen)
    by_device: dict[str, list[NonceKey]] = {}
    for k in seen:
        by_device.setdefault(k[0], []).append(k)
    report.sealed_counters = {
        d: {
            "first": min(c for _, _, c in keys),
            "last": max(c for _, _, c in keys),
            "count": len(keys),
            "epochs": len({e for _, e, _ in keys}),
        }
        for d, keys in sorted(by_device.items())
    }
    for dev, epoch, ctr in sorted(reused, key=lambda k: (k[0], k[1] or "", k[2])):
        where = f"epoch {epoch} counter {ctr}" if epoch is not None else f"counter {ctr}"
        report.findings.append(f"{dev}: {where} carried two different ciphertexts (nonce reuse)")
    if report.sealed_unknown_versions:
        versions = ", ".join(f"v{v}: {n}" for v, n in sorted(unknown.items()))
        report.findings.append(
            f"{report.sealed_unknown_versions} sealed readings of a version the dissector "
            f"does not know ({versions}; console/wireshark/pacegate_sealed.lua needs it)"
        )
    if report.sealed_malformed:
        report.findings.append(
            f"{report.sealed_malformed} sealed readings the dissector shows as malformed "
            "(a size or field wrong for their version: the gateway refuses them)"
        )
    if set(seen) != parsed:
        report.findings.append(
            f"the sealed-reading dissector and pacegate.sealed disagree on "
            f"{len(set(seen) ^ parsed)} (device, epoch, counter) nonces"
        )
    if report.devices_sent is not None and report.devices_sent != len(seen):
        report.findings.append(
            f"the devices sent {report.devices_sent} readings, the capture shows {len(seen)}"
        )


def _dissector_checks(
    report: CaptureReport,
    pcap: Path,
    keylog: Path | None,
    ports: Ports,
    parsed: set[NonceKey],
) -> None:
    """Read the capture with pacegate's Lua dissectors (see the module docstring)."""
    trees = _tshark_trees(
        pcap, keylog, ports, f"pacegate.sealed && tcp.dstport=={ports.mqtt}", "pacegate.sealed"
    )
    check_dissected_readings(report, trees, parsed)

    pq = f"tcp.port=={ports.hospital} || tcp.port=={ports.cloud}"
    for row in _tshark(pcap, None, ports, f"pacegate.channel && ({pq})", ["pacegate.channel.type"]):
        for t in row[0].split(",") if row and row[0] else []:
            code = int(t, 16) if t.startswith("0x") else int(t)
            if code == CHANNEL_CLIENT_HELLO:
                report.channel_handshakes += 1
            elif code == CHANNEL_RECORD:
                report.channel_records += 1
            elif code == CHANNEL_ALERT:
                report.channel_alerts += 1
            elif code != CHANNEL_SERVER_HELLO:
                report.channel_unknown_frames += 1
    done = _tshark(
        pcap,
        None,
        ports,
        'pacegate.channel.record.content == "KeyUpdateDone"',
        ["frame.number"],
    )
    report.channel_rekeys = len(done)
    oversized = _tshark(
        pcap, None, ports, f"({pq}) && pacegate.channel.too_large", ["frame.number"]
    )
    if report.channel_unknown_frames or oversized:
        report.findings.append(
            f"the PQ channel ports carried {report.channel_unknown_frames + len(oversized)} "
            "frames that are not pacegate channel frames (garbage, or a frame type newer than "
            "console/wireshark/pacegate_channel.lua knows)"
        )
    if report.pq_channel_bytes and not report.channel_handshakes:
        report.findings.append("traffic on the PQ channel ports, but no channel handshake")


def _suite_names(pcap: Path, ports: Ports, suites: Counter[str]) -> dict[str, int]:
    """Cipher suite names as Wireshark prints them (e.g. TLS_AES_256_GCM_SHA384)."""
    if not suites:
        return {}
    names: dict[str, str] = {}
    for line in _run_tshark(pcap, None, ports, "-Y", "tls.handshake.type==2", "-V").splitlines():
        line = line.strip()
        if line.startswith("Cipher Suite:") and "(" in line:
            name, code = line[len("Cipher Suite:") :].rsplit("(", 1)
            names[code.rstrip(")").strip().lower()] = name.strip()
    return {names.get(code.lower(), code): n for code, n in suites.items()}


def _inject_secrets(pcap: Path, keylog: Path) -> str | None:
    """Write ``<name>-with-keys.pcapng``: the capture with its TLS secrets embedded (a pcapng
    Decryption Secrets Block), so Wireshark decrypts it with no preference to set."""
    editcap = shutil.which("editcap")
    if editcap is None:
        return None
    target = pcap.with_name(pcap.stem + "-with-keys.pcapng")
    proc = subprocess.run(
        [editcap, "--inject-secrets", f"tls,{keylog}", str(pcap), str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        log.warning("editcap could not embed the key log: %s", proc.stderr.strip()[:300])
        return None
    return str(target)


def _start_dumpcap(out: Path, duration: float | None) -> subprocess.Popen[bytes]:
    argv = [_need("dumpcap"), "-q", "-i", "lo", "-f", "tcp", "-w", str(out)]
    if duration is not None:
        argv += ["-a", f"duration:{max(1, int(duration))}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + DUMPCAP_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise CaptureError(
                f"dumpcap could not capture on lo: {err.strip()[:500]} "
                "(capturing needs root or the wireshark group)"
            )
        if out.exists() and out.stat().st_size > 0:
            return proc
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    work = WorkLayout(args.workdir.resolve()) if args.workdir else None
    keylog: Path | None = args.keylog
    if keylog is None:
        env = os.environ.get(KEYLOG_ENV)
        keylog = Path(env) if env else (out.with_suffix(".keys.log") if work else None)
    devices_sent: int | None = None
    if work is not None:
        if keylog is None:
            raise InvariantError("keylog unset here")
        keylog = keylog.resolve()
        with contextlib.suppress(FileNotFoundError):
            keylog.unlink()
        dumpcap = _start_dumpcap(out, None)
        try:
            demo_env = dict(os.environ, **{KEYLOG_ENV: str(keylog)})
            from console.stack import pacegate_argv

            # pacegate_argv: -P, so a pacegate/ folder in the current directory cannot
            # shadow the installed package (it did: "cannot import name '__version__'")
            argv = pacegate_argv(
                "demo",
                "--workdir",
                str(work.root),
                "--devices",
                str(CAPTURE_DEMO_DEVICES),
                "--duration",
                str(min(args.duration, CAPTURE_DEMO_DURATION_S)),
                "--json",
            )
            demo = subprocess.run(argv, env=demo_env, capture_output=True, timeout=600, check=False)
            if demo.returncode != 0:
                print(demo.stderr.decode(errors="replace")[-3000:], file=sys.stderr)
                raise CaptureError(f"the demo run inside the capture failed ({demo.returncode})")
            with contextlib.suppress(ValueError, AttributeError):
                devices_sent = int(json.loads(demo.stdout).get("sent"))
        finally:
            _stop(dumpcap)
    else:
        print(f"capturing loopback TCP for {args.duration:g} s into {out}", file=sys.stderr)
        dumpcap = _start_dumpcap(out, args.duration)
        try:
            dumpcap.wait(timeout=args.duration + 30)
        finally:
            _stop(dumpcap)
    report = analyse(out, keylog, Ports.of(work), work, devices_sent)
    if keylog is not None and keylog.exists():
        report.pcap_with_keys = _inject_secrets(out, keylog)
    # A capture with its key log decrypts the session: owner-only, like any secret.
    for path in (out, keylog, report.pcap_with_keys):
        if path is not None and Path(path).exists():
            Path(path).chmod(SECRET_FILE_MODE)
    if args.json:
        print(json.dumps(report.to_json()))
    _print_human(report)
    return 0 if report.ok else 1


def _print_human(r: CaptureReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    t = Table(title=f"pacegate capture: {r.pcap}")
    t.add_column("check")
    t.add_column("result")
    t.add_row("packets captured", str(r.packets))
    t.add_row("TLS handshakes (MQTT port)", str(r.tls_handshakes))
    t.add_row("TLS versions", ", ".join(f"{k}: {v}" for k, v in r.tls_versions.items()))
    t.add_row("cipher suites", ", ".join(f"{k}: {v}" for k, v in r.cipher_suites.items()))
    t.add_row("CertificateRequest (broker -> client)", str(r.certificate_requests))
    t.add_row("client Certificate messages", str(r.client_certificates))
    t.add_row("MQTT PUBLISH decrypted with key log", str(r.mqtt_publishes_decrypted))
    t.add_row("... of which sealed readings", str(r.mqtt_payloads_sealed))
    t.add_row("... opened with the device PSK", str(r.mqtt_payloads_opened_with_psk))
    t.add_row("PQ channel bytes (hospital, cloud)", str(r.pq_channel_bytes))
    t.add_row("sealed readings (dissector, device -> broker)", str(r.sealed_readings_dissected))
    if r.devices_sent is not None:
        t.add_row("... readings the devices say they sent", str(r.devices_sent))
    t.add_row(
        "sealed readings of an unknown version / malformed (dissector)",
        f"{r.sealed_unknown_versions} / {r.sealed_malformed}",
    )
    t.add_row(
        "PQ channel handshakes / alerts / records / rekeys (dissector)",
        f"{r.channel_handshakes} / {r.channel_alerts} / {r.channel_records} / {r.channel_rekeys}",
    )
    t.add_row("readings searched for in clear", str(r.readings_searched))
    t.add_row("readings found in clear", str(len(r.plaintext_findings)))
    console.print(t)
    for f in r.findings:
        console.print(f"[red]finding:[/red] {f}")
    console.print(
        "[green]OK[/green]: TLS required client certificates and every MQTT payload is still sealed"
        if r.ok
        else "[red]FAILED[/red]"
    )
    if r.pcap_with_keys:
        console.print(f"open in Wireshark (decrypts on its own): wireshark {r.pcap_with_keys}")
    if r.keylog:
        console.print(f"or: wireshark -o tls.keylog_file:{r.keylog} {r.pcap}")
    console.print(
        f"display filters: mqtt.msgtype == 3 (PUBLISH); tls.handshake.type == 13 "
        f"(CertificateRequest); tcp.port == {r.ports.get('mqtt')}; with pacegate's dissectors "
        "(pacegate wireshark install): pacegate.sealed.counter > 100, "
        "pacegate.channel.type == 0x01 (see docs/wireshark.md)"
    )
