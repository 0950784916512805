"""Gateway receive path: readings/s, sealed vs a plaintext pass-through, in the same run.

Two measurements, each sealed and plaintext side by side::

    pipeline   in-process, no network: gateway.pipeline.process() on sealed v1 payloads
               (route, PSK lookup, replay window, ChaCha20-Poly1305 open, checks) against a
               pass-through that only routes and decodes a 15-byte plaintext reading.
    broker     through the real embedded broker over mTLS, QoS 1: devices publish N readings;
               the running gateway (its paho client, manual acks, pipeline) against a bare
               paho subscriber with the same session settings that decodes and acks
               plaintext readings. Time from the first publish to the last decision.

Usage: .venv/bin/python bench/bench_gateway_receive.py [--pipeline N] [--broker N] [--json]
Figures are for design, not promises: one machine, one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402

from console.workdir import WorkLayout, gateway_config_text  # noqa: E402
from gateway.config import load_gateway_config  # noqa: E402
from gateway.pipeline import PipelineState, process  # noqa: E402
from gateway.replay_store import ReplayStore  # noqa: E402
from gateway.service import Gateway  # noqa: E402
from pacegate.identity import TELEMETRY_FILTER, telemetry_topic  # noqa: E402
from pacegate.keystore import PskStore  # noqa: E402
from pacegate.layout import PkiLayout  # noqa: E402
from pacegate.reading import Reading  # noqa: E402
from pacegate.sealed import new_epoch, seal_reading  # noqa: E402
from tests.support import connect_as, embedded_broker, free_port  # noqa: E402

DEVICES = ("pm-0001", "pm-0002", "pm-0003", "pm-0004")
EPOCH = new_epoch()  # one boot of every simulated device (sealed-reading v2)


def _reading(i: int) -> Reading:
    return Reading(
        age=60 + i % 30, heart_rate_bpm=60 + i % 50, sensor_id=i, timestamp=datetime.now(UTC)
    )


def bench_pipeline(work: Path, n: int) -> dict[str, float]:
    cfg = load_gateway_config(work / "gateway.yaml", check_files=False)
    keys = PskStore.load(cfg.psk_store.path, cfg.psk_store.key)
    store = ReplayStore(work / "bench-replay.db")
    state = PipelineState(routes=cfg.routes, keys=keys, windows=store)
    psks = {d: keys.get(d).psk for d in DEVICES}  # type: ignore[union-attr]
    msgs = [
        (
            telemetry_topic(d),
            seal_reading(psks[d], d, i // len(DEVICES) + 1, _reading(i), epoch=EPOCH),
        )
        for i in range(n)
        for d in (DEVICES[i % len(DEVICES)],)
    ]
    plain = [(t, _reading(i).to_bytes()) for i, (t, _) in enumerate(msgs)]
    wall = datetime.now(UTC)

    t0 = time.perf_counter()
    ok = sum(1 for t, p in msgs if hasattr(process(t, p, state, now=0.0, wall=wall), "item"))
    sealed_s = time.perf_counter() - t0
    assert ok == n, f"only {ok} of {n} sealed readings accepted"

    t0 = time.perf_counter()
    for t, p in plain:
        match = state.match(t)
        assert match is not None
        Reading.from_bytes(p)
    plain_s = time.perf_counter() - t0
    store.close()
    return {"sealed_per_s": n / sealed_s, "plaintext_per_s": n / plain_s, "n": n}


def _publish_all(
    broker: object, payloads: dict[str, list[bytes]], delivered: Callable[[], bool]
) -> None:
    """Publish everything at QoS 1, then stay connected until it is ``delivered``: amqtt 0.12
    drops messages it has PUBACKed but not yet relayed when their publisher disconnects."""
    clients = []
    for d, items in payloads.items():
        _, c = connect_as(broker, d)  # type: ignore[arg-type]
        assert c is not None
        clients.append((c, d, items))
    infos = []
    for c, d, items in clients:
        for p in items:
            infos.append(c.client.publish(telemetry_topic(d), p, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    deadline = time.monotonic() + 120
    while not delivered() and time.monotonic() < deadline:
        time.sleep(0.01)
    for c, _, _ in clients:
        c.close()


def bench_broker_sealed(work: Path, broker: object, n: int) -> float:
    cfg = load_gateway_config(work / "gateway.yaml")
    keys = PskStore.load(cfg.psk_store.path, cfg.psk_store.key)
    gw = Gateway(cfg, use_channel=False)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(gw.run(stop)), daemon=True)
    thread.start()
    while gw.metrics.value("pacegate_gateway_mqtt_connected") != 1:
        time.sleep(0.05)
    payloads = {d: [] for d in DEVICES}  # type: dict[str, list[bytes]]
    for i in range(n):
        d = DEVICES[i % len(DEVICES)]
        key = keys.get(d)
        if key is None:
            raise SystemExit(f"{d} is not in the PSK store")
        payloads[d].append(seal_reading(key.psk, d, len(payloads[d]) + 1, _reading(i), epoch=EPOCH))
    t0 = time.perf_counter()

    def accepted() -> bool:
        return gw.metrics.value("pacegate_gateway_accepted_total") >= n

    pub = threading.Thread(target=_publish_all, args=(broker, payloads, accepted))
    pub.start()
    while not accepted():
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    pub.join()
    rejected = sum(
        s.value
        for m in gw.metrics.registry.collect()
        if m.name == "pacegate_gateway_rejected"
        for s in m.samples
        if s.name.endswith("_total")
    )
    assert rejected == 0, f"{rejected} rejections in the benchmark"
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    return n / elapsed


def bench_broker_plaintext(broker: object, pki: PkiLayout, n: int) -> float:
    """A bare subscriber with the gateway's identity and session settings."""
    from pacegate.tlsconf import client_context

    got = 0
    done = threading.Event()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
        client_id="gateway",
        clean_session=False,
        manual_ack=True,
    )
    client.tls_set_context(client_context(pki.ca_cert, pki.gateway_cert, pki.gateway_key))
    subscribed = threading.Event()

    def on_connect(c: mqtt.Client, *_: object) -> None:
        c.subscribe(TELEMETRY_FILTER, 1)

    def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal got
        Reading.from_bytes(bytes(msg.payload))
        c.ack(msg.mid, msg.qos)
        got += 1
        if got >= n:
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect(broker.host, broker.port)  # type: ignore[attr-defined]
    client.loop_start()
    subscribed.wait(10)
    payloads = {d: [] for d in DEVICES}  # type: dict[str, list[bytes]]
    for i in range(n):
        payloads[DEVICES[i % len(DEVICES)]].append(_reading(i).to_bytes())
    t0 = time.perf_counter()
    pub = threading.Thread(target=_publish_all, args=(broker, payloads, done.is_set))
    pub.start()
    done.wait(300)
    elapsed = time.perf_counter() - t0
    pub.join()
    client.disconnect()
    client.loop_stop()
    return n / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", type=int, default=20_000, help="readings, in-process")
    ap.add_argument("--broker", type=int, default=2_000, help="readings through the broker")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from pacegate.pki import enroll_devices, init_pki

    with tempfile.TemporaryDirectory(prefix="pacegate-bench-") as tmp:
        work = Path(tmp)
        init_pki(work / "pki")
        enroll_devices(work / "pki", DEVICES)
        with embedded_broker(work / "pki", work / "broker") as broker:
            (work / "gateway.yaml").write_text(
                gateway_config_text(
                    WorkLayout(work),
                    mqtt_host=broker.host,
                    mqtt_port=broker.port,
                    hospital_host="127.0.0.1",
                    hospital_port=free_port(),
                    metrics_port=0,
                )
            )
            pipe = bench_pipeline(work, args.pipeline)
            plain_rate = bench_broker_plaintext(broker, PkiLayout(work / "pki"), args.broker)
            sealed_rate = bench_broker_sealed(work, broker, args.broker)
    result = {
        "pipeline": {
            "readings": pipe["n"],
            "sealed_readings_per_s": round(pipe["sealed_per_s"]),
            "plaintext_readings_per_s": round(pipe["plaintext_per_s"]),
            "sealed_us_per_reading": round(1e6 / pipe["sealed_per_s"], 2),
        },
        "broker_embedded_mtls_qos1": {
            "readings": args.broker,
            "gateway_sealed_readings_per_s": round(sealed_rate),
            "plaintext_passthrough_readings_per_s": round(plain_rate),
            "sealed_over_plaintext": round(sealed_rate / plain_rate, 3),
        },
    }
    if args.json:
        print(json.dumps(result))
    else:
        p, b = result["pipeline"], result["broker_embedded_mtls_qos1"]
        print(
            f"pipeline ({p['readings']} readings, in-process): sealed "
            f"{p['sealed_readings_per_s']:,}/s ({p['sealed_us_per_reading']} us each), "
            f"plaintext pass-through {p['plaintext_readings_per_s']:,}/s"
        )
        print(
            f"through amqtt over mTLS, QoS 1 ({b['readings']} readings): gateway "
            f"{b['gateway_sealed_readings_per_s']:,}/s, plaintext pass-through "
            f"{b['plaintext_passthrough_readings_per_s']:,}/s (ratio {b['sealed_over_plaintext']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
