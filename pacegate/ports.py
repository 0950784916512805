"""Where each service listens by default: the one endpoint table.

The service configs (broker, gateway, hospital, cloud) take their default host and port
from here, ``pacegate up`` prefers these ports when they are free (``console.stack``) and
writes the ones it chose to ``WORKDIR/endpoints.json`` under the names below
(``console.endpoints``), capture and the Wireshark dissectors default to them, and the
table in docs/operating.md ("Default endpoints") is checked against this one by
``tests/test_endpoint_table.py``. Tests never use these ports: they pick free ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Every default is loopback: nothing listens on a network interface until the operator
# names one in a config file (and the metrics endpoints refuse anything but loopback).
DEFAULT_HOST: Final = "127.0.0.1"


@dataclass(frozen=True)
class DefaultEndpoint:
    """One listener: its name in endpoints.json, the service that opens it, its default
    address, who connects to it, and why that port."""

    name: str
    service: str
    port: int
    clients: str
    why: str
    host: str = DEFAULT_HOST

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


MQTT: Final = DefaultEndpoint(
    "mqtt",
    "broker",
    8883,
    "devices, the gateway",
    "IANA's registered port for MQTT over TLS (secure-mqtt); what MQTT clients expect",
)
HOSPITAL: Final = DefaultEndpoint(
    "hospital",
    "hospital",
    8884,
    "the gateway (PQ channel)",
    "the PQ channel has no registered port: the one after MQTT's, so one firewall rule "
    "(8883-8885) covers the pipeline",
)
CLOUD: Final = DefaultEndpoint(
    "cloud",
    "cloud",
    8885,
    "the hospital's analysis (PQ channel)",
    "the next one after the hospital's, for the same reason",
)
GATEWAY_METRICS: Final = DefaultEndpoint(
    "gateway_metrics",
    "gateway",
    9108,
    "Prometheus",
    "in the 9100s where Prometheus exporters customarily listen; loopback only, since the "
    "metrics are served without authentication",
)
HOSPITAL_METRICS: Final = DefaultEndpoint(
    "hospital_metrics",
    "hospital",
    9109,
    "Prometheus",
    "beside the gateway's, for the same reasons",
)

# In the order of endpoints.json and of the docs' table.
DEFAULT_ENDPOINTS: Final = (MQTT, HOSPITAL, CLOUD, GATEWAY_METRICS, HOSPITAL_METRICS)

# The names the configs use (aliases of the table, never values of their own).
DEFAULT_MQTTS_PORT: Final = MQTT.port
DEFAULT_HOSPITAL_PORT: Final = HOSPITAL.port
DEFAULT_CLOUD_PORT: Final = CLOUD.port
DEFAULT_GATEWAY_METRICS_PORT: Final = GATEWAY_METRICS.port
DEFAULT_HOSPITAL_METRICS_PORT: Final = HOSPITAL_METRICS.port
