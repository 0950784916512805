"""``pacegate trust serve`` and ``pacegate trust follow``: the CRL and the PSK store, from the
node that holds the CA to every edge node, with no shared filesystem (pacegate/trust.py says
why the transport needs no protection of its own; docs/scaling.md, "Trust material").

- ``serve --dir PKI --listen HOST:PORT``: plain HTTP, two read-only documents,
  ``/crl.pem`` and ``/psk.store``, read from the PKI at each request (so a revocation is
  offered the moment 'pacegate pki revoke' has written it). Nothing else is served.
- ``follow --from URL --dir NODE_PKI``: every ``--interval`` seconds, fetch both, judge them
  against the node's CA and key (:mod:`pacegate.trust`), and install what is newer and
  genuine, atomically. The node's broker and gateway already watch those files: the broker
  reloads its CRL and closes revoked connections, the gateway reloads its PSK store.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509

from pacegate.errors import ConfigError
from pacegate.keystore import generation_path
from pacegate.layout import PkiLayout, write_public, write_secret
from pacegate.log import security_event
from pacegate.trust import (
    CRL_PATH,
    MAX_DOCUMENT_BYTES,
    PSK_STORE_PATH,
    TrustUpdateRefused,
    judge_crl,
    judge_psk_store,
)

log = logging.getLogger("pacegate.trust")

# How often an edge node asks for news: a revocation is enforced on every node within about
# this plus the broker's CRL poll (1 s). Two seconds of two small GETs per node is nothing.
DEFAULT_FOLLOW_INTERVAL_S = 2.0
FETCH_TIMEOUT_S = 5.0
READY_MARK = "pacegate trust: serving"


# -- serve ------------------------------------------------------------------------------------
def _handler_for(pki: PkiLayout) -> type[BaseHTTPRequestHandler]:
    documents = {CRL_PATH: pki.crl, PSK_STORE_PATH: pki.psk_store}

    class TrustHandler(BaseHTTPRequestHandler):
        server_version = "pacegate-trust"
        sys_version = ""

        def do_GET(self) -> None:
            path = documents.get(self.path)
            if path is None:
                self.send_error(404, "only /crl.pem and /psk.store are served")
                return
            try:
                body = path.read_bytes()
            except OSError as exc:
                log.warning("cannot read %s: %s", path, exc)
                self.send_error(503, "not available")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return TrustHandler


def serve(pki: PkiLayout, host: str, port: int, stop: threading.Event) -> None:
    """Serve ``pki``'s CRL and PSK store until ``stop`` is set."""
    for path in (pki.ca_cert, pki.crl, pki.psk_store):
        if not path.exists():
            raise ConfigError(
                path, "", "not found", fix=f"run 'pacegate pki init --dir {pki.root}'"
            )
    server = ThreadingHTTPServer((host, port), _handler_for(pki))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="trust-serve", daemon=True)
    thread.start()
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    log.info("%s %s on %s:%d", READY_MARK, pki.root, bound_host, bound_port)
    print(f"{READY_MARK} {pki.root} on http://{bound_host}:{bound_port}", flush=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()


# -- follow -----------------------------------------------------------------------------------
@dataclass
class FollowStats:
    """What a follower did (its counters are the ``pacegate_trust_*`` figures it logs)."""

    fetches: int = 0
    fetch_failures: int = 0
    installed: dict[str, int] = field(default_factory=lambda: {"crl": 0, "psk_store": 0})
    refused: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)


class Follower:
    """One edge node's copy of the trust material, kept up with a trust server."""

    def __init__(self, source: str, node: PkiLayout) -> None:
        if not source.startswith(("http://", "https://")):
            raise ConfigError(None, "--from", f"{source!r} is not an http(s) URL")
        self.source = source.rstrip("/")
        self.node = node
        self.stats = FollowStats()
        try:
            self.ca = x509.load_pem_x509_certificate(node.ca_cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                node.ca_cert,
                "",
                f"cannot load the CA certificate: {exc}",
                fix="provision the node with the CA's certificate (ca.crt) first",
            ) from None

    def _fetch(self, path: str) -> bytes | None:
        self.stats.fetches += 1
        try:
            # an http(s) URL only (checked in __init__): no file: or custom scheme
            url = self.source + path
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310
                body: bytes = resp.read(MAX_DOCUMENT_BYTES + 1)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            self.stats.fetch_failures += 1
            log.warning("trust: cannot fetch %s%s: %s", self.source, path, exc)
            return None
        return body

    def _refused(self, what: str, exc: TrustUpdateRefused) -> None:
        self.stats.refused[exc.reason] = self.stats.refused.get(exc.reason, 0) + 1
        security_event(
            "trust_update_refused",
            component="trust",
            reason=exc.reason,
            peer=self.source,
            document=what,
            detail=str(exc),
        )

    def poll_once(self) -> None:
        """Fetch both documents once and install whichever is newer and genuine."""
        offered = self._fetch(CRL_PATH)
        if offered is not None:
            current = self.node.crl.read_bytes() if self.node.crl.exists() else None
            try:
                verdict = judge_crl(current, offered, self.ca)
            except TrustUpdateRefused as exc:
                self._refused("crl", exc)
            else:
                self.stats.versions["crl"] = verdict.version
                if verdict.install:
                    write_public(self.node.crl, offered)
                    self.stats.installed["crl"] += 1
                    log.info("trust: installed CRL number %d from %s", verdict.version, self.source)
        offered = self._fetch(PSK_STORE_PATH)
        if offered is not None:
            try:
                verdict = judge_psk_store(offered, self.node.psk_store, self.node.psk_store_key)
            except TrustUpdateRefused as exc:
                self._refused("psk_store", exc)
            else:
                self.stats.versions["psk_store"] = verdict.version
                if verdict.install:
                    # the store first, then its generation (as PskStore.save): a crash
                    # between the two leaves a newer store under an older record, which loads
                    write_secret(self.node.psk_store, offered)
                    write_secret(
                        generation_path(self.node.psk_store_key), f"{verdict.version}\n".encode()
                    )
                    self.stats.installed["psk_store"] += 1
                    log.info(
                        "trust: installed PSK store generation %d from %s",
                        verdict.version,
                        self.source,
                    )

    def run(self, stop: threading.Event, interval: float = DEFAULT_FOLLOW_INTERVAL_S) -> None:
        while not stop.is_set():
            started = time.monotonic()
            self.poll_once()
            stop.wait(max(0.0, interval - (time.monotonic() - started)))


# -- provision --------------------------------------------------------------------------------
def edge_node_files(pki: PkiLayout) -> list[Path]:
    """What an edge node (a broker and a gateway) holds of the PKI, and nothing more: never
    the CA's key, no device key, no device PSK in clear (they are in the encrypted store)."""
    return [
        pki.ca_cert,
        pki.crl,
        pki.broker_cert,
        pki.broker_key,
        pki.gateway_cert,
        pki.gateway_key,
        pki.psk_store,
        pki.psk_store_key,
        generation_path(pki.psk_store_key),
        pki.channel_key("gateway"),
        pki.channel_pub("gateway"),
        pki.channel_pub("hospital"),
    ]


def provision_edge_node(pki: PkiLayout, node: PkiLayout) -> list[Path]:
    """Copy :func:`edge_node_files` from ``pki`` into the edge node's own directory
    ``node`` (secrets 0600, the rest 0644); returns what was written."""
    written = []
    for src in edge_node_files(pki):
        dst = node.root / src.relative_to(pki.root)
        try:
            data = src.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                src, "", "not found", fix=f"run 'pacegate pki init --dir {pki.root}'"
            ) from None
        secret = src.suffix in (".key",) or src.parent == pki.keystore_dir
        (write_secret if secret else write_public)(dst, data)
        written.append(dst)
    node.root.chmod(0o700)
    return written


# -- CLI --------------------------------------------------------------------------------------
def _stop_on_signals() -> threading.Event:
    """Set on SIGINT or SIGTERM (the main thread's waits wake for it)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _sig, _frame: stop.set())
    return stop


def cli_serve(args: argparse.Namespace) -> int:
    from console.endpoints import parse_host_port

    host, port = parse_host_port(args.listen, "--listen")
    stop = _stop_on_signals()
    serve(PkiLayout(args.dir), host, port, stop)
    return 0


def cli_provision(args: argparse.Namespace) -> int:
    written = provision_edge_node(PkiLayout(args.dir), PkiLayout(args.to))
    print(f"pacegate trust: {len(written)} files for an edge node in {args.to}")
    return 0


def cli_follow(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise ConfigError(None, "--interval", f"must be > 0 s, got {args.interval}")
    follower = Follower(args.source, PkiLayout(args.dir))
    if args.once:
        follower.poll_once()
        return 0 if follower.stats.fetch_failures == 0 and not follower.stats.refused else 1
    follower.run(_stop_on_signals(), args.interval)
    return 0
