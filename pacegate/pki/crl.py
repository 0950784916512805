"""The CRL: re-signed from the registry on every revocation (``crl.pem``); brokers watch it."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pacegate.layout import PkiLayout, write_public
from pacegate.pki.issue import Ca, utc_now

# A CRL past its nextUpdate makes OpenSSL refuse *every* client: keep it long, and it is
# re-signed on every revocation anyway.
CRL_VALIDITY = timedelta(days=365)


def write_crl(layout: PkiLayout, ca: Ca, registry: dict[str, Any]) -> None:
    """Re-sign the CRL from the registry. ``thisUpdate`` strictly increases, so a verifier
    holding an older CRL of the same issuer always prefers this one."""
    now = utc_now()
    last = registry.get("crl_last_update")
    if last is not None:
        prev = datetime.fromisoformat(last)
        if now <= prev:
            now = prev + timedelta(seconds=1)
    number = int(registry.get("crl_number", 0)) + 1
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    for entry in registry["devices"].values():
        if entry["status"] == "revoked":
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"], 16))
                .revocation_date(datetime.fromisoformat(entry["revoked_at"]))
                .build()
            )
    crl = builder.sign(ca.key, hashes.SHA256())
    registry["crl_number"] = number
    registry["crl_last_update"] = now.isoformat()
    write_public(layout.crl, crl.public_bytes(serialization.Encoding.PEM))


def revoked_serials(crl_path: Path) -> frozenset[int]:
    """The serial numbers a PEM CRL revokes (used by the broker's live revocation)."""
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    return frozenset(r.serial_number for r in crl)
