"""The ``pacegate`` command line: one entry point, the contract of ARCHITECTURE.md.

Each command runs one function of the operator layer (``console``), imported only when
its command runs, so ``pacegate pki`` does not pay for TenSEAL. A command function takes
the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from pacegate import __version__
from pacegate.errors import ConfigError, PacegateError
from pacegate.log import configure_logging

Command = Callable[[argparse.Namespace], int]
DEFAULT_DEMO_WORKDIR = "pacegate-demo"

# Flag limits, checked by argparse before anything starts (a demo used to build the PKI and
# start four services before its fleet refused --devices 0).
# 1,000 readings/s per device is far past any implant's telemetry; above it asyncio's
# millisecond timers, not the model, set the pace, and the fleet's buffers overflow.
MAX_RATE_HZ = 1000.0
# A run longer than a day is an operator's typo (seconds taken for minutes, say).
MAX_DURATION_S = 86_400.0
# Devices in one fleet process: bench_devices runs 2,000; ten times that exhausts file
# descriptors and memory before it tells anything.
MAX_DEVICES = 20_000
# Nonce counters reserved per flash write: more than a million wastes the 2^64 space no
# faster than it matters, but a typo of extra zeros is caught.
MAX_COUNTER_BLOCK = 1 << 20
# Devices enrolled by one 'pki enroll --count': one lock, one PSK-store and one CRL write.
MAX_ENROLL_COUNT = 100_000


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _positive_float(hi: float, unit: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or not 0 < value <= hi:
            raise argparse.ArgumentTypeError(
                f"must be more than 0 and at most {hi:g} {unit}, got {text}"
            )
        return value

    parse.__name__ = "number"
    return parse


# The range of each numeric flag, by name, for every command that has it: one table, so a
# new command's --rate is checked like the others without repeating the rule.
FLAG_TYPES: dict[str, Callable[[str], object]] = {
    "--count": _int_in(1, MAX_DEVICES),
    "--devices": _int_in(1, MAX_DEVICES),
    "--rate": _positive_float(MAX_RATE_HZ, "readings/s"),
    "--duration": _positive_float(MAX_DURATION_S, "s"),
    "--counter-block": _int_in(1, MAX_COUNTER_BLOCK),
    "--days": _int_in(1, 3650),
}


def _check_numeric_flags(parser: argparse.ArgumentParser) -> None:
    """Give every plain ``int``/``float`` flag named in :data:`FLAG_TYPES` its checked type
    (a flag with its own type keeps it), in every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _check_numeric_flags(sub)
        elif action.type in (int, float):
            for option in action.option_strings:
                if option in FLAG_TYPES:
                    action.type = FLAG_TYPES[option]


class _Parser(argparse.ArgumentParser):
    """argparse, with a flag error on one line: the usage it prints first runs to several
    lines and buries the error; ``--help`` still shows it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (fix: see '{self.prog} --help')\n")


# Each command's function, imported only when its command runs (``pacegate pki`` does not
# pay for TenSEAL): a plain function per command, so mypy checks every call.
def _pki_init(args: argparse.Namespace) -> int:
    from console import pki_admin

    return pki_admin.cli_init(args)


def _pki_enroll(args: argparse.Namespace) -> int:
    from console import pki_admin

    return pki_admin.cli_enroll(args)


def _pki_rekey_device(args: argparse.Namespace) -> int:
    from console import pki_admin

    return pki_admin.cli_rekey_device(args)


def _pki_revoke(args: argparse.Namespace) -> int:
    from console import pki_admin

    return pki_admin.cli_revoke(args)


def _broker(args: argparse.Namespace) -> int:
    from console import services

    return services.broker(args)


def _gateway(args: argparse.Namespace) -> int:
    from console import services

    return services.gateway(args)


def _hospital(args: argparse.Namespace) -> int:
    from console import services

    return services.hospital(args)


def _hospital_rotate_key(args: argparse.Namespace) -> int:
    from console import hospital_admin

    return hospital_admin.cli_rotate_key(args)


def _hospital_verify(args: argparse.Namespace) -> int:
    from console import hospital_admin

    return hospital_admin.cli_verify(args)


def _hospital_export(args: argparse.Namespace) -> int:
    from console import hospital_admin

    return hospital_admin.cli_export(args)


def _cloud(args: argparse.Namespace) -> int:
    from console import services

    return services.cloud(args)


def _config_check(args: argparse.Namespace) -> int:
    from console import config_admin

    return config_admin.cli_check(args)


def _config_schema(args: argparse.Namespace) -> int:
    from console import config_admin

    return config_admin.cli_schema(args)


def _config_example(args: argparse.Namespace) -> int:
    from console import config_admin

    return config_admin.cli_example(args)


def _status(args: argparse.Namespace) -> int:
    from console import status

    return status.cli_status(args)


def _up(args: argparse.Namespace) -> int:
    from console import stack

    return stack.cli_up(args)


def _demo(args: argparse.Namespace) -> int:
    from console import stack

    return stack.cli_demo(args)


def _capture(args: argparse.Namespace) -> int:
    from console import capture

    return capture.main(args)


def _wireshark_install(args: argparse.Namespace) -> int:
    from console import wireshark

    return wireshark.cli_install(args)


def _devices(args: argparse.Namespace) -> int:
    from console import devices

    return devices.main(args)


def _analyze(args: argparse.Namespace) -> int:
    from console import analyze

    return analyze.main(args)


def _cluster_up(args: argparse.Namespace) -> int:
    from console import cluster

    return cluster.cli_up(args)


def _trust_serve(args: argparse.Namespace) -> int:
    from console import trust

    return trust.cli_serve(args)


def _trust_provision(args: argparse.Namespace) -> int:
    from console import trust

    return trust.cli_provision(args)


def _trust_follow(args: argparse.Namespace) -> int:
    from console import trust

    return trust.cli_follow(args)


def _add(
    sub: argparse._SubParsersAction[_Parser], name: str, target: Command, help_: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(target=target)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        _pki_init,
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
        _pki_enroll,
        "issue a device certificate, key and fresh 32-byte PSK",
    )
    p.add_argument("device_ids", nargs="*", metavar="DEVICE_ID", help="one or more device ids")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument(
        "--count",
        type=_int_in(1, MAX_ENROLL_COUNT),
        help="enroll N devices named PREFIX0001, PREFIX0002, ... (the next free numbers)",
    )
    p.add_argument("--prefix", default="pm-", help="id prefix for --count (default pm-)")
    p.add_argument("--days", type=int, default=90, help="certificate validity (default 90 days)")
    p = _add(
        pki_sub,
        "rekey-device",
        _pki_rekey_device,
        "give a device a new PSK and a fresh counter file (the recovery for a lost or "
        "damaged counter.state)",
    )
    p.add_argument("device_id")
    p.add_argument("--dir", required=True, type=Path)
    p = _add(
        pki_sub,
        "revoke",
        _pki_revoke,
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

    # --- several nodes on one machine -----------------------------------------------------
    cluster = sub.add_parser(
        "cluster", help="the multi-node topology on one machine (edges, hospitals, workers)"
    )
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    p = _add(
        cluster_sub,
        "up",
        _cluster_up,
        "start N edge nodes (broker + gateway), M hospital nodes on one PostgreSQL, the cloud "
        "(on K Dask workers), each node supervised; Ctrl-C stops",
    )
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--edges", type=int, default=2)
    p.add_argument("--hospitals", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="Dask workers (0: sum in process)")

    # --- trust material between nodes ----------------------------------------------------
    trust = sub.add_parser(
        "trust", help="the CRL and PSK store, from the CA's node to every edge node"
    )
    trust_sub = trust.add_subparsers(dest="trust_command", required=True, metavar="ACTION")
    p = _add(
        trust_sub,
        "serve",
        _trust_serve,
        "offer this PKI's CRL and PSK store over HTTP (/crl.pem, /psk.store)",
    )
    p.add_argument("--dir", required=True, type=Path, help="the PKI that holds the CA")
    p.add_argument("--listen", default="127.0.0.1:8890", metavar="HOST:PORT")
    p = _add(
        trust_sub,
        "provision",
        _trust_provision,
        "copy what an edge node needs of the PKI (never the CA key) into its own directory",
    )
    p.add_argument("--dir", required=True, type=Path, help="the PKI that holds the CA")
    p.add_argument("--to", required=True, type=Path, help="the edge node's directory")
    p = _add(
        trust_sub,
        "follow",
        _trust_follow,
        "keep an edge node's CRL and PSK store up with a trust server (newer, genuine only)",
    )
    p.add_argument("--from", dest="source", required=True, metavar="URL")
    p.add_argument("--dir", required=True, type=Path, help="the edge node's PKI copy")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    p.add_argument("--once", action="store_true", help="poll once; exit 1 if it failed")

    # --- services ------------------------------------------------------------------------
    p = _add(sub, "broker", _broker, "run the embedded amqtt MQTTS broker")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-c", "--config", type=Path, help="broker.yaml (default ./broker.yaml)")
    where.add_argument(
        "--workdir", type=Path, help="use WORKDIR/broker.yaml (written by 'pacegate up')"
    )
    p = _add(
        sub,
        "gateway",
        _gateway,
        "run the gateway: MQTT subscriber, PSK opening, PQ channel to the hospital",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    hosp = sub.add_parser("hospital", help="run the hospital ingest service, or maintain its store")
    hosp.set_defaults(target=_hospital)
    hosp.add_argument("-c", "--config", type=Path)
    hosp_sub = hosp.add_subparsers(dest="hospital_command", metavar="ACTION")
    p = _add(
        hosp_sub,
        "rotate-key",
        _hospital_rotate_key,
        "add a new at-rest key and re-encrypt every row online",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument(
        "--keep-old", action="store_true", help="keep the older keys in the keyring afterwards"
    )
    p.add_argument(
        "--integrity",
        action="store_true",
        help="also rotate the integrity key: re-key every row and the chain (ingest waits)",
    )
    p = _add(
        hosp_sub,
        "verify",
        _hospital_verify,
        "check the hash chain: detect deleted or reordered rows",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument(
        "--expect-head",
        metavar="VERSION:SEQ:CHAIN",
        help="a head an earlier verify printed, recorded off this host: fail if the store "
        "is behind it or its chain differs",
    )
    p.add_argument(
        "--reanchor",
        action="store_true",
        help="after a deliberate restore: accept the current head as the anchor, "
        "if the chain inside the database verifies",
    )
    p = _add(
        hosp_sub,
        "export",
        _hospital_export,
        "the decrypted readings, one per line (clear text), if the chain verifies",
    )
    p.add_argument("-c", "--config", type=Path, required=True)
    p.add_argument("--since", help="ISO 8601 time, inclusive (UTC when no zone)")
    p.add_argument("--until", help="ISO 8601 time, exclusive (UTC when no zone)")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--out", type=Path, help="write to this file (mode 0600) instead of stdout")
    p.add_argument(
        "--allow-damaged",
        action="store_true",
        help="export a store whose chain does not verify, each damaged row marked",
    )
    p = _add(sub, "cloud", _cloud, "run the CKKS cloud worker (public context only)")
    p.add_argument("-c", "--config", type=Path, required=True)

    cfg = sub.add_parser("config", help="check configuration files")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = _add(
        cfg_sub,
        "check",
        _config_check,
        "validate a gateway.yaml and report every error with file, line, key and fix",
    )
    p.add_argument("file", type=Path)
    p.add_argument(
        "--schema-only",
        action="store_true",
        help="check the schema only, not that the certificate and key files exist",
    )
    p = _add(
        cfg_sub,
        "schema",
        _config_schema,
        "write the JSON Schema of gateway.yaml (for editors), generated from gateway/config.py",
    )
    p.add_argument("--out", type=Path, help="write it here (default: standard output)")
    p = _add(
        cfg_sub,
        "example",
        _config_example,
        "write the commented gateway.example.yaml, rendered from gateway/config_template.py",
    )
    p.add_argument("--out", type=Path, help="write it here (default: standard output)")

    p = _add(
        sub,
        "status",
        _status,
        "which services of a work directory's stack are up: PIDs, ports, uptime, counters",
    )
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.add_argument(
        "--wait",
        type=_positive_float(3600.0, "s"),
        metavar="SECONDS",
        help="wait up to SECONDS for every service to be up (exit 1 if they are not)",
    )

    # --- the whole stack -----------------------------------------------------------------
    p = _add(
        sub,
        "up",
        _up,
        "run broker, hospital, cloud and gateway together until SIGINT/SIGTERM",
    )
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument(
        "--broker",
        choices=("embedded", "mosquitto"),
        default="embedded",
        help="the embedded broker (end-to-end acknowledgement, default) or Debian's "
        "Mosquitto with WORKDIR/mosquitto.conf",
    )
    p = _add(sub, "devices", _devices, "run N simulated pacemakers")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--rate", type=float, default=1.0, help="readings per second per device")
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--seed", type=int, default=0, help="physiological model seed (default 0)")
    p.add_argument(
        "--broker",
        action="append",
        metavar="HOST:PORT",
        help="a broker or edge node to connect to; repeat it for several: each device starts "
        "at its home node (by device id) and fails over to the next (default: WORKDIR's broker)",
    )
    p.add_argument(
        "--skip",
        type=int,
        default=0,
        help="leave out the first N enrolled devices (several simulator processes, one PKI)",
    )
    p.add_argument(
        "--counter-block",
        type=int,
        default=1024,
        help="nonce counters reserved per flash write (default 1024; see docs/devices.md)",
    )
    p.add_argument(
        "--acked-log",
        type=Path,
        help="append each acknowledged reading to FILE as a JSON line "
        '{"device_id": ..., "counter": ...} (to audit that acknowledged means stored)',
    )
    p.add_argument(
        "--drain",
        type=float,
        default=5.0,
        help="seconds to wait for outstanding PUBACKs after --duration (default 5)",
    )
    p = _add(
        sub,
        "analyze",
        _analyze,
        "hospital -> cloud CKKS analysis, validated against plaintext",
    )
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--since", help="ISO 8601 timestamp (inclusive)")
    p.add_argument("--until", help="ISO 8601 timestamp (exclusive)")
    p.add_argument("--json", action="store_true")
    p = _add(
        sub,
        "demo",
        _demo,
        "the main job: PKI, broker, hospital, cloud, gateway, devices, analysis",
    )
    p.add_argument("--workdir", type=Path, default=Path(DEFAULT_DEMO_WORKDIR))
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rate", type=float, default=2.0, help="readings per second per device")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="on the multi-node topology (2 edge nodes, 2 hospital nodes on PostgreSQL, the "
        "cloud; a fresh --workdir): every acknowledged reading is looked up in the store",
    )
    p.add_argument(
        "--chaos",
        action="store_true",
        help="with --cluster: SIGKILL an edge node, a hospital node and a Dask worker mid-run",
    )
    p = _add(
        sub,
        "capture",
        _capture,
        "capture pacegate's loopback traffic with tshark and verify it",
    )
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path("pacegate-capture.pcapng"))
    p.add_argument("--keylog", type=Path, help="TLS key log to decrypt with (SSLKEYLOGFILE)")
    p.add_argument("--workdir", type=Path, help="run a demo in this workdir while capturing")
    p.add_argument("--json", action="store_true")
    ws = sub.add_parser("wireshark", help="pacegate's Wireshark dissectors (Lua)")
    ws_sub = ws.add_subparsers(dest="wireshark_command", required=True, metavar="ACTION")
    p = _add(
        ws_sub,
        "install",
        _wireshark_install,
        "copy the sealed-reading and PQ-channel dissectors where Wireshark looks for Lua plugins",
    )
    p.add_argument(
        "--dir", type=Path, help="install here instead (default: from tshark -G folders)"
    )
    p.add_argument("--json", action="store_true")
    return parser


# "[Errno 98] error while attempting to bind on address ('127.0.0.1', 8883): address ..."
_BIND_ADDRESS = re.compile(r"\(\s*'([^']*)',\s*(\d+)")


def _address_in_use_cause(exc: BaseException) -> OSError | None:
    seen: BaseException | None = exc
    for _ in range(10):  # a cause chain is short; a cycle must not hang the error path
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _address_in_use(exc: OSError) -> str:
    from console.runstate import who_holds_port

    found = _BIND_ADDRESS.search(str(exc))
    if found is None:
        return "a port this service needs is already in use (fix: stop what holds it)"
    host, port = found.group(1), int(found.group(2))
    return (
        f"port {port} on {host} is already in use by {who_holds_port(port)} "
        "(fix: stop that process, or give this service another port in its config)"
    )


def _database_error(args: argparse.Namespace, exc: sqlite3.DatabaseError) -> str:
    """SQLite names the damage but not the file: check the work directory's databases
    (``--workdir``, or the directory of ``-c``) and name the corrupt one."""
    from console.workdir import WorkLayout
    from pacegate.dbcheck import first_corrupt

    root = getattr(args, "workdir", None)
    config = getattr(args, "config", None)
    if root is None and config is not None:
        root = Path(config).parent
    if root is not None:
        work = WorkLayout(Path(root))
        corrupt = first_corrupt(
            [
                work.hospital_dir / "readings.db",
                work.gateway_dir / "replay.db",
                work.gateway_dir / "spool.db",
            ]
        )
        if corrupt is not None:
            return str(corrupt)
    return (
        f"SQLite error: {exc} (fix: check the database files with "
        "'sqlite3 FILE \"PRAGMA integrity_check\"' and restore a damaged one from backup)"
    )


def _check_workdir(args: argparse.Namespace) -> None:
    """Commands that read a work directory refuse a missing one before starting anything."""
    workdir: Path | None = getattr(args, "workdir", None)
    command = args.command
    if workdir is None or command not in ("devices", "analyze", "status", "broker"):
        return
    wanted = {
        "devices": workdir / "pki" / "registry.json",
        "analyze": workdir / "hospital.yaml",
        "status": workdir,
        "broker": workdir / "broker.yaml",
    }[command]
    if not wanted.exists():
        raise ConfigError(
            wanted,
            "",
            f"not found: {workdir} is not a pacegate work directory yet",
            fix=f"run 'pacegate demo --workdir {workdir}' once, or 'pacegate pki init --dir "
            f"{workdir / 'pki'}' and 'pacegate up --workdir {workdir}'",
        )


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    target: Command = args.target
    if target is _hospital and args.config is None:
        parser.error("hospital: -c/--config is required")
    if args.command == "broker":
        if args.workdir is None and args.config is None:
            args.config = Path("broker.yaml")
            if not args.config.exists():
                raise ConfigError(
                    args.config,
                    "",
                    "not found in the current directory",
                    fix="give the work directory 'up' configured (--workdir W) or a file (-c FILE)",
                )
        elif args.workdir is not None:
            args.config = args.workdir / "broker.yaml"
    _check_workdir(args)
    return target(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every error an operator can cause ends here as one or two lines on
    stderr and a non-zero exit, never a traceback: the checks live once, in this function
    and in the argument types above, not in each command."""
    parser = build_parser()
    _check_numeric_flags(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json)
    try:
        code = _run(parser, args)
        sys.stdout.flush()  # inside the handlers: a reader that left fails here, not at exit
        return code
    except ConfigError as exc:
        print(f"pacegate: configuration error: {exc}", file=sys.stderr)
        return 2
    except PacegateError as exc:
        print(f"pacegate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # 'pacegate analyze --json | head -c 100': the reader left, which is not an error of
        # ours. Point stdout at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a killed writer
    except sqlite3.DatabaseError as exc:
        print(f"pacegate: {_database_error(args, exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        # A busy port found by the listener itself (a race past the services' own check)
        # arrives wrapped, e.g. in amqtt's BrokerError: look down the chain.
        busy = _address_in_use_cause(exc)
        if busy is not None:
            print(f"pacegate: {args.command}: {_address_in_use(busy)}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError) and exc.filename is not None:
            print(f"pacegate: {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
