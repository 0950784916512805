"""``pacegate pki init|enroll|rekey-device|revoke --dir DIR``: the PKI for operators (the
library is :mod:`pacegate.pki`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pacegate.layout import PkiLayout
from pacegate.pki import (
    PkiError,
    device_ids,
    enroll_devices,
    init_pki,
    next_device_ids,
    rekey_device,
    revoke_device,
)
from pacegate.pki.mosquitto_admin import (
    MosquittoAdminError,
    close_revoked_session,
    running_mosquitto,
)


# ---------------------------------------------------------------------------------------
# CLI targets
# ---------------------------------------------------------------------------------------
def cli_init(args: argparse.Namespace) -> int:
    layout = init_pki(args.dir, force=args.force, broker_hosts=args.broker_hosts)
    print(
        f"pacegate: PKI created in {layout.root} (CA, broker, gateway, PQ-channel identities, "
        f"PSK store, CRL, mosquitto/). Next: pacegate pki enroll DEVICE_ID --dir {layout.root}",
        file=sys.stderr,
    )
    return 0


def cli_enroll(args: argparse.Namespace) -> int:
    ids = list(args.device_ids)
    if args.count is not None:
        ids += next_device_ids(args.dir, args.count, args.prefix)
    if not ids:
        raise PkiError(
            "pki enroll: no device to enroll (fix: give DEVICE_ID..., or --count N [--prefix pm-])"
        )
    dirs = enroll_devices(args.dir, ids, days=args.days)
    if len(ids) == 1:
        print(
            f"pacegate: enrolled {ids[0]}: bundle in {dirs[0]} "
            "(device.crt, device.key, device.psk; keys are mode 0600)",
            file=sys.stderr,
        )
    else:
        print(
            f"pacegate: enrolled {len(ids)} devices, {ids[0]} .. {ids[-1]}: bundles in "
            f"{PkiLayout(Path(args.dir)).devices_dir}/ID/ (keys are mode 0600)",
            file=sys.stderr,
        )
    return 0


def cli_rekey_device(args: argparse.Namespace) -> int:
    ddir = rekey_device(args.dir, args.device_id)
    print(
        f"pacegate: re-keyed {args.device_id}: new PSK in {ddir / 'device.psk'} and in the "
        "gateway's PSK store (the old one is gone), fresh counter.state. A running gateway "
        "picks the store up within seconds; restart the device with the new bundle.",
        file=sys.stderr,
    )
    return 0


def cli_revoke(args: argparse.Namespace) -> int:
    layout = PkiLayout(Path(args.dir))
    address = _address(args.mosquitto) if getattr(args, "mosquitto", None) else None
    if args.device_id in device_ids(layout.root, status="revoked"):
        # idempotent, so that an operator can retry the broker step after a failure
        print(f"pacegate: {args.device_id} was already revoked", file=sys.stderr)
    else:
        revoke_device(layout.root, args.device_id)
        print(
            f"pacegate: revoked {args.device_id}: CRL re-signed, PSK store and mosquitto ACL "
            "updated. The embedded broker applies it within seconds.",
            file=sys.stderr,
        )
    if address is None and running_mosquitto(layout) is None:
        print(
            f"pacegate: no mosquitto runs for {layout.root} ({layout.mosquitto_pid} names "
            "none); a mosquitto started from elsewhere: run this again with --mosquitto "
            "HOST:PORT",
            file=sys.stderr,
        )
        return 0
    try:
        done = close_revoked_session(layout, args.device_id, address=address)
    except MosquittoAdminError as exc:
        print(
            f"pacegate: mosquitto: {exc}. The revocation is recorded; until this succeeds "
            f"a live session of {args.device_id} may stay open.",
            file=sys.stderr,
        )
        return 1
    print(f"pacegate: mosquitto: {done}", file=sys.stderr)
    return 0


def _address(text: str) -> tuple[str, int]:
    from console.endpoints import parse_host_port

    return parse_host_port(text, "--mosquitto")
