"""The ``pacegate`` command line: one entry point, the contract of ARCHITECTURE.md.

Each command names the function that runs it as ``"module:function"``; the module is
imported only when its command runs, so ``pacegate pki`` does not pay for TenSEAL.
A command function takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pacegate import __version__
from pacegate.errors import ConfigError, PacegateError
from pacegate.log import configure_logging

Command = Callable[[argparse.Namespace], int]
DEFAULT_DEMO_WORKDIR = "pacegate-demo"


def _add(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, target: str, help_: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(target=target)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacegate",
        description="Zero-trust pipeline for connected pacemakers: sealed readings over mTLS MQTT, "
        "a post-quantum gateway-to-hospital channel, Fernet at rest, CKKS analytics.",
    )
    parser.add_argument("--version", action="version", version=f"pacegate {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("PACEGATE_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (readings appear in logs only at DEBUG, never above)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=os.environ.get("PACEGATE_LOG_JSON") == "1",
        help="structured logs: one JSON object per line on stderr",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --- PKI -----------------------------------------------------------------------------
    pki = sub.add_parser("pki", help="the certificate authority, device enrolment, revocation")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    p = _add(
        pki_sub,
        "init",
        "pacegate.pki:cli_init",
        "create the CA, the broker and gateway identities and the PQ-channel identities",
    )
    p.add_argument("--dir", required=True, type=Path, help="PKI directory to create")
    p.add_argument("--force", action="store_true", help="overwrite an existing CA (destroys it)")
    p.add_argument(
        "--broker-host",
        action="append",
        dest="broker_hosts",
        metavar="NAME_OR_IP",
        help="a DNS name or IP the broker certificate must cover "
        "(repeatable; default: localhost, 127.0.0.1, ::1)",
    )
    p = _add(
        pki_sub,
        "enroll",
        "pacegate.pki:cli_enroll",
        "issue a device certificate, key and fresh 32-byte PSK",
    )
    p.add_argument("device_id")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--days", type=int, default=90, help="certificate validity (default 90 days)")
    p = _add(
        pki_sub,
        "revoke",
        "pacegate.pki:cli_revoke",
        "revoke a device: the broker refuses it and the gateway drops its readings",
    )
    p.add_argument("device_id")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument(
        "--mosquitto",
        metavar="HOST:PORT",
        help="the mosquitto whose live session of the device to close (default: the one "
        "running with this PKI's generated configuration, found by its pid_file)",
    )

    # --- services ------------------------------------------------------------------------
    p = _add(sub, "broker", "pacegate.broker.server:main", "run the embedded amqtt MQTTS broker")
    p.add_argument("-c", "--config", type=Path, default=Path("broker.yaml"))
    p = _add(
        sub,
        "gateway",
        "gateway.service:main",
        "run the gateway: MQTT subscriber, PSK opening, PQ channel to the hospital",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    hosp = sub.add_parser("hospital", help="run the hospital ingest service, or maintain its store")
    hosp.set_defaults(target="hospital.service:main")
    hosp.add_argument("-c", "--config", type=Path)
    hosp_sub = hosp.add_subparsers(dest="hospital_command", metavar="ACTION")
    p = _add(
        hosp_sub,
        "rotate-key",
        "hospital.store:cli_rotate_key",
        "add a new at-rest key and re-encrypt every row online",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument(
        "--keep-old", action="store_true", help="keep the older keys in the keyring afterwards"
    )
    p = _add(
        hosp_sub,
        "verify",
        "hospital.store:cli_verify",
        "check the hash chain: detect deleted or reordered rows",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p = _add(sub, "cloud", "cloud.worker:main", "run the CKKS cloud worker (public context only)")
    p.add_argument("-c", "--config", type=Path, required=True)

    cfg = sub.add_parser("config", help="check configuration files")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = _add(
        cfg_sub,
        "check",
        "gateway.config:cli_check",
        "validate a gateway.yaml and report every error with file, line, key and fix",
    )
    p.add_argument("file", type=Path)
    p.add_argument(
        "--schema-only",
        action="store_true",
        help="check the schema only, not that the certificate and key files exist",
    )

    # --- the whole stack -----------------------------------------------------------------
    p = _add(
        sub,
        "up",
        "pacegate.stack:cli_up",
        "run broker, hospital, cloud and gateway together until SIGINT/SIGTERM",
    )
    p.add_argument("--workdir", type=Path, required=True)
    p = _add(sub, "devices", "device_sim.fleet:main", "run N simulated pacemakers")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--rate", type=float, default=1.0, help="readings per second per device")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--seed", type=int, default=0, help="physiological model seed (default 0)")
    p.add_argument(
        "--counter-block",
        type=int,
        default=1024,
        help="nonce counters reserved per flash write (default 1024; see docs/devices.md)",
    )
    p = _add(
        sub,
        "analyze",
        "hospital.analysis:main",
        "hospital -> cloud CKKS analysis, validated against plaintext",
    )
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--since", help="ISO 8601 timestamp (inclusive)")
    p.add_argument("--until", help="ISO 8601 timestamp (exclusive)")
    p.add_argument("--json", action="store_true")
    p = _add(
        sub,
        "demo",
        "pacegate.stack:cli_demo",
        "the main job: PKI, broker, hospital, cloud, gateway, devices, analysis",
    )
    p.add_argument("--workdir", type=Path, default=Path(DEFAULT_DEMO_WORKDIR))
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rate", type=float, default=2.0, help="readings per second per device")
    p.add_argument("--json", action="store_true")
    p = _add(
        sub,
        "capture",
        "pacegate.capture:main",
        "capture pacegate's loopback traffic with tshark and verify it",
    )
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path("pacegate-capture.pcapng"))
    p.add_argument("--keylog", type=Path, help="TLS key log to decrypt with (SSLKEYLOGFILE)")
    p.add_argument("--workdir", type=Path, help="run a demo in this workdir while capturing")
    p.add_argument("--json", action="store_true")
    return parser


def _resolve(target: str) -> Command:
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    func: Command = getattr(module, func_name)
    return func


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json)
    target: str = args.target
    if target == "hospital.service:main" and args.config is None:
        parser.error("hospital: -c/--config is required")
    try:
        return _resolve(target)(args)
    except ConfigError as exc:
        print(f"pacegate: configuration error: {exc}", file=sys.stderr)
        return 2
    except PacegateError as exc:
        print(f"pacegate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
