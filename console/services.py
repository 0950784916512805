"""``pacegate broker|gateway|hospital|cloud -c FILE``: one long-running service per process.

Each command loads its component's config, refuses a busy port with one clear line, then
runs the component's ``run(config, stop)`` until SIGINT/SIGTERM sets ``stop``. The signal
wiring lives here, once: the components take an event and never touch signals.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from console.runstate import ensure_port_free


def _until_signalled(
    start: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    *,
    on_hup: Callable[[], None] | None = None,
) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if on_hup is not None:
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        await start(stop)

    asyncio.run(main())
    return 0


def broker(args: argparse.Namespace) -> int:
    """``pacegate broker -c broker.yaml``: the embedded MQTTS broker."""
    from broker.config import load_broker_config
    from broker.server import run

    cfg = load_broker_config(Path(args.config))
    ensure_port_free("broker", cfg.host, cfg.port, where=f"'port:' in {args.config}")
    return _until_signalled(lambda stop: run(cfg, stop))


def gateway(args: argparse.Namespace) -> int:
    """``pacegate gateway -c FILE``: run until SIGINT/SIGTERM; SIGHUP reloads the file."""
    from gateway.config import load_gateway_config
    from gateway.service import Gateway

    cfg = load_gateway_config(args.config)
    m = cfg.metrics
    if m.enabled:
        ensure_port_free("gateway metrics", m.host, m.port, where=f"metrics.port in {args.config}")
    gw = Gateway(cfg)
    return _until_signalled(gw.run, on_hup=gw.request_reload)


def hospital(args: argparse.Namespace) -> int:
    """``pacegate hospital -c FILE`` (its ``verify``/``rotate-key``/``export`` actions are in
    :mod:`console.hospital_admin`)."""
    from hospital.config import load_hospital_config
    from hospital.service import run

    cfg = load_hospital_config(args.config, require_channel_files=True)
    for what, host, port, key in (
        ("hospital", cfg.listen_host, cfg.listen_port, "listen.port"),
        ("hospital metrics", cfg.metrics_host, cfg.metrics_port, "metrics.port"),
    ):
        ensure_port_free(what, host, port, where=f"{key} in {args.config}")
    return _until_signalled(lambda stop: run(cfg, stop))


def cloud(args: argparse.Namespace) -> int:
    """``pacegate cloud -c cloud.yaml``: the CKKS worker, until SIGINT/SIGTERM."""
    from cloud.config import load_cloud_config
    from cloud.worker import run

    cfg = load_cloud_config(args.config)
    ensure_port_free("cloud", cfg.host, cfg.port, where=f"listen.port in {args.config}")
    return _until_signalled(lambda stop: run(cfg, stop))
