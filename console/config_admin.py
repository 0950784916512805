"""``pacegate config check FILE`` and ``pacegate config schema``: gateway.yaml for operators."""

from __future__ import annotations

import argparse
import sys

from gateway.config import GatewayConfigError, load_gateway_config, render_json_schema


def cli_schema(args: argparse.Namespace) -> int:
    """``pacegate config schema [--out FILE]``: write the JSON Schema of gateway.yaml."""
    text = render_json_schema()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cli_check(args: argparse.Namespace) -> int:
    """``pacegate config check FILE``: print OK, or every error with file:line, key and fix."""
    try:
        cfg = load_gateway_config(args.file, check_files=not getattr(args, "schema_only", False))
    except GatewayConfigError as exc:
        for err in exc.errors:
            print(str(err), file=sys.stderr)
        n = len(exc.errors)
        print(f"{args.file}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK ({len(cfg.routes)} route{'s' if len(cfg.routes) != 1 else ''})")
    return 0
