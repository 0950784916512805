"""The work directory that ``pacegate up``/``demo`` lay out, and the service configs written
into it.

Operator layer: the components never see a work directory; each takes its own config file
(whose relative paths resolve against its directory). The templates themselves belong to the
modules that own each config schema; this module only says where in the work directory each
file goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloud.config import render_default_config as _cloud_config
from gateway.config_template import render_default_config as _gateway_config
from hospital.config import render_default_config as _hospital_config
from pacegate.layout import PkiLayout
from pacegate.ports import (
    DEFAULT_CLOUD_PORT,
    DEFAULT_HOSPITAL_METRICS_PORT,
    DEFAULT_HOSPITAL_PORT,
    DEFAULT_HOST,
)


@dataclass(frozen=True)
class WorkLayout:
    root: Path

    @property
    def pki(self) -> PkiLayout:
        return PkiLayout(self.root / "pki")

    @property
    def broker_config(self) -> Path:
        return self.root / "broker.yaml"

    @property
    def gateway_config(self) -> Path:
        return self.root / "gateway.yaml"

    @property
    def hospital_config(self) -> Path:
        return self.root / "hospital.yaml"

    @property
    def cloud_config(self) -> Path:
        return self.root / "cloud.yaml"

    @property
    def gateway_dir(self) -> Path:
        return self.root / "gateway"

    @property
    def hospital_dir(self) -> Path:
        return self.root / "hospital"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def endpoints(self) -> Path:
        """JSON written by ``pacegate up``: where each running service listens, e.g.
        ``{"mqtt": {"host": "127.0.0.1", "port": 8883}, "hospital": {...}, "cloud": {...},
        "gateway_metrics": {...}}``. ``devices`` and ``analyze`` read it; absent, they use
        the defaults above."""
        return self.root / "endpoints.json"


def gateway_config_text(
    work: WorkLayout,
    *,
    mqtt_host: str,
    mqtt_port: int,
    hospital_host: str,
    hospital_port: int,
    metrics_port: int,
) -> str:
    """The work directory's gateway.yaml."""
    return _gateway_config(
        work.gateway_config,
        pki=work.pki,
        state_dir=work.gateway_dir,
        mqtt_host=mqtt_host,
        mqtt_port=mqtt_port,
        hospital_host=hospital_host,
        hospital_port=hospital_port,
        metrics_port=metrics_port,
    )


def hospital_config_text(
    work: WorkLayout,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_HOSPITAL_PORT,
    metrics_port: int = DEFAULT_HOSPITAL_METRICS_PORT,
    cloud_host: str = DEFAULT_HOST,
    cloud_port: int = DEFAULT_CLOUD_PORT,
) -> str:
    """The work directory's hospital.yaml."""
    return _hospital_config(
        work.hospital_config,
        pki=work.pki,
        data_dir=work.hospital_dir,
        host=host,
        port=port,
        metrics_port=metrics_port,
        cloud_host=cloud_host,
        cloud_port=cloud_port,
    )


def cloud_config_text(
    work: WorkLayout, *, host: str = DEFAULT_HOST, port: int = DEFAULT_CLOUD_PORT
) -> str:
    """The work directory's cloud.yaml."""
    return _cloud_config(work.cloud_config, pki=work.pki, host=host, port=port)
