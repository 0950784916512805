"""``WORKDIR/endpoints.json``: where the services of a running stack listen.

``pacegate up``/``demo`` write it; ``pacegate devices``, ``capture`` and the demo's live view
read it. This module owns the format::

    {"mqtt": {"host": "127.0.0.1", "port": 8883}, "hospital": {...}, "cloud": {...},
     "gateway_metrics": {...}, "hospital_metrics": {...}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from console.workdir import WorkLayout
from pacegate.errors import ConfigError
from pacegate.ports import CLOUD, GATEWAY_METRICS, HOSPITAL, HOSPITAL_METRICS, MQTT


@dataclass(frozen=True)
class Endpoints:
    """Where each service of one stack listens; the defaults (and the field names, the
    names in the file) are the core's endpoint table, :data:`pacegate.ports.DEFAULT_ENDPOINTS`
    (``tests/test_endpoint_table.py`` keeps the two in step)."""

    mqtt: tuple[str, int] = MQTT.address
    hospital: tuple[str, int] = HOSPITAL.address
    cloud: tuple[str, int] = CLOUD.address
    gateway_metrics: tuple[str, int] = GATEWAY_METRICS.address
    hospital_metrics: tuple[str, int] = HOSPITAL_METRICS.address

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {name: {"host": h, "port": p} for name, (h, p) in vars(self).items()}

    def write(self, work: WorkLayout) -> None:
        work.endpoints.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def read_endpoints(work: WorkLayout) -> Endpoints | None:
    """The endpoints of ``work``'s stack, ``None`` if it never ran; a damaged file is a
    :class:`ConfigError` naming the entry and the fix."""
    path = work.endpoints
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            path,
            "",
            f"not valid JSON: {exc.msg}",
            line=exc.lineno,
            fix="delete it; 'pacegate up' writes it again",
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            path, "", "must be a JSON object", fix="delete it and rerun 'pacegate up'"
        )
    values: dict[str, tuple[str, int]] = {}
    for name in Endpoints.__dataclass_fields__:
        entry = data.get(name)
        if entry is None:
            continue  # an older file: keep the default for what it does not name
        host = entry.get("host") if isinstance(entry, dict) else None
        port = entry.get("port") if isinstance(entry, dict) else None
        if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(
                path,
                name,
                f"bad endpoint {entry!r}",
                fix='use {"host": "127.0.0.1", "port": 1-65535}',
            )
        values[name] = (host, port)
    return Endpoints(**values)


def parse_host_port(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8883`` for IPv6) as given to ``flag``, or a ConfigError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(None, flag, f"{text!r} is not HOST:PORT", fix="e.g. 127.0.0.1:8883")
    return host.strip("[]"), int(port)
