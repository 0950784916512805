"""The gateway's operator metrics, Prometheus text format over HTTP on loopback.

Each :class:`GatewayMetrics` has its own registry, so several gateways (tests) can live in one
process. Names are stable: the demo's live view and dashboards scrape them.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import generate_latest

from gateway.pipeline import REASONS

# From a message's arrival to its decision (pipeline only) and to its durable hand-off.
_RECEIVE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0)
_FORWARD_BUCKETS = (1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter("pacegate_gateway_received", "MQTT messages received", registry=r)
        self.accepted = Counter(
            "pacegate_gateway_accepted", "readings authenticated and opened", registry=r
        )
        self.flagged = Counter(
            "pacegate_gateway_flagged",
            "accepted readings flagged physiologically implausible (stored, not dropped)",
            registry=r,
        )
        self.rejected = Counter(
            "pacegate_gateway_rejected", "messages refused, by reason", ["reason"], registry=r
        )
        for reason in REASONS:
            self.rejected.labels(reason=reason)
        self.forwarded = Counter(
            "pacegate_gateway_forwarded",
            "readings the hospital acknowledged as durably stored",
            registry=r,
        )
        self.spooled = Gauge(
            "pacegate_gateway_spooled", "readings waiting in the encrypted spool", registry=r
        )
        self.spool_full = Counter(
            "pacegate_gateway_spool_full",
            "times the spool was full and the gateway paused MQTT",
            registry=r,
        )
        self.duplicates_held = Counter(
            "pacegate_gateway_duplicates_held",
            "copies of a not-yet-durable reading whose ack waited for the first copy's",
            registry=r,
        )
        self.hospital_up = Gauge(
            "pacegate_gateway_hospital_connected", "1 while the hospital channel is up", registry=r
        )
        self.mqtt_up = Gauge(
            "pacegate_gateway_mqtt_connected", "1 while the MQTT session is up", registry=r
        )
        self.reloads = Counter(
            "pacegate_gateway_config_reloads",
            "configuration reloads, by result",
            ["result"],
            registry=r,
        )
        self.receive_latency = Histogram(
            "pacegate_gateway_receive_latency_seconds",
            "from MQTT arrival to the pipeline's decision",
            buckets=_RECEIVE_BUCKETS,
            registry=r,
        )
        self.forward_latency = Histogram(
            "pacegate_gateway_forward_latency_seconds",
            "from MQTT arrival to durable hand-off (hospital ACK or spool)",
            buckets=_FORWARD_BUCKETS,
            registry=r,
        )
        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; return the bound port."""
        # exact int and str: socket.getaddrinfo refuses subclasses (ruamel.yaml scalars)
        server, _thread = start_http_server(int(port), addr=str(host), registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0.0 if absent): for tests and the summary line."""
        v = self.registry.get_sample_value(name, labels or None)
        return float(v) if v is not None else 0.0
