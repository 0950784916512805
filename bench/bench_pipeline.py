"""End to end, in one run: readings/s of the secured pipeline against the same pipeline in
plaintext, the post-quantum handshake cost, and the share of CPU spent in cryptography.

    .venv/bin/python bench/bench_pipeline.py [--devices 10] [--readings 15000] [--repeats 5]
                                             [--handshakes 50] [--quick] [--json]

**Secured run**: the real stack as ``pacegate up`` runs it (:func:`console.stack.running_stack`
on a temporary work directory: broker, cloud, hospital and gateway as separate processes),
``--devices`` simulated pacemakers (``device_sim.device.SimulatedDevice``: real sealing, real
MQTT over mutual TLS) connected first, then each queues ``--readings / --devices`` readings at
once (a saturating burst). Time runs from the first reading queued until the hospital's
``pacegate_hospital_stored_total`` has grown by the count; readings/s = count / time.
One uncounted warm-up round of a fifth of the readings, then ``--repeats`` rounds; the
median is reported (the devices reconnect for each round; connecting is not timed). The
secured and the plaintext stack run side by side and their rounds alternate (secured,
plaintext, secured, ...), so that a machine whose speed drifts during the run moves both
alike (:func:`run_interleaved`).

**Plaintext run**: the same topology (the same :class:`console.stack.Stack`, started through
its ``service_argv`` seam, plus the devices in this process), the same code, each
cryptographic layer replaced by its identity, and *only* that. The plaintext wiring lives in
this file only (bench-local subclasses of production classes, overriding the seams they
expose, and a bench-local ``--serve`` mode); nothing is monkeypatched, and no production code
path has a security-off switch. What differs:

- device -> broker: plain TCP instead of TLS (a pass-through stream in place of
  ``device_sim.mqtt.TlsStream``); the payload is the *null seal*: the same 9-byte header
  (version, counter), the 15-byte reading in clear, and 16 zero bytes in place of the tag
  (40 bytes, as sealed), so the broker carries the same bytes per message;
- broker: ``PacegateBroker`` with a plain listener (no ``start_tls``); the identity used by
  the authentication and topic-ACL plugins is the MQTT client id instead of the certificate
  CN (same ``device_may`` ACL function), no CRL check;
- gateway: the real ``gateway.service.Gateway`` and ``gateway.pipeline.process`` (routes,
  PSK lookup, limits, header parse, replay window, checks, batching, manual MQTT acks), with
  the ``_open_sealed`` seam (ChaCha20-Poly1305) returning the null open, the ``_secure`` seam
  leaving the MQTT client without TLS, and the PQ channel replaced by 4-byte length-prefixed
  frames over TCP (no handshake, no AES-GCM records);
- hospital: the real ``HospitalService`` and ``SqliteReadingStore`` (same batches, same
  transaction per batch, WAL + ``synchronous=FULL``, same padded JSON rows) with a keyring
  whose Fernet encryption, row-key HMAC, chain HMAC and head MAC are identities/constants.

**Handshake cost**: N PQ channel handshakes (``pacegate.channel.connect`` against ``serve``,
both ends in this process, so the figure is the CPU of both ends plus loopback), against N
TCP connects and N TLS 1.3 handshakes with client certificates (the gateway's certificate
against the broker's), in the same run.

**CPU in cryptography**, two ways (the first is the headline):

1. *differential*: CPU seconds (psutil, user + system) of the gateway, hospital and broker
   processes over the measured window, secured vs plaintext, per reading. The difference is
   what the cryptography costs, everything included (TLS records, AEAD, Fernet, HMACs, channel
   records, and the Python glue around them); share = difference / secured CPU.
2. *operation count x per-op cost*: the application-level crypto operations the run performed
   (one ChaCha20-Poly1305 open per reading at the gateway; one Fernet token, a row-key and a
   chain HMAC per reading at the hospital; one channel record each way per batch), each
   microbenchmarked in this run against its null replacement. It leaves out TLS, so it is a
   lower bound. Profiling the services would need hooks in production code; counting does not.
   For reference, ``op_costs_us`` also gives one TLS 1.3 record of a PUBLISH's size sealed
   and opened in memory (:func:`tls_record_cost`): the floor of a TLS hop per packet, four
   of which each reading takes (its publish and PUBACK on both hops).

Figures come from one run on the machine at hand (use them for design, not as promises).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from broker.plugins import CertIdentityAuthPlugin, TopicAclPlugin, device_may  # noqa: E402
from console.endpoints import Endpoints  # noqa: E402
from console.stack import (  # noqa: E402
    Stack,
    StackError,
    mosquitto_binary,
    prepare_workdir,
    running_stack,
    scrape,
    write_mosquitto_config,
)
from console.workdir import WorkLayout  # noqa: E402
from device_sim.counter import CounterStore  # noqa: E402
from device_sim.device import Backoff, Endpoint, SimulatedDevice  # noqa: E402
from device_sim.fleet import load_bundle  # noqa: E402
from device_sim.model import HeartModel  # noqa: E402
from device_sim.mqtt import (  # noqa: E402
    MqttClientProtocol,
    MqttConnection,
    TlsStream,
    await_connack,
)
from hospital.keyring import ChainKeys, Keyring  # noqa: E402
from pacegate.identity import is_valid_device_id  # noqa: E402
from pacegate.layout import DEFAULT_HOST  # noqa: E402
from pacegate.reading import READING_SIZE, Reading  # noqa: E402
from pacegate.sealed import (  # noqa: E402
    HEADER_SIZE_V2,
    TAG_SIZE,
    VERSION_2,
    SealedReadingError,
    parse_header,
)

HOST = DEFAULT_HOST
SERVICE_START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
CONNECT_TIMEOUT_S = 30.0
# a repeat that has not stored everything after this long is a broken stack, not a slow one
DRAIN_TIMEOUT_S = 300.0
POLL_S = 0.02
NULL_TAG = bytes(TAG_SIZE)
_HEADER = struct.Struct(">B8sQ")  # v2: version, epoch, counter
NULL_EPOCH = bytes(8)
_FRAME = struct.Struct(">I")
GENESIS = bytes(32)
STORED = "pacegate_hospital_stored_total"
# the steady load of the latency figures (the goal: p99 <= 50 ms at this rate)
LATENCY_RATE = 1000.0
# how often the hospital's stored counter is read during it: the latency resolution
LATENCY_SAMPLE_S = 0.005
BATCHES = "pacegate_hospital_batches_total"


# == the identity replacements of each crypto layer (plaintext run only) ==================
def null_seal(psk: bytes, device_id: str, counter: int, reading: Reading) -> bytes:
    """The sealed-reading v2 layout with the identity AEAD: header, reading, zero tag."""
    return _HEADER.pack(VERSION_2, NULL_EPOCH, counter) + reading.to_bytes() + NULL_TAG


def null_open(psk: bytes, device_id: str, payload: bytes) -> tuple[int, Reading]:
    header = parse_header(payload)
    if payload[-TAG_SIZE:] != NULL_TAG:
        raise SealedReadingError("not a null seal", reason="bad_tag")
    return header.counter, Reading.from_bytes(
        payload[HEADER_SIZE_V2 : HEADER_SIZE_V2 + READING_SIZE]
    )


class PlainStream(TlsStream):
    """``TlsStream``'s interface over plain TCP (the device's TLS layer as an identity)."""

    def __init__(self) -> None:  # no super().__init__: there is no SSL object
        self._transport: asyncio.Transport | None = None
        self.handshake_done = asyncio.get_running_loop().create_future()
        self._plain = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.handshake_done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._plain += data
        self._wake()

    def write(self, data: bytes) -> None:
        if not self._closed and self._transport is not None:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._closed = True
            self._transport.close()


async def open_plain_mqtt(host: str, port: int, client_id: str, keepalive: int) -> MqttConnection:
    """``MqttConnection.open`` minus TLS."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        _, stream = await loop.create_connection(PlainStream, host, port)
        proto = MqttClientProtocol()
        stream.write(proto.connect(client_id, keepalive=keepalive))
        await await_connack(stream, proto)
        return MqttConnection(stream, proto, keepalive)


class PlainDevice(SimulatedDevice):
    """A simulated pacemaker with the null seal and no TLS; everything else as is."""

    def take_reading(self, dt: float, when: datetime) -> int:
        reading = self.model.step(dt, when)
        counter = self.counter.next()
        self._enqueue(_outgoing(counter, null_seal(self.psk, self.device_id, counter, reading)))
        self.stats.produced += 1
        self._pump()
        return counter

    async def _connect(self) -> MqttConnection:
        async with self.connect_gate:
            return await open_plain_mqtt(
                self.endpoint.host, self.endpoint.port, self.device_id, self.keepalive
            )


def _outgoing(counter: int, payload: bytes) -> Any:
    from device_sim.device import _Outgoing

    return _Outgoing(counter, payload)


class PlainFramedStream:
    """The PQ channel's stream interface as 4-byte length-prefixed frames over TCP."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer_name: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.peer_name = peer_name

    async def send(self, data: bytes) -> None:
        from pacegate.channel import ChannelClosed

        if self._writer.is_closing():
            raise ChannelClosed("closed")
        self._writer.write(_FRAME.pack(len(data)) + data)
        await self._writer.drain()

    async def recv(self) -> bytes:
        from pacegate.channel import ChannelClosed

        try:
            (length,) = _FRAME.unpack(await self._reader.readexactly(_FRAME.size))
            return await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ChannelClosed(f"peer closed: {exc}") from None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


class NullKeyring(Keyring):
    """The hospital keyring with every primitive replaced by its identity (or a constant)."""

    def encrypt(self, plaintext: bytes) -> bytes:
        return plaintext

    def decrypt(self, token: bytes) -> bytes:
        return token

    def integrity(self, version: int) -> ChainKeys:
        super().integrity(version)  # the same refusal of an unknown version
        return NullChainKeys(version, bytes(32))


class NullChainKeys(ChainKeys):
    """Row keys in clear, constant chain links and MACs."""

    __slots__ = ()

    def row_key(self, device_id: str, counter: int) -> bytes:
        return device_id.encode() + b"\x00" + counter.to_bytes(8, "big")

    def chain_link(self, prev: bytes, seq: int, row_key: bytes, plaintext: bytes) -> bytes:
        return GENESIS

    def head_mac(self, seq: int, chain: bytes) -> bytes:
        return GENESIS

    def anchor_mac(self, seq: int, chain: bytes) -> bytes:
        return GENESIS


# == the plaintext services (run as `bench_pipeline.py --serve NAME -c FILE`) ==============
class ClientIdAuth(CertIdentityAuthPlugin):  # type: ignore[misc]
    """The plaintext broker's authentication: no TLS, so the claimed client id stands in for
    the certificate's CN (amqtt loads plugins by dotted path: they live at module level)."""

    async def authenticate(self, *, session: Any) -> bool | None:
        cid = session.client_id
        return bool(cid == "gateway" or is_valid_device_id(cid))


class ClientIdAcl(TopicAclPlugin):  # type: ignore[misc]
    """The production topic ACL (``device_may``) keyed on the client id."""

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool | None:
        if session is None or topic is None or action is None:
            return False
        gw: str = self.config.gateway_identity
        return device_may(session.client_id, topic, action, gw)


def serve_plain_broker(config: Path) -> None:
    from broker.amqtt_api import Broker, StreamWriterAdapter
    from broker.config import BrokerConfig, load_broker_config
    from broker.delivery import GatewayAcks
    from broker.server import (
        PACKET_OVERHEAD,
        PacegateBroker,
        RevocationGuard,
        _BoundedReader,
        amqtt_config,
    )

    class PlainBroker(PacegateBroker):  # type: ignore[misc]
        def __init__(self, cfg: BrokerConfig) -> None:
            self.cfg = cfg
            self.guard = RevocationGuard(cfg)  # built (as in production), never consulted
            conf = amqtt_config(cfg)
            conf["listeners"]["default"]["ssl"] = False
            conf["plugins"] = {
                f"{__name__}.ClientIdAuth": {},
                f"{__name__}.ClientIdAcl": {"gateway_identity": cfg.gateway_identity},
            }
            Broker.__init__(self, conf, plugin_namespace="pacegate.broker.plugins")
            self._watch_task = None
            # end-to-end acknowledgement, as in production
            self.acks = GatewayAcks(self._is_gateway)
            self._init_registry()

        def _connection_identity(self, incoming: Any) -> tuple[str | None, bytes | None]:
            # no TLS, so no certificate: the claimed client id stands in for the identity
            return str(incoming.client_id), b""

        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            limit = self.cfg.max_payload + PACKET_OVERHEAD
            await Broker._client_connected(
                self,
                listener_name,
                _BoundedReader(reader, writer, limit),
                StreamWriterAdapter(writer),
            )

    cfg = load_broker_config(config)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        broker = PlainBroker(cfg)
        await broker.start()
        try:
            await stop.wait()
        finally:
            await broker.shutdown()

    asyncio.run(run())


def serve_plain_hospital(config: Path) -> None:
    from hospital.config import load_hospital_config
    from hospital.service import HospitalService, start_metrics
    from hospital.store import SqliteReadingStore

    cfg = load_hospital_config(config)
    cfg.sqlite_database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = NullKeyring.create(cfg.keyring)
    store = SqliteReadingStore(cfg.sqlite_database, keyring)
    service = HospitalService(cfg, store)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        metrics = start_metrics(cfg, service.metrics)

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stream = PlainFramedStream(reader, writer, "gateway")
            try:
                await service.on_session(cast(Any, stream))
            finally:
                await stream.close()

        server = await asyncio.start_server(session, cfg.listen_host, cfg.listen_port)
        try:
            await stop.wait()
        finally:
            server.close()
            metrics.close()
            service.close()

    asyncio.run(run())


def serve_plain_gateway(config: Path) -> None:
    import paho.mqtt.client as mqtt

    from gateway.config import load_gateway_config
    from gateway.forwarder import ChannelStream
    from gateway.service import Gateway

    class PlainGateway(Gateway):
        # the one crypto call of the gateway's per-message decision, as its identity
        _open_sealed = staticmethod(null_open)

        def _secure(self, client: mqtt.Client) -> None:
            pass  # MQTT over plain TCP: the TLS layer as an identity

    cfg = load_gateway_config(config)

    async def connector() -> ChannelStream:
        reader, writer = await asyncio.open_connection(
            str(cfg.hospital.host), int(cfg.hospital.port)
        )
        return PlainFramedStream(reader, writer, "hospital")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await PlainGateway(cfg, connector=connector).run(stop)

    asyncio.run(run())


SERVERS: dict[str, Callable[[Path], None]] = {
    "broker": serve_plain_broker,
    "hospital": serve_plain_hospital,
    "gateway": serve_plain_gateway,
}


class PlainStack(Stack):
    """``pacegate up``'s own :class:`~console.stack.Stack` (start order, readiness, logs,
    stop by PID) with the broker, hospital and gateway started as this file's plaintext
    services; the cloud worker is the real one (the analysis is not measured here)."""

    def service_argv(self, name: str) -> list[str]:
        if name == "broker" and self.broker == "mosquitto":
            return [
                mosquitto_binary(),
                "-c",
                str(write_plain_mosquitto_config(self.work, self.endpoints)),
            ]
        if name in SERVERS:
            config = {
                "broker": self.work.broker_config,
                "hospital": self.work.hospital_config,
                "gateway": self.work.gateway_config,
            }[name]
            return [sys.executable, str(Path(__file__).resolve()), "--serve", name, str(config)]
        return super().service_argv(name)


def write_plain_mosquitto_config(work: WorkLayout, ep: Endpoints) -> Path:
    """pacegate's Mosquitto configuration with the TLS listener as an identity: plain TCP,
    no certificates, so no certificate identity for the ACL either (anonymous clients, no
    ACL file; Mosquitto's ACL check is a C string match, not what the ratio measures), and
    no dynamic-security plugin (it is there to kick revoked sessions, and it would refuse
    anonymous clients everything). Persistence as in the secured run."""
    path = work.root / "mosquitto-plain.conf"
    secured = write_mosquitto_config(work, ep, overwrite=True).read_text().splitlines()
    keep = [
        line
        for line in secured[: secured.index(next(x for x in secured if x.startswith("listener")))]
        if not line.startswith(("acl_file", "allow_anonymous", "plugin"))
    ]
    lines = [*keep, "allow_anonymous true", f"listener {ep.mqtt[1]} {ep.mqtt[0]}"]
    path.write_text("\n".join([*lines, "protocol mqtt", "max_connections 10000", ""]))
    return path


def running_plain_stack(
    work: WorkLayout, broker: str = "embedded"
) -> contextlib.AbstractContextManager[Stack]:
    return running_stack(
        work, overwrite_configs=True, log_level="WARNING", broker=broker, stack_type=PlainStack
    )


# == the load: N devices, a fixed burst of readings, timed until stored ====================
def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        t = psutil.Process(pid).cpu_times()
        out[name] = t.user + t.system
    return out


def _stored(ep: Endpoints) -> dict[str, float]:
    m = scrape(*ep.hospital_metrics)
    return {"stored": m.get(STORED, -1.0), "batches": m.get(BATCHES, 0.0)}


@dataclass
class RepeatResult:
    readings: int
    seconds: float
    cpu_s: dict[str, float]
    batches: int

    @property
    def rate(self) -> float:
        return self.readings / self.seconds


def _devices(
    work: WorkLayout, ep: Endpoints, device_ids: list[str], per_device: int, *, plain: bool
) -> list[SimulatedDevice]:
    pki = work.pki
    gate = asyncio.Semaphore(16)
    devices: list[SimulatedDevice] = []
    cls = PlainDevice if plain else SimulatedDevice
    from pacegate.tlsconf import client_context

    for did in device_ids:
        bundle = load_bundle(pki, did)
        counter = CounterStore(pki.device_counter(did), did, block=per_device + 16)
        counter.reserve()
        devices.append(
            cls(
                device_id=did,
                psk=bundle.psk,
                ssl_context=client_context(pki.ca_cert, bundle.cert, bundle.key),
                endpoints=[Endpoint(*ep.mqtt)],
                counter=counter,
                model=HeartModel(did, seed=1),
                connect_gate=gate,
                backoff=Backoff(random.Random(did), base=0.05, cap=1.0),
                buffer_limit=per_device + 1,
            )
        )
    return devices


def latency_percentiles(published: list[float], stored: list[tuple[float, int]]) -> list[float]:
    """Per-reading latency from the two cumulative curves: reading k (in publish order) is
    taken as committed at the first sample where the hospital's stored count reached k
    (FIFO: exact for one device, an estimate across devices; resolution: the sampling
    interval). ``published``: times, ascending; ``stored``: (time, count), ascending."""
    out: list[float] = []
    j = 0
    for k, t_pub in enumerate(published, start=1):
        while j < len(stored) and stored[j][1] < k:
            j += 1
        if j == len(stored):
            break
        out.append(max(0.0, stored[j][0] - t_pub))
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def steady_latency(
    work: WorkLayout,
    ep: Endpoints,
    device_ids: list[str],
    *,
    rate: float,
    seconds: float,
    plain: bool,
) -> dict[str, float]:
    """Readings at a steady ``rate`` (all devices together, round robin) for ``seconds``;
    latency from the device's publish to the hospital's commit (its stored counter,
    sampled every :data:`LATENCY_SAMPLE_S`), as p50/p95/p99 in ms."""
    n = max(1, int(rate * seconds))
    devices = _devices(work, ep, device_ids, n // len(device_ids) + 1, plain=plain)
    radios = [asyncio.create_task(d.stay_connected()) for d in devices]
    published: list[float] = []
    samples: list[tuple[float, int]] = []
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            while not all(d.connected for d in devices):  # noqa: ASYNC110 - polls state that has no event (a counter, a flag)
                await asyncio.sleep(POLL_S)
        base = (await asyncio.to_thread(_stored, ep))["stored"]
        if base < 0:
            raise StackError("cannot read the hospital's metrics")
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                count = (await asyncio.to_thread(_stored, ep))["stored"] - base
                samples.append(((t0 + time.perf_counter()) / 2, int(count)))
                if count >= n:
                    done.set()
                await asyncio.sleep(LATENCY_SAMPLE_S)

        sampler = asyncio.create_task(sample())
        start = time.perf_counter()
        i = 0
        while i < n:
            due = min(n, int((time.perf_counter() - start) * rate) + 1)
            while i < due:
                devices[i % len(devices)].take_reading(1.0 / rate, datetime.now(UTC))
                published.append(time.perf_counter())
                i += 1
            await asyncio.sleep(0.001)
        achieved = n / (time.perf_counter() - start)
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await done.wait()
        await sampler
    finally:
        for d in devices:
            d.disconnect()
        for t in radios:
            t.cancel()
        await asyncio.gather(*radios, return_exceptions=True)
    lat = latency_percentiles(published, samples)
    return {
        "readings": n,
        "offered_readings_per_s": round(achieved, 1),
        "p50": round(1000 * _percentile(lat, 0.50), 1),
        "p95": round(1000 * _percentile(lat, 0.95), 1),
        "p99": round(1000 * _percentile(lat, 0.99), 1),
        "sample_interval_ms": round(1000 * LATENCY_SAMPLE_S, 1),
    }


async def drive(
    work: WorkLayout,
    ep: Endpoints,
    device_ids: list[str],
    per_device: int,
    pids: dict[str, int],
    *,
    plain: bool,
) -> RepeatResult:
    """Connect the devices, queue ``per_device`` readings on each, time until all stored."""
    devices = _devices(work, ep, device_ids, per_device, plain=plain)
    radios = [asyncio.create_task(d.stay_connected()) for d in devices]
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            while not all(d.connected for d in devices):  # noqa: ASYNC110 - polls state that has no event (a counter, a flag)
                await asyncio.sleep(POLL_S)
        before = await asyncio.to_thread(_stored, ep)
        if before["stored"] < 0:
            raise StackError("cannot read the hospital's metrics")
        target = before["stored"] + per_device * len(devices)
        cpu0 = _cpu(pids)
        t0 = time.perf_counter()

        async def produce(d: SimulatedDevice) -> None:
            for i in range(per_device):
                d.take_reading(0.001, datetime.now(UTC))
                if i % 32 == 31:
                    await asyncio.sleep(0)

        producers = [asyncio.create_task(produce(d)) for d in devices]
        now = before
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while now["stored"] < target:
                await asyncio.sleep(POLL_S)
                now = await asyncio.to_thread(_stored, ep)
        elapsed = time.perf_counter() - t0
        cpu1 = _cpu(pids)
        await asyncio.gather(*producers)
    finally:
        for d in devices:
            d.disconnect()
        for t in radios:
            t.cancel()
        await asyncio.gather(*radios, return_exceptions=True)
    n = per_device * len(devices)
    if now["stored"] != target:
        raise StackError(f"stored {now['stored'] - before['stored']:.0f} readings, sent {n}")
    return RepeatResult(
        readings=n,
        seconds=elapsed,
        cpu_s={k: cpu1[k] - cpu0[k] for k in pids},
        batches=int(now["batches"] - before["batches"]),
    )


def pids_of_secured(stack: Stack) -> dict[str, int]:
    pids = {s.name: s.proc.pid for s in stack.services if s.name != "cloud"}
    return pids | {"devices": os.getpid()}


def run_interleaved(
    base: Path,
    devices: int,
    per_device: int,
    repeats: int,
    *,
    broker: str = "embedded",
    latency_s: float = 0.0,
) -> tuple[
    list[RepeatResult],
    list[RepeatResult],
    dict[str, float] | None,
    dict[str, float] | None,
]:
    """The secured and the plaintext stack side by side, their rounds taken in turn.

    Both stacks run at once (the plaintext one on free ports beside the secured one's), and
    each round of one is followed by the same round of the other: secured, plaintext,
    secured, ... The stack not being measured is idle. A machine whose speed drifts during
    the run (a shared VM's CPU time moved by 2x within minutes here) then moves both sides
    alike, where running all secured rounds before all plaintext ones put the drift into
    the ratio. The steady latency phases follow in the same order."""
    work = WorkLayout(base / "secured")
    ids = prepare_workdir(work, devices)
    plain_work = WorkLayout(base / "plain")
    plain_work.root.mkdir(parents=True, exist_ok=True)
    if not plain_work.pki.root.exists():
        plain_work.pki.root.symlink_to(work.pki.root, target_is_directory=True)
    with (
        running_stack(work, overwrite_configs=True, log_level="WARNING", broker=broker) as secured,
        running_plain_stack(plain_work, broker) as plain,
    ):
        sides = (
            (work, secured, False, pids_of_secured(secured)),
            (plain_work, plain, True, pids_of_secured(plain)),
        )

        def round_of(
            side: tuple[WorkLayout, Stack, bool, dict[str, int]], count: int
        ) -> RepeatResult:
            w, stack, is_plain, pids = side
            return asyncio.run(drive(w, stack.endpoints, ids, count, pids, plain=is_plain))

        warm = max(1, per_device // 5)  # not counted: first sessions, caches, file growth
        for side in sides:
            round_of(side, warm)
        results: tuple[list[RepeatResult], list[RepeatResult]] = ([], [])
        for _ in range(repeats):
            for side, out in zip(sides, results, strict=True):
                out.append(round_of(side, per_device))
        latencies: list[dict[str, float] | None] = [None, None]
        if latency_s > 0:
            for i, (w, stack, is_plain, _) in enumerate(sides):
                latencies[i] = asyncio.run(
                    steady_latency(
                        w,
                        stack.endpoints,
                        ids,
                        rate=LATENCY_RATE,
                        seconds=latency_s,
                        plain=is_plain,
                    )
                )
        for _, stack, _, _ in sides:
            stack.check_alive()
    return results[0], results[1], latencies[0], latencies[1]


# == handshakes =============================================================================
async def handshake_costs(pki_root: Path, n: int) -> dict[str, dict[str, float]]:
    from pacegate.channel import ChannelIdentity, ChannelStream, connect, serve
    from pacegate.layout import PkiLayout
    from pacegate.tlsconf import client_context, server_context

    hospital = ChannelIdentity.generate("hospital")
    gw = ChannelIdentity.generate("gateway")

    async def idle(stream: ChannelStream) -> None:
        async for _ in stream:
            pass

    server = await serve(
        HOST, 0, identity=hospital, allowed_clients={"gateway": gw.public_key}, on_session=idle
    )
    port = server.sockets[0].getsockname()[1]
    pq: list[float] = []
    try:
        for i in range(n + 2):
            t0 = time.perf_counter()
            stream = await connect(
                HOST, port, identity=gw, server_name="hospital", server_key=hospital.public_key
            )
            if i >= 2:  # two warm-ups
                pq.append(time.perf_counter() - t0)
            await stream.close()
    finally:
        server.close()
        await server.wait_closed()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read(1)
        writer.close()

    async def timed(
        ctx_server: ssl.SSLContext | None, ctx_client: ssl.SSLContext | None
    ) -> list[float]:
        srv = await asyncio.start_server(answer, HOST, 0, ssl=ctx_server)
        p = srv.sockets[0].getsockname()[1]
        out = []
        try:
            for i in range(n + 2):
                t0 = time.perf_counter()
                _, writer = await asyncio.open_connection(
                    HOST, p, ssl=ctx_client, server_hostname="localhost" if ctx_client else None
                )
                if i >= 2:
                    out.append(time.perf_counter() - t0)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        finally:
            srv.close()
            await srv.wait_closed()
        return out

    pki = PkiLayout(pki_root)
    srv_ctx = server_context(pki.broker_cert, pki.broker_key, pki.ca_cert)
    srv_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cli_ctx = client_context(pki.ca_cert, pki.gateway_cert, pki.gateway_key)
    tcp = await timed(None, None)
    tls = await timed(srv_ctx, cli_ctx)

    def ms(xs: list[float]) -> dict[str, float]:
        return {
            "median_ms": round(statistics.median(xs) * 1e3, 3),
            "mean_ms": round(statistics.fmean(xs) * 1e3, 3),
        }

    return {"pq_channel": ms(pq), "tls13_mtls": ms(tls), "tcp_connect": ms(tcp)}


# == per-operation crypto costs (microbenchmarked in this run) ==============================
def _per_op(fn: Callable[[], object], n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def crypto_op_costs(tmp: Path, batch_readings: float) -> dict[str, float]:
    """Seconds per operation, crypto minus its null replacement, same inputs."""
    from hospital.rowcodec import encode_plaintext
    from pacegate.channel import ChannelIdentity, ChannelSession
    from pacegate.channel.session import NEED_DATA, Message
    from pacegate.ingest import IngestItem
    from pacegate.sealed import open_reading, seal_reading

    reading = Reading(age=70, heart_rate_bpm=72, sensor_id=7, timestamp=datetime.now(UTC))
    psk = os.urandom(32)
    sealed = seal_reading(psk, "pm-0001", 5, reading, epoch=bytes(8))
    nulled = null_seal(psk, "pm-0001", 5, reading)
    n = 5000
    aead = _per_op(lambda: open_reading(psk, "pm-0001", sealed), n) - _per_op(
        lambda: null_open(psk, "pm-0001", nulled), n
    )
    ring = Keyring.create(tmp / "bench-keyring.json")
    pt = encode_plaintext(IngestItem("pm-0001", 5, reading))
    keys = ring.integrity(ring.current_mac_version)
    rk = keys.row_key("pm-0001", 5)
    fernet = _per_op(lambda: ring.encrypt(pt), n)
    hmacs = _per_op(lambda: keys.row_key("pm-0001", 5), n) + _per_op(
        lambda: keys.chain_link(GENESIS, 5, rk, pt), n
    )

    # one channel record each way per batch: AES-256-GCM seal + open of a batch-sized message
    a, b = ChannelIdentity.generate("gateway"), ChannelIdentity.generate("hospital")
    client = ChannelSession.client(a, server_name="hospital", server_key=b.public_key)
    server = ChannelSession.server(b, allowed_clients={"gateway": a.public_key})
    server.receive_data(client.initiate())
    for x, y in ((server, client), (client, server), (server, client)):
        while x.next_event() is not NEED_DATA and not x.established:
            pass
        y.receive_data(x.data_to_send())
    while client.next_event() is not NEED_DATA:
        pass
    size = max(1, round(batch_readings * 33)) + 11  # ~33 bytes per ingest item + header

    def record() -> None:
        server.receive_data(client.send(bytes(size)))
        ev = server.next_event()
        assert isinstance(ev, Message)

    channel_record = _per_op(record, 500)
    return {
        "chacha20poly1305_open_s": max(aead, 0.0),
        "fernet_encrypt_s": fernet,
        "row_key_and_chain_hmac_s": hmacs,
        "channel_record_seal_open_s": channel_record,
        "tls_record_seal_open_s": tls_record_cost(tmp / "secured" / "pki"),
    }


# A device's QoS 1 PUBLISH of one sealed reading: fixed header, topic, packet id, 48 bytes
TLS_RECORD_PAYLOAD = 80


def tls_record_cost(pki_root: Path) -> float:
    """Seconds to seal and open one TLS 1.3 record of a PUBLISH's size, both ends in memory
    (ssl.MemoryBIO, the same contexts as the broker and a device): the floor of what one
    TLS hop costs per packet, without the event loop and socket around it. Each reading
    takes four such records on the embedded path (its publish and its PUBACK, on both
    hops)."""
    from pacegate.layout import PkiLayout
    from pacegate.tlsconf import client_context, server_context

    pki = PkiLayout(pki_root)
    device = min(p.name for p in pki.devices_dir.iterdir() if p.is_dir())
    srv_ctx = server_context(pki.broker_cert, pki.broker_key, pki.ca_cert)
    cli_ctx = client_context(pki.ca_cert, pki.device_cert(device), pki.device_key(device))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = cli_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = srv_ctx.wrap_bio(s_in, s_out, server_side=True)
    handshaking = [client, server]
    for _ in range(10):  # a TLS 1.3 handshake takes two flights each way at most
        for end in list(handshaking):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
                handshaking.remove(end)
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not handshaking:
            break
    if handshaking:
        raise StackError("the in-memory TLS handshake did not complete")
    payload = bytes(TLS_RECORD_PAYLOAD)

    def one_record() -> None:
        client.write(payload)
        s_in.write(c_out.read())
        if server.read(4096) != payload:
            raise StackError("the TLS record did not open to what was sealed")

    return _per_op(one_record, 5000)


# == the report ===============================================================================
def _median(results: list[RepeatResult]) -> RepeatResult:
    return sorted(results, key=lambda r: r.rate)[len(results) // 2]


def _cpu_per_k(results: list[RepeatResult]) -> dict[str, float]:
    total = sum(r.readings for r in results)
    names = results[0].cpu_s.keys()
    return {k: sum(r.cpu_s[k] for r in results) / total * 1000 for k in names}


def run(args: argparse.Namespace) -> dict[str, Any]:
    per_device = max(1, args.readings // args.devices)
    with tempfile.TemporaryDirectory(prefix="pacegate-bench-pipeline-") as tmp:
        # search only, no listing: mosquitto, started as root, drops to its own account
        os.chmod(tmp, 0o711)  # noqa: S103
        base = Path(tmp)
        t_start = time.perf_counter()
        secured, plain, latency, plain_latency = run_interleaved(
            base,
            args.devices,
            per_device,
            args.repeats,
            broker=args.broker,
            latency_s=args.latency_seconds,
        )
        hs = asyncio.run(handshake_costs(base / "secured" / "pki", args.handshakes))
        batches = sum(r.batches for r in secured)
        per_batch = sum(r.readings for r in secured) / max(batches, 1)
        ops = crypto_op_costs(base, per_batch)
        total_s = time.perf_counter() - t_start

    sec_cpu, pl_cpu = _cpu_per_k(secured), _cpu_per_k(plain)
    diff_share = {
        k: (sec_cpu[k] - pl_cpu[k]) / sec_cpu[k] if sec_cpu[k] > 0 else 0.0 for k in sec_cpu
    }
    all_sec, all_pl = sum(sec_cpu.values()), sum(pl_cpu.values())
    # application-level crypto seconds per 1,000 readings, by process
    per_reading_channel = 2 * ops["channel_record_seal_open_s"] / per_batch
    counted = {
        "gateway": 1000 * (ops["chacha20poly1305_open_s"] + per_reading_channel / 2),
        "hospital": 1000
        * (ops["fernet_encrypt_s"] + ops["row_key_and_chain_hmac_s"] + per_reading_channel / 2),
    }
    ms, mp = _median(secured), _median(plain)
    return {
        "broker": args.broker,
        "devices": args.devices,
        "readings_per_repeat": per_device * args.devices,
        # device publish -> row committed at a steady LATENCY_RATE readings/s (ms)
        "latency_ms": latency,
        "latency_ms_plaintext": plain_latency,
        "repeats": args.repeats,
        "throughput": {
            "secured_readings_per_s": round(ms.rate, 1),
            "plaintext_readings_per_s": round(mp.rate, 1),
            "secured_over_plaintext": round(ms.rate / mp.rate, 3),
            # each secured round over the plaintext round right after it, median: the
            # pairs share the machine's state, so drift between pairs cancels out
            "secured_over_plaintext_paired": round(
                statistics.median(s.rate / p.rate for s, p in zip(secured, plain, strict=True)), 3
            ),
            "secured_runs_readings_per_s": [round(r.rate, 1) for r in secured],
            "plaintext_runs_readings_per_s": [round(r.rate, 1) for r in plain],
            "readings_per_batch": round(per_batch, 1),
        },
        "handshake": hs
        | {
            "pq_over_tls13": round(hs["pq_channel"]["median_ms"] / hs["tls13_mtls"]["median_ms"], 2)
        },
        "cpu": {
            "secured_cpu_s_per_1000_readings": {k: round(v, 4) for k, v in sec_cpu.items()},
            "plaintext_cpu_s_per_1000_readings": {k: round(v, 4) for k, v in pl_cpu.items()},
            "crypto_share_differential": {k: round(v, 3) for k, v in diff_share.items()}
            | {"total": round((all_sec - all_pl) / all_sec, 3) if all_sec > 0 else 0.0},
            "crypto_share_op_count": {
                k: round(v / sec_cpu[k], 3) if sec_cpu[k] > 0 else 0.0 for k, v in counted.items()
            },
            "op_costs_us": {k.removesuffix("_s"): round(v * 1e6, 2) for k, v in ops.items()},
        },
        "bench_seconds": round(total_s, 1),
    }


def print_table(r: dict[str, Any]) -> None:
    t, h, c = r["throughput"], r["handshake"], r["cpu"]
    out = sys.stdout
    print(
        f"pacegate end to end ({r['broker']} broker): {r['devices']} devices,"
        f" {r['readings_per_repeat']} readings per repeat, {r['repeats']} repeats (median),"
        f" {t['readings_per_batch']} readings/batch",
        file=out,
    )
    print(f"  {'':34}{'secured':>12}{'plaintext':>12}{'ratio':>8}", file=out)
    print(
        f"  {'readings/s (median)':34}{t['secured_readings_per_s']:>12,.0f}"
        f"{t['plaintext_readings_per_s']:>12,.0f}{t['secured_over_plaintext']:>8}",
        file=out,
    )
    print(f"  runs: secured {t['secured_runs_readings_per_s']}, plaintext", file=out, end=" ")
    print(f"{t['plaintext_runs_readings_per_s']}", file=out)
    print(
        f"  {'round by round (median of pairs)':58}{t['secured_over_plaintext_paired']:>8}",
        file=out,
    )
    print("CPU seconds per 1,000 readings (psutil, user+system, measured window)", file=out)
    print(
        f"  {'process':12}{'secured':>10}{'plaintext':>11}{'crypto share':>14}"
        f"{'op-count share':>16}",
        file=out,
    )
    sec, pl = c["secured_cpu_s_per_1000_readings"], c["plaintext_cpu_s_per_1000_readings"]
    for k in sec:
        oc = c["crypto_share_op_count"].get(k)
        print(
            f"  {k:12}{sec[k]:>10.3f}{pl[k]:>11.3f}{c['crypto_share_differential'][k]:>14.1%}"
            f"{(f'{oc:.1%}' if oc is not None else '-'):>16}",
            file=out,
        )
    print(
        f"  {'all':12}{sum(sec.values()):>10.3f}{sum(pl.values()):>11.3f}"
        f"{c['crypto_share_differential']['total']:>14.1%}{'':>16}",
        file=out,
    )
    print(f"  per-op costs (us): {c['op_costs_us']}", file=out)
    print("handshake, both ends in this process, loopback (median / mean ms)", file=out)
    for name, label in (
        ("pq_channel", "PQ channel (ML-KEM-768+X25519, ML-DSA-65)"),
        ("tls13_mtls", "TLS 1.3 with client certificate"),
        ("tcp_connect", "TCP connect"),
    ):
        print(f"  {label:44}{h[name]['median_ms']:>9.3f}{h[name]['mean_ms']:>9.3f}", file=out)
    for key, label in (("latency_ms", "secured"), ("latency_ms_plaintext", "plaintext")):
        lat = r.get(key)
        if lat:
            print(
                f"latency publish -> committed, {label}, {lat['offered_readings_per_s']:,.0f}"
                f" readings/s offered: p50 {lat['p50']} ms, p95 {lat['p95']} ms,"
                f" p99 {lat['p99']} ms",
                file=out,
            )
    print(f"  PQ / TLS 1.3: {h['pq_over_tls13']}x; bench took {r['bench_seconds']} s", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--readings", type=int, default=15000, help="readings per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--handshakes", type=int, default=50)
    ap.add_argument("--broker", choices=("embedded", "mosquitto"), default="embedded")
    ap.add_argument(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="seconds of steady load at 1,000 readings/s for the latency figures (0: none)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny workload (smoke test)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--serve", nargs=2, metavar=("SERVICE", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        name, config = args.serve
        SERVERS[name](Path(config))
        return 0
    if args.quick:
        args.devices, args.readings, args.repeats, args.handshakes = 2, 100, 1, 3
        args.latency_seconds = min(args.latency_seconds, 1.0)
    if min(args.devices, args.readings, args.repeats, args.handshakes) < 1:
        ap.error("--devices, --readings, --repeats and --handshakes must be >= 1")
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
