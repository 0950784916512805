"""Closing a revoked device's live session on Debian's mosquitto (2.0).

Mosquitto re-reads its CRL and ACL on SIGHUP, but a session that is already open survives
the reload: ``mosquitto_security_apply`` (src/security_default.c, 2.0.11) re-derives each
connected client's username from its certificate and never checks that certificate against
the new CRL. What does close it is the dynamic-security plugin that Debian ships
(``mosquitto_dynamic_security.so``): its ``disableClient`` command calls
``mosquitto_kick_client_by_username`` (plugins/dynamic-security/clients.c,
``dynsec_clients__process_disable``), and the username (set by pacegate's identity plugin) is
the certificate's CN, so every connection of the device is closed.

The plugin is configured to decide nothing itself: ``defaultACLAccess`` all false, no roles,
so its ACL check defers for every client (plugins/dynamic-security/acl.c, ``acl_check``) and
pacegate's ``acl_file`` alone decides. Only the ``mosquitto-admin`` certificate may publish
on ``$CONTROL/dynamic-security/#`` (the ACL); a device can reach none of it.

:func:`close_revoked_session` is what ``pacegate pki revoke`` does for a mosquitto serving
the PKI: SIGHUP (new CRL and ACL: the device cannot come back), then ``createClient`` +
``disableClient`` for the device over mTLS as ``mosquitto-admin``. It finds the broker by
the ``pid_file`` of the generated configuration and the TCP sockets that process listens
on, unless told the address.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from pacegate.identity import MOSQUITTO_ADMIN_ID, validate_device_id
from pacegate.layout import PkiLayout
from pacegate.tlsconf import client_context

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
# The plugin's own defaults let a client it knows receive everything (publishClientReceive
# true); all false makes it defer every decision to pacegate's acl_file.
DYNSEC_DEFAULT_ACL = (
    "publishClientSend",
    "publishClientReceive",
    "subscribe",
    "unsubscribe",
)
PLUGIN_NAME = "mosquitto_dynamic_security.so"
# Where Debian (multiarch), other distributions and a source build put the plugin.
PLUGIN_GLOBS = tuple(
    d + PLUGIN_NAME for d in ("usr/lib/*/", "usr/lib/", "usr/local/lib/*/", "usr/local/lib/")
)
# One round trip on loopback; generous because the machine may be loaded.
ADMIN_TIMEOUT = 10.0
ADMIN_ATTEMPTS = 3  # createClient/disableClient are idempotent: a retry is harmless
KEEPALIVE = 30
# After the SIGHUP: how long the broker may take to refuse the revoked certificate, and how
# long a probe waits for the refusal (an alert on loopback takes milliseconds; a probe that
# times out too early only costs another probe).
RELOAD_TIMEOUT = 10.0
PROBE_WAIT = 0.5
PROBE_INTERVAL = 0.1


class MosquittoAdminError(Exception):
    """The kick could not be done; the message says why and what the operator can do."""


def find_plugin() -> Path | None:
    """The dynamic-security plugin of the installed mosquitto, if there is one."""
    for pattern in PLUGIN_GLOBS:
        for candidate in sorted(Path("/").glob(pattern)):
            if candidate.is_file():
                return candidate
    return None


def initial_dynsec_config() -> str:
    """The plugin's configuration file as pacegate first writes it (mosquitto rewrites it
    on every command it accepts, so pacegate never writes it again)."""
    data = {
        "defaultACLAccess": [{"acltype": t, "allow": False} for t in DYNSEC_DEFAULT_ACL],
        "clients": [],
        "groups": [],
        "roles": [],
    }
    return json.dumps(data, indent=2) + "\n"


def disable_commands(device_id: str) -> bytes:
    """The control message that makes the plugin know the device (``createClient``; an
    error if it already does, which is harmless) and disable it, which kicks it."""
    validate_device_id(device_id)
    commands = [
        {"command": "createClient", "username": device_id},
        {"command": "disableClient", "username": device_id},
    ]
    return json.dumps({"commands": commands}).encode()


def disable_succeeded(response: bytes) -> tuple[bool, str]:
    """(done, detail) from the plugin's answer to :func:`disable_commands`."""
    try:
        answers = json.loads(response)["responses"]
    except (ValueError, KeyError, TypeError):
        return False, "unreadable answer from the dynamic-security plugin"
    for answer in answers if isinstance(answers, list) else []:
        if isinstance(answer, dict) and answer.get("command") == "disableClient":
            error = answer.get("error")
            return (error is None), (str(error) if error else "disabled")
    return False, "the dynamic-security plugin did not answer disableClient"


@dataclass(frozen=True)
class RunningMosquitto:
    pid: int
    host: str
    port: int


def _listen_address(pid: int) -> tuple[str, int] | None:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr:
            host = str(c.laddr[0])
            if host in ("0.0.0.0", "::"):  # any address: its loopback is one of them
                host = "127.0.0.1" if host == "0.0.0.0" else "::1"
            return host, int(c.laddr[1])
    return None


def running_mosquitto(layout: PkiLayout) -> RunningMosquitto | None:
    """The mosquitto serving this PKI: the live process named in its ``pid_file`` and the
    address it listens on; None if none runs (or it is not a mosquitto)."""
    pid_file = layout.mosquitto_pid
    try:
        pid = int(pid_file.read_text().strip())
        proc = psutil.Process(pid)
        if proc.name() != "mosquitto":
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    addr = _listen_address(pid)
    if addr is None:
        return None
    return RunningMosquitto(pid, *addr)


def _admin_request(layout: PkiLayout, host: str, port: int, payload: bytes) -> bytes:
    """Publish ``payload`` on the control topic as ``mosquitto-admin``; the plugin's answer."""
    ctx = client_context(layout.ca_cert, layout.mosquitto_admin_cert, layout.mosquitto_admin_key)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
        client_id=MOSQUITTO_ADMIN_ID,
        protocol=mqtt.MQTTv311,
    )
    client.tls_set_context(ctx)
    subscribed = threading.Event()
    answered = threading.Event()
    answer: list[bytes] = []
    refused: list[str] = []

    def on_connect(_c: object, _u: object, _f: object, rc: Any, _p: object) -> None:
        if getattr(rc, "is_failure", False):
            refused.append(str(rc))
            answered.set()
        else:
            client.subscribe(RESPONSE_TOPIC, qos=1)

    def on_subscribe(_c: object, _u: object, _m: int, rcs: list[Any], _p: object) -> None:
        if any(getattr(rc, "is_failure", False) for rc in rcs):
            refused.append("subscription to the control response refused")
            answered.set()
        else:
            subscribed.set()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        answer.append(bytes(msg.payload))
        answered.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe  # type: ignore[assignment]
    client.on_message = on_message
    try:
        client.connect(host, port, keepalive=KEEPALIVE)
    except OSError as exc:
        raise MosquittoAdminError(f"cannot reach mosquitto at {host}:{port}: {exc}") from None
    client.loop_start()
    try:
        _wait(subscribed, answered, f"no SUBACK from {host}:{port}")
        if refused:
            raise MosquittoAdminError(f"mosquitto at {host}:{port} refused: {refused[0]}")
        client.publish(CONTROL_TOPIC, payload, qos=1)
        if not answered.wait(ADMIN_TIMEOUT) or not answer:
            raise MosquittoAdminError(
                f"no answer on {RESPONSE_TOPIC} from {host}:{port}: is the dynamic-security "
                "plugin loaded (the 'plugin' line of the generated configuration)?"
            )
        return answer[0]
    finally:
        client.disconnect()
        client.loop_stop()


def _wait(ok: threading.Event, failed: threading.Event, what: str) -> None:
    for _ in range(int(ADMIN_TIMEOUT * 20)):
        if ok.is_set() or failed.is_set():
            return
        ok.wait(0.05)
    raise MosquittoAdminError(what)


def close_revoked_session(
    layout: PkiLayout,
    device_id: str,
    *,
    address: tuple[str, int] | None = None,
    send_signal: Callable[[int, int], None] = os.kill,
) -> str:
    """Make a running mosquitto forget ``device_id``: reload (CRL, ACL), then kick its live
    connections. Returns a line for the operator; raises :class:`MosquittoAdminError`."""
    found = running_mosquitto(layout)
    if found is None and address is None:
        raise MosquittoAdminError(
            f"no running mosquitto found for {layout.root} (its pid_file "
            f"{layout.mosquitto_pid} names no live mosquitto); pass --mosquitto HOST:PORT"
        )
    reloaded = ""
    if found is not None:
        try:
            send_signal(found.pid, signal.SIGHUP)
            reloaded = f"reloaded mosquitto (pid {found.pid}, SIGHUP), "
        except OSError as exc:
            raise MosquittoAdminError(
                f"cannot signal mosquitto pid {found.pid}: {exc}; run 'kill -HUP {found.pid}' "
                "as its user, then revoke's kick again with --mosquitto"
            ) from None
    host, port = address or (found.host, found.port)  # type: ignore[union-attr]
    # Kick only once the broker refuses the certificate, or the device would be back at once.
    # The signal is handled at mosquitto's next loop turn: on a loaded machine the admin
    # connection could otherwise be served before the reload.
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while (refused := _refuses_device(layout, host, port, device_id)) is False:
        if time.monotonic() > deadline:
            raise MosquittoAdminError(
                f"mosquitto at {host}:{port} still accepts {device_id}'s certificate "
                f"{RELOAD_TIMEOUT:.0f} s after the reload: does its crlfile name "
                f"{layout.crl}? (or reload it: kill -HUP <pid>, and run this again)"
            )
        time.sleep(PROBE_INTERVAL)
    last = ""
    for _ in range(ADMIN_ATTEMPTS):
        try:
            answer = _admin_request(layout, host, port, disable_commands(device_id))
        except MosquittoAdminError as exc:
            last = str(exc)
            continue
        done, detail = disable_succeeded(answer)
        if done:
            checked = "it refuses the certificate now, " if refused else ""
            return f"{reloaded}{checked}closed {device_id}'s live connections on {host}:{port}"
        last = f"mosquitto at {host}:{port} did not disable {device_id}: {detail}"
    raise MosquittoAdminError(last)


def _refuses_device(layout: PkiLayout, host: str, port: int, device_id: str) -> bool | None:
    """Whether the broker refuses the device's own certificate now (its bundle is in the
    PKI directory); None if the bundle is gone (flashed and deleted): nothing to probe."""
    cert, key = layout.device_cert(device_id), layout.device_key(device_id)
    if not (cert.exists() and key.exists()):
        return None
    ctx = client_context(layout.ca_cert, cert, key)
    try:
        with (
            socket.create_connection((host, port), timeout=ADMIN_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # TLS 1.3: the server judges the client certificate after the client's
            # handshake is done, and answers a refusal with an alert right away; an
            # accepted connection just waits for a CONNECT this probe never sends
            tls.settimeout(PROBE_WAIT)
            return tls.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # ssl.SSLError included: the handshake or the first read was refused
        return True
