"""Trust material that travels between nodes: the CRL and the gateways' PSK store.

Several edge nodes (each a broker and a gateway, docs/scaling.md) share no filesystem. Each
keeps its own copy of what it enforces: ``crl.pem`` (the broker refuses and disconnects
revoked certificates) and ``keystore/psk.store`` (the gateway opens readings and refuses
revoked devices). The node that holds the CA publishes both (``pacegate trust serve``); each
edge node follows it (``pacegate trust follow``) and replaces its copy when the offered one is
*newer and genuine*. The transport needs no secrecy and no integrity of its own:

- the CRL is signed by the CA, whose certificate the node already holds; its CRL number
  (RFC 5280 §5.2.3) strictly increases with every re-signing ('pacegate pki' does that), so
  an older CRL replayed by whoever sits on the path is refused, never installed;
- the PSK store is AES-256-GCM under ``psk.key``, a key that never leaves the nodes it was
  provisioned to, with its generation in the associated data; a store of an older
  generation (one that would re-activate a revoked device) is refused the same way.

What a path attacker can still do is withhold updates (a freeze): :class:`Follower` counts
failed and refused fetches and logs each, and 'pacegate status' style monitoring of
``pacegate_trust_*`` is the defence (docs/scaling.md, "Trust material").

This module only judges bytes (sans-IO): the HTTP serving and polling live in the operator
layer (``console/trust.py``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from pacegate.errors import ConfigError, PacegateError
from pacegate.keystore import PskStore, read_generation

# The two documents a trust server offers, by URL path (nothing else is served).
CRL_PATH = "/crl.pem"
PSK_STORE_PATH = "/psk.store"
# A CRL or PSK store larger than this is refused unread: 10,000 revoked serials make a CRL
# of about 400 KB, and a PSK store of 100,000 devices about 9 MB.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024


class TrustUpdateRefused(PacegateError):
    """An offered CRL or PSK store is not genuine, or older than the one in place.

    ``reason`` is a stable code (metric label): ``not_a_crl``, ``wrong_issuer``,
    ``bad_signature``, ``no_crl_number``, ``rolled_back``, ``bad_psk_store``, ``too_large``."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Verdict:
    """``install``: the offer is genuine and newer; ``version``: its CRL number or
    generation (the one in place when nothing changes)."""

    install: bool
    version: int


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        ext = crl.extensions.get_extension_for_oid(ExtensionOID.CRL_NUMBER)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.crl_number if isinstance(value, x509.CRLNumber) else None


def judge_crl(current: bytes | None, offered: bytes, ca: x509.Certificate) -> Verdict:
    """Whether to install ``offered`` in place of ``current`` (None: no CRL yet).

    Raises :class:`TrustUpdateRefused` for anything but a CRL signed by ``ca`` whose number
    is at least the current one's."""
    if len(offered) > MAX_DOCUMENT_BYTES:
        raise TrustUpdateRefused(
            f"{len(offered)} bytes, limit {MAX_DOCUMENT_BYTES}", reason="too_large"
        )
    try:
        crl = x509.load_pem_x509_crl(offered)
    except ValueError as exc:
        raise TrustUpdateRefused(f"not a PEM CRL: {exc}", reason="not_a_crl") from None
    if crl.issuer != ca.subject:
        raise TrustUpdateRefused(
            f"issued by {crl.issuer.rfc4514_string()}, not by this node's CA "
            f"{ca.subject.rfc4514_string()}",
            reason="wrong_issuer",
        )
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise TrustUpdateRefused("the CA's signature does not verify", reason="bad_signature")
    number = crl_number(crl)
    if number is None:
        raise TrustUpdateRefused("the CRL carries no CRL number", reason="no_crl_number")
    held = _current_crl_number(current)
    if held is not None and number < held:
        raise TrustUpdateRefused(
            f"CRL number {number} is older than the installed {held}", reason="rolled_back"
        )
    return Verdict(install=held is None or number > held, version=number)


def _current_crl_number(current: bytes | None) -> int | None:
    if current is None:
        return None
    try:
        return crl_number(x509.load_pem_x509_crl(current))
    except ValueError:
        return None  # a damaged local copy: any genuine CRL replaces it


def judge_psk_store(offered: bytes, store_path: Path, key_path: Path) -> Verdict:
    """Whether to install ``offered`` as ``store_path`` (its key at ``key_path``).

    The offer is opened with the node's own key exactly as the gateway would open it
    (:meth:`PskStore.load`, which also refuses a generation below the one recorded beside
    the key), from a private temporary file beside the store."""
    if len(offered) > MAX_DOCUMENT_BYTES:
        raise TrustUpdateRefused(
            f"{len(offered)} bytes, limit {MAX_DOCUMENT_BYTES}", reason="too_large"
        )
    store_path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=store_path.parent, prefix=".offered.", suffix=".store")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(offered)
        try:
            store = PskStore.load(Path(name), key_path)
        except ConfigError as exc:
            reason = "rolled_back" if exc.key == "generation" else "bad_psk_store"
            raise TrustUpdateRefused(exc.problem, reason=reason) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    held = read_generation(key_path) or 0
    return Verdict(
        install=store.generation > held or not store_path.exists(), version=store.generation
    )
