"""Test support shared by every area: free ports, real brokers as subprocesses, MQTT clients.

- :func:`free_port`, :func:`wait_for_port`;
- :func:`embedded_broker` / :func:`mosquitto_broker`: context managers that start the real
  embedded broker (``python -m console broker -c <yaml>``) or Debian's mosquitto on a free
  loopback port for a PKI directory, and yield a :class:`BrokerHandle`
  (``.host``, ``.port``, ``.pki``, ``.kind``, ``.log_text()``, ``.reload()``);
- :func:`mqtt_client`, :func:`try_connect`: paho clients over mTLS with a given identity.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt

from pacegate.layout import PkiLayout

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
READY_MARK = "pacegate broker listening on"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = START_TIMEOUT) -> None:
    """Wait until something accepts TCP connections on (host, port); else TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


def have_mosquitto() -> bool:
    return Path(MOSQUITTO).exists()


@dataclass
class BrokerHandle:
    kind: str  # "embedded" | "mosquitto"
    host: str
    port: int
    pki: PkiLayout
    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def reload(self) -> None:
        """Make the broker pick up a new CRL/ACL now. The embedded broker watches the CRL
        on its own (this is a no-op); mosquitto reloads on SIGHUP."""
        if self.kind == "mosquitto":
            self.proc.send_signal(signal.SIGHUP)

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if text in log:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{self.kind} broker never logged {text!r}; log:\n{self.log_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path, mark: str, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if mark in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; log:\n{text}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {START_TIMEOUT} s; log:\n{text}")
        time.sleep(0.05)


@contextlib.contextmanager
def embedded_broker(
    pki_dir: Path,
    workdir: Path,
    *,
    host: str = LOOPBACK,
    port: int | None = None,
    config_text: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[BrokerHandle]:
    """Run ``pacegate broker`` (the real embedded broker) as a subprocess."""
    from broker.config import render_default_config

    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    cfg = workdir / "broker.yaml"
    text = config_text or render_default_config(pki_dir, host=host, port=port, config_dir=workdir)
    cfg.write_text(text)
    log_path = workdir / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "console", "--log-json", "broker", "-c", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    try:
        _wait_ready(proc, log_path, READY_MARK, "pacegate broker")
        yield BrokerHandle("embedded", host, port, PkiLayout(Path(pki_dir)), proc, log_path, cfg)
    finally:
        _stop(proc)


# Set by conftest for ``-m "not integration"`` (the inner loop): property tests then run
# this many examples each instead of their full count (see :func:`examples`).
INNER_LOOP = False
INNER_LOOP_EXAMPLES = 25


def examples(full: int) -> int:
    """A property test's example count: ``full`` in the whole suite, fewer in the inner loop."""
    return min(full, INNER_LOOP_EXAMPLES) if INNER_LOOP else full


def let_others_through(directory: Path) -> None:
    """Give ``directory`` and its parents the search bit for others (not the read bit), so
    an unprivileged broker account can reach files below whose names it knows."""
    for d in (directory, *directory.parents):
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


@contextlib.contextmanager
def mosquitto_broker(
    pki_dir: Path,
    workdir: Path,
    *,
    host: str = LOOPBACK,
    port: int | None = None,
    run_as: str | None = None,
) -> Iterator[BrokerHandle]:
    """Run Debian's mosquitto with pacegate's configuration on a free loopback port
    (``run_as``: start it as that account, through setpriv, instead of as ourselves)."""
    from pacegate.pki.mosquitto import mosquitto_conf

    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    pki = PkiLayout(Path(pki_dir))
    if os.geteuid() == 0:
        # started as root, mosquitto drops to the generated 'user' (the 'mosquitto' account
        # for a root-owned PKI), which must be able to walk down to the PKI: pytest makes
        # its base temporary directory 0700
        let_others_through(pki.root.resolve().parent)
    conf = mosquitto_conf(pki, host=host, port=port)
    conf = "\n".join(["log_dest stderr", "log_type all", conf])
    cfg = workdir / "mosquitto.conf"
    cfg.write_text(conf)
    log_path = workdir / "mosquitto.log"
    with open(log_path, "wb") as log:
        argv = [MOSQUITTO, "-c", str(cfg)]
        if run_as is not None:
            account = pwd.getpwnam(run_as)
            cfg.chmod(0o644)
            let_others_through(workdir)
            argv = [
                "setpriv",
                f"--reuid={account.pw_uid}",
                f"--regid={account.pw_gid}",
                "--clear-groups",
                *argv,
            ]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, log_path, "running", "mosquitto")
        wait_for_port(host, port)
        yield BrokerHandle("mosquitto", host, port, pki, proc, log_path, cfg)
    finally:
        _stop(proc)


# ---------------------------------------------------------------------------------------
# MQTT clients (paho) over mutual TLS
# ---------------------------------------------------------------------------------------
class ClosingTlsContext(ssl.SSLContext):
    """A client context that remembers every socket it wraps, so that its owner can close
    them all (:meth:`close_sockets`).

    paho wraps and handshakes in one private step and, when the handshake fails (a broker
    that refuses before or during TLS, or a refused reconnect in paho's own thread), drops
    the wrapped socket without closing it: a ``ResourceWarning`` at garbage collection,
    which ``filterwarnings=error`` turns into a test error somewhere else."""

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        # (ssl.SSLContext is set up in __new__; this only adds the bookkeeping)
        self._wrapped: list[ssl.SSLSocket] = []
        self._wrapped_lock = threading.Lock()  # paho wraps in its network thread

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        with self._wrapped_lock:
            self._wrapped.append(sock)
        return sock

    def close_sockets(self) -> None:
        """Close every socket wrapped so far (closing a closed socket is a no-op)."""
        with self._wrapped_lock:
            socks, self._wrapped = self._wrapped, []
        for sock in socks:
            sock.close()


def client_tls_context(ca: Path, cert: Path | None, key: Path | None) -> ClosingTlsContext:
    ctx = ClosingTlsContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def identity_files(pki: PkiLayout, identity: str) -> tuple[Path, Path]:
    if identity == "gateway":
        return pki.gateway_cert, pki.gateway_key
    return pki.device_cert(identity), pki.device_key(identity)


@dataclass
class ConnectOutcome:
    connected: bool
    reason: str  # "Success", "Not authorized", or the TLS/socket error


class MqttClient:
    """A paho client running its network loop in a thread, recording what happens.

    Every one made is closed at the end of its test (:func:`close_leftover_clients`, from
    conftest) if the test did not: paho's thread reconnects for ever otherwise, and its
    connects would be charged to whichever test runs next."""

    open_clients: ClassVar[set[MqttClient]] = set()

    def __init__(self, client: mqtt.Client, tls: ClosingTlsContext | None = None) -> None:
        MqttClient.open_clients.add(self)
        self.client = client
        self.tls = tls  # closed with the client: paho may drop a socket it wrapped
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subacks: list[list[int]] = []
        self.suback_event = threading.Event()
        self.connack_reason: str | None = None
        self.lock = threading.Lock()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe  # type: ignore[assignment]

    def _on_connect(self, _c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        self.connack_reason = str(rc)
        if not getattr(rc, "is_failure", False):
            self.connected.set()
        else:
            self.disconnected.set()

    def _on_disconnect(self, _c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        self.disconnected.set()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def _on_subscribe(
        self, _c: object, _u: object, _mid: int, rcs: list[object], _p: object
    ) -> None:
        self.subacks.append([int(getattr(rc, "value", rc)) for rc in rcs])  # type: ignore[call-overload]
        self.suback_event.set()

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        self.suback_event.clear()
        self.client.subscribe(topic, qos)
        if not self.suback_event.wait(timeout):
            raise TimeoutError(f"no SUBACK for {topic}")
        return self.subacks[-1]

    def publish(self, topic: str, payload: bytes, qos: int = 1, timeout: float = 5.0) -> None:
        info = self.client.publish(topic, payload, qos)
        if qos:
            info.wait_for_publish(timeout)

    def close(self) -> None:
        MqttClient.open_clients.discard(self)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        if self.tls is not None:
            self.tls.close_sockets()


def close_leftover_clients() -> int:
    """Close every :class:`MqttClient` a test left open; how many there were."""
    left = list(MqttClient.open_clients)
    for client in left:
        client.close()
    return len(left)


def try_connect(
    host: str,
    port: int,
    *,
    ca: Path,
    cert: Path | None,
    key: Path | None,
    client_id: str,
    timeout: float = 5.0,
) -> tuple[ConnectOutcome, MqttClient | None]:
    """Connect over mTLS; return the outcome and, if connected, the running client (which
    the caller closes). Every other path closes every socket it opened."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
        client_id=client_id,
        protocol=mqtt.MQTTv311,
    )
    tls = client_tls_context(ca, cert, key)
    client.tls_set_context(tls)
    wrapper = MqttClient(client, tls)
    try:
        client.connect(host, port, keepalive=30)
    except (ssl.SSLError, OSError) as exc:
        # refused before or during the handshake: paho dropped the wrapped socket unclosed
        tls.close_sockets()
        return ConnectOutcome(False, f"{type(exc).__name__}: {exc}"), None
    except BaseException:
        tls.close_sockets()
        raise
    client.loop_start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wrapper.connected.is_set():
            # TLS 1.3: the server checks the client certificate after the client's
            # handshake completes; a refusal arrives as a closed connection right after.
            return ConnectOutcome(True, wrapper.connack_reason or "Success"), wrapper
        if wrapper.disconnected.is_set():
            break
        time.sleep(0.01)
    wrapper.close()
    return ConnectOutcome(False, wrapper.connack_reason or "disconnected before CONNACK"), None


def connect_as(
    broker: BrokerHandle, identity: str, *, client_id: str | None = None, timeout: float = 5.0
) -> tuple[ConnectOutcome, MqttClient | None]:
    cert, key = identity_files(broker.pki, identity)
    return try_connect(
        broker.host,
        broker.port,
        ca=broker.pki.ca_cert,
        cert=cert,
        key=key,
        client_id=client_id or identity,
        timeout=timeout,
    )


def wait_until(pred: object, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``pred()`` until true or ``timeout``; return its last truth value."""
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


# ---------------------------------------------------------------------------------------
# A raw MQTT 3.1.1 client over mutual TLS: sends exactly the bytes a test gives it
# ---------------------------------------------------------------------------------------
def mqtt_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def mqtt_packet(first_byte: int, body: bytes) -> bytes:
    """A whole packet: fixed header (with its variable-length remaining length) + body."""
    out, n = bytearray([first_byte]), len(body)
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out) + body


def connect_packet(client_id: str, *, clean_session: bool = True, keep_alive: int = 30) -> bytes:
    flags = 0x02 if clean_session else 0x00
    body = mqtt_string("MQTT") + bytes([4, flags]) + keep_alive.to_bytes(2, "big")
    return mqtt_packet(0x10, body + mqtt_string(client_id))


def publish_packet(
    topic: str | bytes, payload: bytes, *, qos: int = 1, packet_id: int = 1, flags: int = 0
) -> bytes:
    body = mqtt_string(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return mqtt_packet(0x30 | (qos << 1) | flags, body)


def subscribe_packet(topic: str, *, qos: int = 1, packet_id: int = 1) -> bytes:
    return mqtt_packet(0x82, packet_id.to_bytes(2, "big") + mqtt_string(topic) + bytes([qos]))


PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"


class RawMqtt:
    """One TLS connection with a client certificate; the test writes raw bytes and reads
    what comes back. ``closed_by_peer()`` says whether the broker has closed it."""

    def __init__(self, broker: BrokerHandle, identity: str, timeout: float = 5.0) -> None:
        cert, key = identity_files(broker.pki, identity)
        self.tls = client_tls_context(broker.pki.ca_cert, cert, key)
        raw = socket.create_connection((broker.host, broker.port), timeout=timeout)
        try:
            self.sock = self.tls.wrap_socket(raw, server_hostname=broker.host)
        except BaseException:
            raw.close()
            raise
        self.sock.settimeout(timeout)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_packet(self, timeout: float = 5.0) -> bytes | None:
        """The next whole packet, or None if the broker closed the connection first."""
        deadline = time.monotonic() + timeout
        while True:
            packet = self._take()
            if packet is not None:
                return packet
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet from the broker")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return None
            if not chunk:
                return None
            self._buf += chunk

    def _take(self) -> bytes | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        length, mult, pos = 0, 1, 1
        while pos < len(buf):
            b = buf[pos]
            length += (b & 0x7F) * mult
            pos += 1
            if not b & 0x80:
                if len(buf) < pos + length:
                    return None
                self._buf = buf[pos + length :]
                return buf[: pos + length]
            mult *= 128
        return None

    def connect(self, client_id: str, *, clean_session: bool = True) -> bytes:
        """Send CONNECT; return the CONNACK (AssertionError if none came)."""
        self.send(connect_packet(client_id, clean_session=clean_session))
        connack = self.recv_packet()
        assert connack is not None, f"no CONNACK: {connack!r}"
        assert connack[0] == 0x20, f"no CONNACK: {connack!r}"
        return connack

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the broker closes the connection within ``timeout`` (packets it sends
        before closing are read and dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.recv_packet(timeout=max(0.01, deadline - time.monotonic())) is None:
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def alive(self) -> bool:
        """True if the broker still answers a PINGREQ on this connection."""
        try:
            self.send(PINGREQ)
            while True:
                packet = self.recv_packet()
                if packet is None:
                    return False
                if packet == PINGRESP:
                    return True
        except (OSError, TimeoutError):
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawMqtt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PACEGATE_TIMEOUT_S = 420.0  # a whole demo on the loaded 2-core machine, with room


def run_pacegate(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = PACEGATE_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """``python -m console ARGS`` as an operator runs it: captured, text, never raising on
    a non-zero exit (the tests assert on it)."""
    return subprocess.run(
        [sys.executable, "-m", "console", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        check=False,
    )
