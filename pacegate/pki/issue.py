"""X.509 recipes: the only code that builds certificates and their keys.

- CA: ECDSA P-256 (what ESP32-class TLS stacks and Mosquitto both accept), ten years,
  ``basicConstraints CA:TRUE pathlen:0`` and ``keyCertSign, cRLSign`` (both critical).
- Leaf: ``digitalSignature`` (critical), one extended key usage, SANs, SKI/AKI; the callers
  (:mod:`pacegate.pki.lifecycle`) choose the EKU, the SANs and the validity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pacegate.layout import PkiLayout
from pacegate.pki.errors import PkiError
from pacegate.secretfile import read_secret

CA_VALIDITY = timedelta(days=3650)

SERVICE_VALIDITY = timedelta(days=825)  # the CA/B forum's old ceiling for server certificates

DEFAULT_DEVICE_DAYS = 90  # short: a stolen device certificate ages out on its own

CLOCK_SKEW = timedelta(minutes=5)  # device clocks drift; back-date notBefore a little


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def subject_name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacegate"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def make_ca(cn: str = "pacegate device CA") -> Ca:
    key = new_key()
    now = utc_now()
    name = subject_name(cn)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Ca(key, cert)


def load_ca(layout: PkiLayout) -> Ca:
    if not layout.ca_cert.exists() or not layout.ca_key.exists():
        raise PkiError(
            f"{layout.root}: no CA here (missing {layout.ca_cert.name} or {layout.ca_key.name}); "
            f"run 'pacegate pki init --dir {layout.root}' first"
        )
    pem = read_secret(
        layout.ca_key,
        "CA private key",
        missing_fix=f"run 'pacegate pki init --dir {layout.root}' first",
    )
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{layout.ca_key}: not an ECDSA private key")
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    return Ca(key, cert)


def issue_certificate(
    ca: Ca,
    key: ec.EllipticCurvePrivateKey,
    cn: str,
    *,
    eku: x509.ObjectIdentifier | Sequence[x509.ObjectIdentifier],
    sans: Sequence[x509.GeneralName],
    not_before: datetime,
    not_after: datetime,
    serial: int | None = None,
) -> x509.Certificate:
    usages = [eku] if isinstance(eku, x509.ObjectIdentifier) else list(eku)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject_name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def host_sans(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out
