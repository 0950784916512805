"""The registry of enrolled devices (``registry.json``: serial, status, validity, PSK
generation) and the lock that serialises every change to one PKI directory."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from pacegate.layout import PkiLayout, write_public
from pacegate.pki.errors import PkiError

P = ParamSpec("P")

R = TypeVar("R")

REGISTRY_VERSION = 1


def load_registry(layout: PkiLayout) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(layout.registry.read_text())
    except FileNotFoundError:
        raise PkiError(
            f"{layout.registry}: registry not found; run 'pacegate pki init --dir {layout.root}'"
        ) from None
    except json.JSONDecodeError as exc:
        raise PkiError(
            f"{layout.registry}: not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    data.setdefault("devices", {})
    return data


def save_registry(layout: PkiLayout, data: dict[str, Any]) -> None:
    write_public(layout.registry, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def pki_lock(layout: PkiLayout) -> Iterator[None]:
    """Serialise changes to one PKI directory: enrol and revoke read, modify and write the
    registry, the PSK store and the CRL, and two at once would lose one's changes."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.root / ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def locked(func: Callable[Concatenate[Path, P], R]) -> Callable[Concatenate[Path, P], R]:
    """Run a PKI change under the lock of the directory given as its first argument."""

    @functools.wraps(func)
    def under_lock(root: Path, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with pki_lock(PkiLayout(Path(root))):
            return func(root, *args, **kwargs)

    return under_lock


def device_ids(root: Path, *, status: str | None = None) -> list[str]:
    """Enrolled device ids (optionally only ``active`` or ``revoked`` ones)."""
    registry = load_registry(PkiLayout(Path(root)))
    return sorted(d for d, e in registry["devices"].items() if status in (None, e["status"]))


def next_device_ids(root: Path, count: int, prefix: str) -> list[str]:
    """``count`` ids ``PREFIX0001``, ... after the highest number already enrolled under
    ``prefix`` (revoked ids stay taken: a certificate's CN is never reissued)."""
    taken = 0
    for did in load_registry(PkiLayout(Path(root)))["devices"]:
        tail = did[len(prefix) :] if did.startswith(prefix) else ""
        if tail.isdigit():
            taken = max(taken, int(tail))
    return [f"{prefix}{n:04d}" for n in range(taken + 1, taken + count + 1)]
