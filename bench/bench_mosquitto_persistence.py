"""What Mosquitto's persistence settings cost: QoS 1 publish rate with each setting.

    .venv/bin/python bench/bench_mosquitto_persistence.py [--messages 3000] [--backlog 0]
        [--online] [--json]

For each setting (``autosave_interval 10``, pacegate's earlier one; ``autosave_interval 1``;
``autosave_on_changes true`` + ``autosave_interval 1``, a save after every main-loop pass
that changed anything): a fresh Mosquitto (Debian's, pacegate's configuration, real mTLS),
the ``gateway`` identity's persistent session subscribed and then offline (or, with
``--online``, connected and acknowledging), ``--backlog`` messages already queued for it;
then one device publishes ``--messages`` QoS 1 messages (at most 100 in flight) and the
rate of PUBACKs is reported. Mosquitto writes its whole
in-memory database at each save (``persist__backup``: ``mosquitto.db.new``, fflush, fsync,
rename), so the cost of a save grows with what is queued.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pacegate.layout import PkiLayout  # noqa: E402
from pacegate.pki import enroll_devices, init_pki  # noqa: E402
from pacegate.pki.mosquitto import mosquitto_conf  # noqa: E402

SETTINGS = {
    "autosave_interval 10 (shipped before)": ["autosave_interval 10"],
    "autosave_interval 1": ["autosave_interval 1"],
    "autosave_on_changes true, autosave_interval 1": [
        "autosave_on_changes true",
        "autosave_interval 1",
    ],
}
WAIT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _client(pki: PkiLayout, identity: str, port: int, *, clean: bool) -> mqtt.Client:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca_cert))
    if identity == "gateway":
        ctx.load_cert_chain(str(pki.gateway_cert), str(pki.gateway_key))
    else:
        ctx.load_cert_chain(str(pki.device_cert(identity)), str(pki.device_key(identity)))
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
        client_id=identity,
        protocol=mqtt.MQTTv311,
        clean_session=clean,
    )
    c.tls_set_context(ctx)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda *_a: connected.set()
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not connected.wait(WAIT_S):
        raise RuntimeError(f"{identity} did not connect")
    return c


def _publish(pki: PkiLayout, port: int, n: int) -> float:
    dev = _client(pki, "pm-0001", port, clean=True)
    try:
        start = time.perf_counter()
        infos = [dev.publish("pacemakers/pm-0001/telemetry", b"x" * 60, qos=1) for _ in range(n)]
        for info in infos:
            info.wait_for_publish(WAIT_S)
        return n / (time.perf_counter() - start)
    finally:
        dev.disconnect()
        dev.loop_stop()


def measure(
    setting: list[str], messages: int, backlog: int, tmp: Path, *, online: bool = False
) -> float:
    pki = PkiLayout(tmp / "pki")
    init_pki(pki.root)
    enroll_devices(pki.root, ["pm-0001"])
    port = _free_port()
    conf = mosquitto_conf(pki, host="127.0.0.1", port=port)
    lines = [line for line in conf.splitlines() if not line.startswith("autosave_")]
    at = lines.index("persistence true") + 1
    lines[at:at] = setting
    cfg = tmp / "mosquitto.conf"
    cfg.write_text("\n".join(lines) + "\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with open(tmp / "mosquitto.log", "w") as log:
        proc = subprocess.Popen([binary, "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        gw = _client(pki, "gateway", port, clean=False)
        gw.subscribe("pacemakers/#", 1)
        time.sleep(0.3)
        if not online:
            gw.disconnect()  # persistent and offline: the broker queues for it
            gw.loop_stop()
        try:
            if backlog:
                _publish(pki, port, backlog)
            return _publish(pki, port, messages)
        finally:
            if online:
                gw.disconnect()
                gw.loop_stop()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--backlog", type=int, default=0)
    ap.add_argument(
        "--online", action="store_true", help="the gateway stays connected and acknowledges"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {
        "messages": args.messages,
        "backlog": args.backlog,
        "gateway_online": args.online,
        "rates": {},
    }
    for name, setting in SETTINGS.items():
        with tempfile.TemporaryDirectory(prefix="pacegate-mqpersist-") as tmp:
            # search only, no listing: mosquitto, started as root, drops to its own account
            os.chmod(tmp, 0o711)  # noqa: S103
            rate = measure(setting, args.messages, args.backlog, Path(tmp), online=args.online)
            out["rates"][name] = round(rate)
    if args.json:
        print(json.dumps(out))
    else:
        for name, rate in out["rates"].items():
            where = "online" if args.online else "offline"
            print(f"{name}: {rate} PUBACKs/s (gateway {where}, backlog {args.backlog})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
