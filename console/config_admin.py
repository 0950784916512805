"""``pacegate config check FILE``, ``config schema`` and ``config example``: gateway.yaml for
operators."""

from __future__ import annotations

import argparse
import sys

from gateway.config import GatewayConfigError, load_gateway_config
from gateway.config_schema import render_json_schema
from gateway.config_template import render_example_config


def cli_schema(args: argparse.Namespace) -> int:
    """``pacegate config schema [--out FILE]``: write the JSON Schema of gateway.yaml."""
    return _emit(render_json_schema(), args)


def cli_example(args: argparse.Namespace) -> int:
    """``pacegate config example [--out FILE]``: write the commented gateway.example.yaml."""
    return _emit(render_example_config(), args)


def _emit(text: str, args: argparse.Namespace) -> int:
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
