"""pacegate's Wireshark dissectors, run by the real tshark on real and hand-built captures.

- The Lua files' constants are the wire formats' own (a format change must reach them).
- ``pacegate wireshark install`` puts them where tshark really loads them.
- On a capture of a real demo, the sealed readings the dissector finds are the devices' own:
  every device's counters 1..n, as many as the devices say they sent, byte for byte the
  MQTT payloads; the PQ channel's hellos are dissected with their sizes.
- On a capture of a real channel session with a short rekey period, every rekey is seen.
- Unknown versions and frame types are shown as such, not guessed; ``pacegate capture``
  reports them, malformed readings and nonce reuse per (device, epoch, counter) as findings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from console.wireshark import LUA_FILES, lua_paths, tshark_lua_args
from console.workdir import WorkLayout
from pacegate import layout, sealed
from pacegate.channel import ChannelIdentity, connect, kem, serve, session, wire
from pacegate.channel import keyschedule as ks
from pacegate.channel.admission import HELLO_MAX_SKEW_SECONDS
from pacegate.channel.identity import MAX_NAME_SIZE
from pacegate.channel.wire import ClientHello
from pacegate.identity import TELEMETRY_FILTER
from pacegate.reading import READING_SIZE

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 420
TSHARK_TIMEOUT = 120

needs_tshark = pytest.mark.skipif(
    shutil.which("tshark") is None, reason="needs Debian's tshark; ./dev setup installs it"
)
needs_capture = pytest.mark.skipif(
    shutil.which("dumpcap") is None or os.geteuid() != 0,
    reason="capturing on lo needs dumpcap (Debian tshark) and root; ./dev setup installs it",
)


def tshark(
    pcap: Path, *args: str, home: Path, lua: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run tshark with an empty home (no personal profile or plugins) on ``pcap``."""
    argv = ["tshark", "-n", "-r", str(pcap), *(tshark_lua_args() if lua else []), *args]
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home))
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=TSHARK_TIMEOUT, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Lua Error" not in proc.stdout + proc.stderr
    return proc


def fields(
    pcap: Path, flt: str, names: list[str], *, home: Path, extra: Sequence[str] = ()
) -> list[list[str]]:
    args = [*extra, "-Y", flt, "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a"]
    args += ["-E", "aggregator=;"]
    for n in names:
        args += ["-e", n]
    out = tshark(pcap, *args, home=home).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


# -- the constants are the formats' own -----------------------------------------------------
def lua_constants(name: str) -> dict[str, int | str]:
    """``local NAME = <int expression or string>`` lines of a shipped Lua file."""
    text = (lua_paths()[LUA_FILES.index(name)]).read_text()
    out: dict[str, int | str] = {}
    for m in re.finditer(r"^local ([A-Z0-9_]+) = (.+?)(?:\s+--.*)?$", text, re.M):
        key, expr = m.group(1), m.group(2).strip()
        if expr.startswith('"'):
            out[key] = expr.strip('"')
            continue
        expr = re.sub(r"\b([A-Z][A-Z0-9_]+)\b", lambda v: str(out[v.group(1)]), expr)
        if re.fullmatch(r"[0-9x+\-* ()a-f]+", expr):
            out[key] = int(eval(expr))  # noqa: S307 - arithmetic on integer literals only
    return out


def test_sealed_dissector_constants_are_the_sealed_reading_formats() -> None:
    c = lua_constants("pacegate_sealed.lua")
    assert c["VERSION_1"] == sealed.VERSION_1
    assert c["VERSION_2"] == sealed.VERSION_2
    assert c["HEADER_SIZE"] == sealed.HEADER_SIZE
    assert c["EPOCH_SIZE"] == sealed.EPOCH_SIZE
    assert c["HEADER_SIZE_V2"] == sealed.HEADER_SIZE_V2
    assert c["SEALED_SIZE_V2"] == sealed.SEALED_SIZE_V2
    assert c["READING_SIZE"] == READING_SIZE
    assert c["TAG_SIZE"] == sealed.TAG_SIZE
    assert c["SEALED_SIZE_V1"] == sealed.SEALED_SIZE_V1
    assert c["MAX_SEALED_SIZE"] == sealed.MAX_SEALED_SIZE
    assert c["DEFAULT_TOPIC"] == TELEMETRY_FILTER
    text = lua_paths()[0].read_text()
    known = re.search(r"^local KNOWN_VERSIONS = \{(.*)\}", text, re.M)
    assert known is not None
    names = re.findall(r"\[([A-Z0-9_]+)\] = true", known.group(1))
    # A new sealed version in pacegate.sealed must be taught to the dissector too.
    assert {c[n] for n in names} == set(sealed.SUPPORTED_VERSIONS)


def test_channel_dissector_constants_are_the_channel_wire_formats() -> None:
    c = lua_constants("pacegate_channel.lua")
    assert c["FRAME_HEADER_SIZE"] == wire.FRAME_HEADER_SIZE
    assert c["FRAME_CLIENT_HELLO"] == wire.FrameType.CLIENT_HELLO
    assert c["FRAME_SERVER_HELLO"] == wire.FrameType.SERVER_HELLO
    assert c["FRAME_RECORD"] == wire.FrameType.RECORD
    assert c["FRAME_ALERT"] == wire.FrameType.ALERT
    frames = ("FRAME_CLIENT_HELLO", "FRAME_SERVER_HELLO", "FRAME_ALERT", "FRAME_RECORD")
    assert {c[n] for n in frames} == {int(t) for t in wire.FrameType}
    assert c["VERSION_1"] == session.VERSION_1
    assert c["VERSION_2"] == session.VERSION_2 == session.PROTOCOL_VERSION
    text = lua_paths()[LUA_FILES.index("pacegate_channel.lua")].read_text()
    known = re.search(r"^local KNOWN_VERSIONS = \{(.*)\}", text, re.M)
    assert known is not None
    names = re.findall(r"\[([A-Z0-9_]+)\] = true", known.group(1))
    # a version the channel speaks must be one the dissector can lay out
    assert set(session.SUPPORTED_VERSIONS) <= {c[n] for n in names}
    reasons = re.search(r"^local alert_reasons = \{\n(.*?)^\}", text, re.M | re.S)
    assert reasons is not None
    assert {int(n) for n in re.findall(r"\[(\d+)\] =", reasons.group(1))} == {
        int(r) for r in wire.AlertReason
    }
    assert c["MAX_HELLO_BODY"] == session.MAX_HELLO_BODY
    assert c["MAX_ALERT_BODY"] == session.MAX_ALERT_BODY
    assert c["MAX_NAME_SIZE"] == MAX_NAME_SIZE
    hello = ClientHello(
        (session.VERSION_2,), (session.SUITE_HYBRID_V1,), bytes(32), 0, "a", "b", b"", b""
    )
    me = ChannelIdentity.generate("a")
    signature = ks.sign_transcript(me.private_key, ks.HELLO_SIGNATURE_CONTEXT, hello.signed_part())
    assert c["MLDSA65_SIGNATURE_SIZE"] == len(signature)
    assert c["TIME_MS_SIZE"] == len(struct.pack(">Q", 0))
    assert c["KEY_UPDATE_REQUEST_RECORD"] == 1 + ks.TAG_SIZE
    assert c["MAX_FRAME_BODY"] == wire.MAX_FRAME_BODY
    assert c["TAG_SIZE"] == ks.TAG_SIZE
    assert c["RANDOM_SIZE"] == wire.RANDOM_SIZE
    assert c["MLKEM768_PUBLIC_KEY_SIZE"] == kem.MLKEM768_PUBLIC_KEY_SIZE
    assert c["MLKEM768_CIPHERTEXT_SIZE"] == kem.MLKEM768_CIPHERTEXT_SIZE
    assert c["DEFAULT_PORTS"] == f"{layout.DEFAULT_HOSPITAL_PORT}-{layout.DEFAULT_CLOUD_PORT}"


# -- install ------------------------------------------------------------------------------
@pytest.mark.integration
@needs_tshark
def test_wireshark_install_puts_the_dissectors_where_tshark_loads_them(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    folders = subprocess.run(
        ["tshark", "-G", "folders"], capture_output=True, text=True, env=env, timeout=60
    ).stdout
    personal = Path(re.search(r"^Personal Lua Plugins:\s*(.+)$", folders, re.M).group(1))  # type: ignore[union-attr]
    before = subprocess.run(
        ["tshark", "-G", "protocols"], capture_output=True, text=True, env=env, timeout=60
    ).stdout
    assert "pacegate.sealed" not in before

    proc = subprocess.run(
        [sys.executable, "-m", "console", "wireshark", "install", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert Path(report["dir"]) == personal
    for name in LUA_FILES:
        installed = personal / name
        assert installed.read_bytes() == lua_paths()[LUA_FILES.index(name)].read_bytes()
        assert installed.stat().st_mode & 0o777 == 0o644
    after = subprocess.run(
        ["tshark", "-G", "protocols"], capture_output=True, text=True, env=env, timeout=60
    ).stdout
    assert re.search(r"^pacegate sealed reading\t.*\tpacegate\.sealed$", after, re.M)
    assert re.search(r"^pacegate post-quantum channel\t.*\tpacegate\.channel$", after, re.M)

    # --dir overrides the folder; installed and -X copies together do not clash.
    other = tmp_path / "elsewhere"
    proc = subprocess.run(
        [sys.executable, "-m", "console", "wireshark", "install", "--dir", str(other)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == str(other)
    assert sorted(p.name for p in other.iterdir()) == sorted(LUA_FILES)
    # a folder that cannot be made: one line naming it and the fix, no traceback
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "console", "wireshark", "install", "--dir", str(blocker / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"cannot create {blocker / 'x'}" in proc.stderr
    assert "--dir" in proc.stderr

    pcap = tmp_path / "one.pcap"
    pcap.write_bytes(_pcap([(41000, 8884, bytes([0x17]) + struct.pack(">I", 16) + bytes(16))]))
    both = subprocess.run(
        ["tshark", "-n", "-r", str(pcap), *tshark_lua_args()],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert both.returncode == 0, both.stderr
    assert "Lua" not in both.stderr
    assert "pacegate-channel" in both.stdout


# -- a real demo ----------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.tshark
@needs_capture
def test_dissector_reads_a_real_demos_sealed_readings_with_the_devices_own_counters(
    tmp_path: Path,
) -> None:
    work = WorkLayout(tmp_path / "work")
    out = tmp_path / "demo.pcapng"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "console",
            "capture",
            "--workdir",
            str(work.root),
            "--out",
            str(out),
            "--duration",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    ep = json.loads((work.root / "endpoints.json").read_text())
    mqtt, hospital, cloud = ep["mqtt"]["port"], ep["hospital"]["port"], ep["cloud"]["port"]
    opts = [
        "-o", f"tls.keylog_file:{report['keylog']}",
        "-d", f"tcp.port=={mqtt},tls",
        "-d", f"tls.port=={mqtt},mqtt",
        "-o", f"pacegate.channel.ports:{hospital},{cloud}",
    ]  # fmt: skip
    home = tmp_path / "home"

    rows = fields(
        out,
        f"pacegate.sealed && tcp.dstport == {mqtt}",
        [
            "mqtt.topic",
            "mqtt.msg",
            "pacegate.sealed.device",
            "pacegate.sealed.version",
            "pacegate.sealed.epoch",
            "pacegate.sealed.counter",
            "pacegate.sealed.ciphertext",
            "pacegate.sealed.tag",
        ],
        home=home,
        extra=opts,
    )
    counters: dict[str, set[int]] = {}
    epochs: dict[str, set[str]] = {}
    for row in rows:
        topics, msgs, devices, versions, eps, ctrs, cts, tags = (c.split(";") for c in row)
        assert len(msgs) == len(devices) == len(eps) == len(ctrs)
        for topic, msg, dev, ver, ep_hex, ctr, ct, tag in zip(
            topics, msgs, devices, versions, eps, ctrs, cts, tags, strict=True
        ):
            payload = bytes.fromhex(msg)
            # the dissector's fields are the payload's bytes, as pacegate.sealed reads them
            header = sealed.parse_header(payload)
            assert topic == f"pacemakers/{dev}/telemetry"
            # devices send v2: the boot epoch, then the counter, then ciphertext and tag
            assert int(ver) == header.version == sealed.VERSION_2
            assert header.epoch is not None
            assert bytes.fromhex(ep_hex) == header.epoch
            assert int(ctr) == header.counter
            assert bytes.fromhex(ct) + bytes.fromhex(tag) == payload[sealed.HEADER_SIZE_V2 :]
            assert len(bytes.fromhex(tag)) == sealed.TAG_SIZE
            counters.setdefault(dev, set()).add(int(ctr))
            epochs.setdefault(dev, set()).add(ep_hex)

    enrolled = sorted(p.name for p in work.pki.devices_dir.iterdir())
    assert sorted(counters) == enrolled
    # A fresh device starts at counter 1 and never skips within a run: each device's
    # counters are exactly 1..n, and together as many as the devices say they sent.
    for dev, seen in counters.items():
        assert seen == set(range(1, len(seen) + 1)), dev
    assert sum(len(s) for s in counters.values()) == report["devices_sent"] > 0
    assert report["sealed_readings_dissected"] == report["devices_sent"]
    assert {d: v["count"] for d, v in report["sealed_counters"].items()} == {
        d: len(s) for d, s in counters.items()
    }
    # each device booted once in the demo: one epoch each, and no two devices share one
    assert all(len(e) == 1 for e in epochs.values())
    assert len({e for es in epochs.values() for e in es}) == len(epochs)
    assert all(v["epochs"] == 1 for v in report["sealed_counters"].values())
    # filterable: one epoch selects exactly that device's readings
    dev, (one,) = next(iter(epochs.items()))
    by_epoch = fields(
        out, f"pacegate.sealed.epoch == {one} && tcp.dstport == {mqtt}",
        ["pacegate.sealed.epoch", "pacegate.sealed.device"], home=home, extra=opts,
    )  # fmt: skip
    picked = [
        (e, d)
        for eps_, devs in by_epoch
        for e, d in zip(eps_.split(";"), devs.split(";"), strict=True)
    ]
    assert {d for _e, d in picked} == {dev}  # each device has its own TLS connection
    assert sum(1 for e, _d in picked if e == one) == len(counters[dev])

    # filterable: counter comparisons select exactly the readings above the bound
    high = fields(
        out, f"pacegate.sealed.counter > 3 && tcp.dstport == {mqtt}",
        ["pacegate.sealed.counter"], home=home, extra=opts,
    )  # fmt: skip
    got = sorted(int(c) for row in high for c in row[0].split(";") if int(c) > 3)
    assert got == sorted(c for s in counters.values() for c in s if c > 3)

    # the PQ channel: each session's hellos with their sizes, then ClientAuth / ServerAuth
    hellos = fields(
        out,
        "pacegate.channel.type == 0x01",
        [
            "tcp.dstport",
            "pacegate.channel.frame_size",
            "pacegate.channel.hello.x25519_length",
            "pacegate.channel.hello.kem_length",
            "pacegate.channel.hello.offered_version",
            "pacegate.channel.hello.client",
            "pacegate.channel.hello.server",
            "pacegate.channel.hello.time_ms",
            "frame.time_epoch",
            "pacegate.channel.hello.signature_length",
        ],
        home=home,
        extra=opts,
    )
    assert {int(r[0]) for r in hellos} == {hospital, cloud}
    # each hop's hello names its own two ends (the server name is what stops a relay)
    ends = {hospital: ("gateway", "hospital"), cloud: ("hospital", "cloud")}
    for port, size, x_len, k_len, offered, client, server, time_ms, at, sig_len in hellos:
        assert (client, server) == ends[int(port)]
        assert int(x_len) == 32
        assert int(k_len) == kem.MLKEM768_PUBLIC_KEY_SIZE
        assert int(sig_len) == 3309
        names = 1 + len(client) + 1 + len(server)
        signed = 1 + 2 + 1 + 2 + 32 + 8 + names + 2 + 32 + 2 + 1184
        assert int(size) == wire.FRAME_HEADER_SIZE + signed + 2 + 3309
        assert int(offered, 16) == session.PROTOCOL_VERSION
        # the client's clock, as the dissector reads it, is the capture's (same machine)
        assert abs(int(time_ms) / 1000 - float(at)) < HELLO_MAX_SKEW_SECONDS
    replies = fields(
        out, "pacegate.channel.type == 0x02",
        ["pacegate.channel.hello.kem_length", "pacegate.channel.hello.suite"],
        home=home, extra=opts,
    )  # fmt: skip
    assert len(replies) == len(hellos)
    assert all(int(k) == kem.MLKEM768_CIPHERTEXT_SIZE for k, _suite in replies)
    auths = fields(
        out, 'pacegate.channel.record.content == "ClientAuth"', ["tcp.stream"],
        home=home, extra=opts,
    )  # fmt: skip
    assert len(auths) == len(hellos)
    assert report["channel_handshakes"] == len(hellos)
    assert report["channel_records"] > 0
    assert report["channel_unknown_frames"] == 0
    assert report["channel_alerts"] == 0  # no hello of the demo's own services was refused


# -- a real channel session with rekeys -----------------------------------------------------


def _start_dumpcap(port: int, pcap: Path, errors: Path) -> subprocess.Popen[bytes]:
    """dumpcap on loopback for ``port``, writing ``pcap`` (its complaints to ``errors``)."""
    with errors.open("wb") as err:
        return subprocess.Popen(
            ["dumpcap", "-q", "-i", "lo", "-f", f"tcp port {port}", "-w", str(pcap)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _has_header(pcap: Path) -> bool:
    return pcap.exists() and pcap.stat().st_size > 0


async def _session_with_rekeys(
    pcap: Path, messages: int, *, server_asks: bool = False
) -> tuple[int, int]:
    """One real session of ``messages`` echoes, rekeyed every 4 records: by the client, or
    (``server_asks``) by a client that would never rekey on its own, at the server's request."""
    server_records, client_records = (4, 10**6) if server_asks else (65536, 4)
    hospital = ChannelIdentity.generate("hospital")
    gateway = ChannelIdentity.generate("gateway")

    async def echo(stream: object) -> None:
        async for msg in stream:  # type: ignore[attr-defined]
            await stream.send(b"ack:" + msg[:4])  # type: ignore[attr-defined]

    server = await serve(
        "127.0.0.1",
        0,
        identity=hospital,
        allowed_clients={"gateway": gateway.public_key},
        on_session=echo,
        rekey_after_records=server_records,
    )
    port = server.sockets[0].getsockname()[1]
    errors = pcap.with_suffix(".dumpcap.log")
    dumpcap = await asyncio.to_thread(_start_dumpcap, port, pcap, errors)
    try:
        for _ in range(200):  # dumpcap writes the file header once it captures
            if await asyncio.to_thread(_has_header, pcap):
                break
            assert dumpcap.poll() is None, errors.read_text()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stream = await connect(
            "127.0.0.1",
            port,
            identity=gateway,
            server_name="hospital",
            server_key=hospital.public_key,
            rekey_after_records=client_records,
        )
        for i in range(messages):
            await stream.send(b"reading batch %d" % i)
            await stream.recv()
        rekeys = stream.stats.rekeys
        await stream.close()
        await asyncio.sleep(0.5)
    finally:
        dumpcap.send_signal(signal.SIGINT)
        dumpcap.wait(timeout=30)
        server.close()
        await server.wait_closed()
    return port, rekeys


@pytest.mark.integration
@pytest.mark.tshark
@needs_capture
def test_dissector_shows_every_rekey_of_a_real_channel_session(tmp_path: Path) -> None:
    pcap = tmp_path / "rekey.pcapng"
    port, rekeys = asyncio.run(_session_with_rekeys(pcap, 20))
    assert rekeys >= 3
    home = tmp_path / "home"
    opts = ["-o", f"pacegate.channel.ports:{port}"]
    rows = fields(
        pcap,
        "pacegate.channel.type == 0x17",
        [
            "pacegate.channel.direction",
            "pacegate.channel.record.content",
            "pacegate.channel.record.epoch",
            "pacegate.channel.record.seq",
        ],
        home=home,
        extra=opts,
    )
    assert [r[1] for r in rows[:2]] == ["ClientAuth", "ServerAuth"]
    # one packet may carry several records: their fields are joined by ";" (every record
    # after the two handshake ones has an epoch, so the columns line up)
    frames = [f for r in rows[2:] for f in zip(*(c.split(";") for c in r), strict=True)]
    kinds = [k for _d, k, _e, _s in frames]
    assert kinds.count("KeyUpdateDone") == rekeys
    assert kinds.count("KeyUpdate") >= rekeys
    # after each rekey the client's records start again at sequence 0 of the next epoch
    client = [(int(e), int(s)) for d, k, e, s in frames if d.startswith("client") and e]
    epochs = [e for e, _ in client]
    assert epochs == sorted(epochs)
    assert max(epochs) == rekeys
    for epoch in range(1, rekeys + 1):
        assert min(s for e, s in client if e == epoch) == 0
    done = fields(pcap, "pacegate.channel.rekey", ["pacegate.channel.rekey"], home=home, extra=opts)
    assert len(done) >= 2 * rekeys  # the server's and the client's switch to the new keys


@pytest.mark.integration
@pytest.mark.tshark
@needs_capture
def test_dissector_shows_the_servers_key_update_requests_of_a_real_session(
    tmp_path: Path,
) -> None:
    pcap = tmp_path / "asked.pcapng"
    port, rekeys = asyncio.run(_session_with_rekeys(pcap, 20, server_asks=True))
    assert rekeys >= 3
    home = tmp_path / "home"
    opts = ["-o", f"pacegate.channel.ports:{port}"]
    rows = fields(
        pcap,
        "pacegate.channel.type == 0x17",
        ["pacegate.channel.direction", "pacegate.channel.record.content"],
        home=home,
        extra=opts,
    )
    # one packet may carry several frames: their fields are joined by ";"
    frames = [f for d, k in rows for f in zip(d.split(";"), k.split(";"), strict=True)]
    asked = [d for d, k in frames if k == "KeyUpdateRequest"]
    assert asked
    assert all(d.startswith("server") for d in asked)
    # every rekey was asked for (this client never starts one); one more request may be
    # left unanswered when the client closes
    assert rekeys <= len(asked) <= rekeys + 1
    kinds = [k for _d, k in frames]
    assert kinds.count("KeyUpdateDone") == rekeys
    for i, k in enumerate(kinds):
        if k == "KeyUpdate":  # each KeyUpdate follows the server's request
            assert "KeyUpdateRequest" in kinds[:i]


# -- hand-built packets: unknown versions and frame types --------------------------------
def _pcap(segments: list[tuple[int, int, bytes]]) -> bytes:
    """A libpcap file (LINKTYPE_RAW, IPv4) of TCP segments (src port, dst port, payload),
    each direction's sequence numbers contiguous so that tshark reassembles."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)]
    seqs: dict[tuple[int, int], int] = {}
    for i, (sport, dport, payload) in enumerate(segments):
        seq = seqs.get((sport, dport), 1000)
        seqs[(sport, dport)] = seq + len(payload)
        tcp = struct.pack(">HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
        ip = struct.pack(
            ">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), i, 0, 64, 6, 0,
            bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]),
        )  # fmt: skip
        pkt = ip + tcp + payload
        out.append(struct.pack("<IIII", 1700000000 + i, 0, len(pkt), len(pkt)) + pkt)
    return b"".join(out)


def _mqtt_string(s: bytes) -> bytes:
    return struct.pack(">H", len(s)) + s


def _mqtt(ptype: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([ptype, len(body)]) + body


def _publish(topic: str, payload: bytes) -> bytes:
    return _mqtt(0x30, _mqtt_string(topic.encode()) + payload)


EPOCH_A = bytes.fromhex("0001020304050607")
EPOCH_B = bytes.fromhex("f0e0d0c0b0a09080")


def _v1(counter: int, body: bytes = bytes(range(31))) -> bytes:
    return bytes([1]) + counter.to_bytes(8, "big") + body


def _v2(epoch: bytes, counter: int, body: bytes = bytes(range(31))) -> bytes:
    return bytes([2]) + epoch + counter.to_bytes(8, "big") + body


@pytest.mark.integration
@needs_tshark
def test_dissector_shows_unknown_versions_and_malformed_readings_as_such(tmp_path: Path) -> None:
    v1 = _v1(7)
    v2 = _v2(EPOCH_A, 9)
    v3 = bytes([3]) + bytes(45)  # a version this dissector does not know
    short_v1 = v1[:30]
    short_v2 = v2[:40]  # a v1's size, but a v2's version byte: not guessed to be v1
    connect_pkt = _mqtt(0x10, _mqtt_string(b"MQTT") + b"\x04\x02\x00\x3c" + _mqtt_string(b"pm-1"))
    pcap = tmp_path / "crafted.pcap"
    pcap.write_bytes(
        _pcap(
            [
                (40000, 1883, connect_pkt),
                # three PUBLISH in one segment: each paired with its own topic
                (40000, 1883, _publish("pacemakers/pm-0001/telemetry", v1)
                 + _publish("pacemakers/pm-0002/telemetry", v3)
                 + _publish("pacemakers/pm-0005/telemetry", v2)),
                (40000, 1883, _publish("pacemakers/pm-0003/telemetry", short_v1)),
                (40000, 1883, _publish("elsewhere/pm-0004/telemetry", v1)),
                (40000, 1883, _publish("pacemakers/pm-0006/telemetry", short_v2)),
            ]
        )
    )  # fmt: skip
    home = tmp_path / "home"
    mqtt = ["-d", "tcp.port==1883,mqtt"]
    rows = fields(
        pcap,
        "pacegate.sealed",
        [
            "pacegate.sealed.device",
            "pacegate.sealed.version",
            "pacegate.sealed.version_known",
            "pacegate.sealed.epoch",
            "pacegate.sealed.counter",
            "pacegate.sealed.tag",
            "_ws.expert.message",
        ],
        home=home,
        extra=mqtt,
    )
    assert len(rows) == 3  # the topic outside pacemakers/+/telemetry is not a reading
    devices, versions, known, epochs, counters, tags, _experts = (c.split(";") for c in rows[0])
    assert devices == ["pm-0001", "pm-0002", "pm-0005"]
    assert versions == ["1", "3", "2"]
    assert known == ["1", "0", "1"] or known == ["True", "False", "True"]
    assert epochs == [EPOCH_A.hex()]  # only v2 has an epoch
    assert counters == ["7", "9"]  # no counter is guessed for the unknown version
    assert tags == [bytes(range(15, 31)).hex()] * 2
    devices, versions, *_rest, experts = (c.split(";") for c in rows[1])
    assert devices == ["pm-0003"]
    assert versions == ["1"]
    assert any("v1 is 40 bytes, this is 30" in e for e in experts)
    devices, versions, _known, epochs, counters, *_rest, experts = (c.split(";") for c in rows[2])
    assert devices == ["pm-0006"]
    assert versions == ["2"]
    assert epochs == counters == [""]
    assert any("v2 is 48 bytes, this is 40" in e for e in experts)

    unknown = fields(pcap, "pacegate.sealed.unknown_version", ["frame.number"], home=home,
                     extra=mqtt)  # fmt: skip
    assert len(unknown) == 1
    # the epoch is filterable, as the hex of its 8 bytes
    by_epoch = fields(pcap, f"pacegate.sealed.epoch == {EPOCH_A.hex()}",
                      ["pacegate.sealed.counter"], home=home, extra=mqtt)  # fmt: skip
    assert by_epoch == [["7;9"]]  # the frame that holds it (and its other readings)
    assert fields(pcap, f"pacegate.sealed.epoch == {EPOCH_B.hex()}", ["frame.number"],
                  home=home, extra=mqtt) == []  # fmt: skip
    # the topic pattern is a preference
    other = fields(
        pcap, "pacegate.sealed", ["pacegate.sealed.device"], home=home,
        extra=[*mqtt, "-o", "pacegate.sealed.topic:elsewhere/+/telemetry"],
    )  # fmt: skip
    assert [r[0] for r in other] == ["pm-0004"]


@pytest.mark.integration
@needs_tshark
def test_capture_reports_unknown_versions_malformed_readings_and_nonce_reuse_per_epoch(
    tmp_path: Path,
) -> None:
    """``pacegate capture``'s dissector checks on a hand-built capture, read by the real
    tshark and dissector: what is wrong is a finding, never a traceback; a nonce is
    (device, epoch, counter) for v2, so one counter in two epochs is no reuse."""
    from console import capture

    readings = [
        # one counter, three keys, three ciphertexts: a different nonce each time
        ("pm-0001", _v2(EPOCH_A, 5, bytes([0xA]) * 31)),
        ("pm-0001", _v2(EPOCH_B, 5, bytes([0xB]) * 31)),  # another boot: another key
        ("pm-0001", _v1(5, bytes([0x1]) * 31)),  # v1 under the PSK itself
        ("pm-0002", _v2(EPOCH_A, 3)),
        ("pm-0002", _v2(EPOCH_A, 3, bytes(31))),  # same epoch and counter, new ciphertext
        ("pm-0002", _v2(EPOCH_A, 3)),  # a resend of the first: the same bytes, no reuse
        ("pm-0003", bytes([7]) + bytes(47)),  # unknown version
        ("pm-0004", _v2(EPOCH_A, 1)[:47]),  # truncated v2
        ("pm-0005", b""),  # empty payload
    ]
    pcap = tmp_path / "crafted.pcap"
    pcap.write_bytes(
        _pcap(
            [(40000 + i, 1883, _publish(f"pacemakers/{d}/telemetry", p))
             for i, (d, p) in enumerate(readings)]
        )
    )  # fmt: skip
    # what pacegate.sealed parses of the same payloads
    parsed: set[capture.NonceKey] = set()
    for device, payload in readings:
        try:
            h = sealed.parse_header(payload)
        except sealed.SealedReadingError:
            continue
        parsed.add((device, h.epoch.hex() if h.epoch else None, h.counter))
    # port 1883 is MQTT in clear to tshark; the capture's own MQTT port (TLS) is elsewhere
    ports = capture.Ports(mqtt=9, hospital=9001, cloud=9002)
    trees = capture._tshark_trees(
        pcap, None, ports, "pacegate.sealed && tcp.dstport==1883", "pacegate.sealed"
    )
    assert len(trees) == len(readings)
    report = capture.CaptureReport(str(pcap), None)
    report.devices_sent = 4
    capture.check_dissected_readings(report, trees, parsed)

    assert report.sealed_readings_dissected == 4 == len(parsed)
    assert report.sealed_unknown_versions == 1
    assert report.sealed_malformed == 2
    assert report.sealed_counters["pm-0001"] == {"first": 5, "last": 5, "count": 3, "epochs": 3}
    findings = "\n".join(report.findings)
    assert f"pm-0002: epoch {EPOCH_A.hex()} counter 3 carried two different ciphertexts" in findings
    assert "pm-0001" not in findings  # one counter in three keys is not nonce reuse
    assert "version the dissector does not know (v7: 1;" in findings
    assert "2 sealed readings the dissector shows as malformed" in findings
    assert "disagree" not in findings
    assert "the devices sent" not in findings
    assert len(report.findings) == 3


@pytest.mark.integration
def test_capture_checks_count_any_dissector_tree_as_a_finding_never_raise() -> None:
    """Whatever a dissector (a newer, an older, a broken one) puts in its tree, the checks
    count it and go on."""
    from console import capture

    p = capture.SEALED_FIELD_PREFIX
    good = {p + "device": "pm-1", p + "version": "2", p + "version_known": "1",
            p + "epoch": "00:01:02:03:04:05:06:07", p + "counter": "4",
            p + "ciphertext": "aa", p + "tag": "bb"}  # fmt: skip
    trees: list[dict[str, Any]] = [
        good,
        {},
        {p + "version": "2", p + "version_known": "1"},  # no counter: wrong size
        {**good, p + "counter": "\uff14"},  # a digit, but not ASCII
        {**good, p + "counter": ["4", "5"]},
        {**good, p + "epoch": None},  # v2 without its epoch
        {**good, p + "version": "1"},  # v1 with an epoch
        {**good, p + "version_known": "0", p + "version": "9"},
        {**good, p + "version": 2},
    ]
    report = capture.CaptureReport("x.pcap", None)
    capture.check_dissected_readings(report, trees, {("pm-1", "0001020304050607", 4)})
    assert report.sealed_readings_dissected == 1
    assert report.sealed_unknown_versions == 1
    assert report.sealed_malformed == 7
    assert not any("disagree" in f for f in report.findings)


@pytest.mark.integration
@needs_tshark
def test_channel_dissector_skips_unknown_frame_types_and_flags_oversized_ones(
    tmp_path: Path,
) -> None:
    unknown = bytes([0x05]) + struct.pack(">I", 3) + b"new"  # a frame type from a newer peer
    record = bytes([0x17]) + struct.pack(">I", 20) + bytes(20)
    oversized = bytes([0x17]) + struct.pack(">I", wire.MAX_FRAME_BODY + 1) + bytes(10)
    pcap = tmp_path / "channel.pcap"
    # the record is split over two segments: the dissector reassembles it
    pcap.write_bytes(
        _pcap(
            [
                (41000, 8884, unknown + record[:9]),
                (41000, 8884, record[9:]),
                (8884, 41000, oversized),
            ]
        )
    )
    home = tmp_path / "home"
    rows = fields(pcap, "pacegate.channel", ["frame.number", "pacegate.channel.type"], home=home)
    types = [t for _n, ts in rows for t in ts.split(";")]
    assert [int(t, 16) for t in types] == [0x05, 0x17, 0x17]
    assert fields(pcap, "pacegate.channel.unknown_type", ["frame.number"], home=home) == [["1"]]
    assert fields(pcap, "pacegate.channel.too_large", ["frame.number"], home=home) == [["3"]]
    rec = fields(pcap, "pacegate.channel.record.tag", ["pacegate.channel.record.tag"], home=home)
    assert rec == [[bytes(16).hex()]]


def _client_hello(versions: tuple[int, ...], time_ms: int) -> bytes:
    """A real version-2 ClientHello frame, signed by a fresh ML-DSA-65 key."""
    me = ChannelIdentity.generate("gateway")
    unsigned = ClientHello(
        versions,
        (session.SUITE_HYBRID_V1,),
        bytes(range(32)),
        time_ms,
        "gateway",
        "hospital",
        bytes(32),
        bytes(kem.MLKEM768_PUBLIC_KEY_SIZE),
    )
    sig = ks.sign_transcript(me.private_key, ks.HELLO_SIGNATURE_CONTEXT, unsigned.signed_part())
    hello = dataclasses.replace(unsigned, signature=sig)
    return wire.frame(wire.FrameType.CLIENT_HELLO, hello.encode())


@pytest.mark.integration
@needs_tshark
def test_channel_dissector_shows_v2_hello_fields_alerts_and_unknown_versions(
    tmp_path: Path,
) -> None:
    time_ms = 1_700_000_123_456
    v2 = _client_hello((session.VERSION_2,), time_ms)
    alert = wire.frame(wire.FrameType.ALERT, bytes([wire.AlertReason.STALE_HELLO]))
    # version 1's layout: no time, names or signature (peers refuse it; it is still readable)
    v1_body = (
        bytes([1]) + struct.pack(">H", session.VERSION_1) + bytes([1]) + struct.pack(">H", 1)
        + bytes(32) + struct.pack(">H", 32) + bytes(32)
        + struct.pack(">H", kem.MLKEM768_PUBLIC_KEY_SIZE) + bytes(kem.MLKEM768_PUBLIC_KEY_SIZE)
    )  # fmt: skip
    v1 = wire.frame(wire.FrameType.CLIENT_HELLO, v1_body)
    # a hello offering only a version from the future: flagged, its body not guessed
    future = wire.frame(
        wire.FrameType.CLIENT_HELLO,
        bytes([1]) + struct.pack(">H", 0x0009) + bytes([1]) + struct.pack(">H", 1) + bytes(40),
    )
    future_reply = wire.frame(
        wire.FrameType.SERVER_HELLO, struct.pack(">HH", 0x0009, 1) + bytes(40)
    )
    long_alert = wire.frame(wire.FrameType.ALERT, bytes(2))
    # a hello cut short inside its signature, and an empty one: flagged, no Lua error
    cut = wire.frame(wire.FrameType.CLIENT_HELLO, v2[wire.FRAME_HEADER_SIZE : -100])
    empty = wire.frame(wire.FrameType.CLIENT_HELLO, b"")
    pcap = tmp_path / "v2.pcap"
    pcap.write_bytes(
        _pcap(
            [
                (41000, 8884, v2[:1000]),  # split: the dissector reassembles the hello
                (41000, 8884, v2[1000:]),
                (8884, 41000, alert),
                (41001, 8884, v1),
                (41002, 8884, future),
                (8884, 41002, future_reply),
                (8884, 41003, long_alert),
                (41004, 8884, cut),
                (41005, 8884, empty),
            ]
        )
    )
    home = tmp_path / "home"
    names = [
        "frame.number",
        "pacegate.channel.hello.client",
        "pacegate.channel.hello.server",
        "pacegate.channel.hello.time_ms",
        "pacegate.channel.hello.signature_length",
        "pacegate.channel.hello.layout",
        "pacegate.channel.frame_size",
    ]
    rows = fields(pcap, "pacegate.channel.type == 0x01", names, home=home)
    assert [r[0] for r in rows] == ["2", "4", "5", "8", "9"]
    _n, client, server, t, sig_len, layout_v, size = rows[0]
    assert (client, server, int(t), int(sig_len)) == ("gateway", "hospital", time_ms, 3309)
    assert int(layout_v, 16) == session.VERSION_2
    assert int(size) == len(v2)
    assert rows[1][1:5] == ["", "", "", ""]
    assert int(rows[1][5], 16) == session.VERSION_1
    assert rows[2][1:6] == ["", "", "", "", ""]  # unknown version: nothing guessed
    # every new field filters
    by_server = fields(pcap, 'pacegate.channel.hello.server == "hospital"', ["frame.number"],
                       home=home)  # fmt: skip
    assert by_server == [["2"], ["8"]]
    when = fields(pcap, "pacegate.channel.hello.time", ["pacegate.channel.hello.time"], home=home)
    assert when[0] == ["Nov 14, 2023 22:15:23.456000000 UTC"]  # time_ms as a UTC time
    early = 'pacegate.channel.hello.time < "2023-11-14 22:15:24Z"'
    assert fields(pcap, early, ["frame.number"], home=home) == [["2"], ["8"]]
    late = 'pacegate.channel.hello.time > "2023-11-14 22:15:24Z"'
    assert fields(pcap, late, ["frame.number"], home=home) == []
    alerts = fields(
        pcap, "pacegate.channel.alert.reason == 2", ["frame.number", "_ws.col.Info"], home=home
    )
    assert [a[0] for a in alerts] == ["3"]
    assert "Alert (stale)" in alerts[0][1]
    assert fields(pcap, "pacegate.channel.old_version", ["frame.number"], home=home) == [["4"]]
    unknown = fields(pcap, "pacegate.channel.unknown_version", ["frame.number"], home=home)
    assert unknown == [["5"], ["6"]]
    assert fields(pcap, "pacegate.channel.too_large", ["frame.number"], home=home) == [["7"]]
    malformed = fields(pcap, "pacegate.channel.malformed", ["frame.number"], home=home)
    assert malformed == [["8"], ["9"]]
