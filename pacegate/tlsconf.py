"""TLS contexts for every pacegate endpoint: one place decides versions and verification.

- TLS 1.2 at least (ESP32-class stacks speak 1.2), 1.3 preferred (OpenSSL negotiates it
  whenever both sides can).
- TLS 1.2 suites: ECDHE with an AEAD only (:data:`TLS12_CIPHERS`, shared with the Mosquitto
  configuration that ``pacegate pki`` writes). TLS 1.3 suites are all (EC)DHE + AEAD already.
- Servers *require* a client certificate (``CERT_REQUIRED``): a handshake without one fails.
  It must be meant for a TLS client: OpenSSL's ``ssl_client`` purpose (the default when a
  server verifies its client) refuses an extendedKeyUsage without ``clientAuth``, and
  :func:`allows_client_auth` lets a server refuse a certificate with no extendedKeyUsage.
- ``SSLKEYLOGFILE`` in the environment makes the context append its session secrets to that
  file (NSS key log format, as curl and browsers do) so that Wireshark can decrypt a capture
  of one's *own* test traffic. It is off unless the operator sets the variable.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509

from pacegate.errors import ConfigError
from pacegate.secretfile import read_secret

KEYLOG_ENV = "SSLKEYLOGFILE"

# TLS 1.2 suites, in preference order: ECDHE only (forward secrecy; no static RSA key
# exchange) with an AEAD only (no CBC: padding oracles such as Lucky13; no SHA-1 MAC).
# The ECDSA suites are the ones pacegate's P-256 broker certificate can use; the RSA ones
# stay for a site that brings an RSA broker certificate.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
    )
)


def _apply_keylog(ctx: ssl.SSLContext) -> None:
    path = os.environ.get(KEYLOG_ENV)
    if path:
        # The key log decrypts the traffic: create it owner-only before OpenSSL opens it
        # (OpenSSL would create it with the umask's mode, world-readable by default).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        ctx.keylog_filename = path


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    fix = "create it with 'pacegate pki init' / 'pacegate pki enroll'"
    if not cert.exists():
        raise ConfigError(cert, "", "file not found", fix=fix)
    # OpenSSL reads the key itself; the one secret-file loader judges it first (mode 0600)
    read_secret(key, "TLS private key", missing_fix=fix)
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        raise ConfigError(
            cert,
            "",
            f"certificate and key do not load together: {exc.reason}",
            fix=f"check that {key.name} is the key of {cert.name}",
        ) from None


def _load_verify(ctx: ssl.SSLContext, path: Path, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(
            path,
            "",
            f"not a PEM {what}: {exc.reason or exc}",
            fix="regenerate the PKI files with 'pacegate pki init' (or copy the right file)",
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    if not ca.exists():
        raise ConfigError(ca, "", "CA certificate not found", fix="run 'pacegate pki init'")
    _load_verify(ctx, ca, "CA certificate")


def server_context(
    cert: Path, key: Path, ca: Path, *, crl: Path | None = None, require_client_cert: bool = True
) -> ssl.SSLContext:
    """A server context that verifies client certificates against ``ca`` (and ``crl``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(TLS12_CIPHERS)
    _load_chain(ctx, cert, key)
    _load_ca(ctx, ca)
    if crl is not None:
        load_crl(ctx, crl)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    _apply_keylog(ctx)
    return ctx


def load_crl(ctx: ssl.SSLContext, crl: Path) -> None:
    """Make ``ctx`` check client certificates against the CRL in ``crl`` (PEM)."""
    if not crl.exists():
        raise ConfigError(crl, "", "CRL not found", fix="run 'pacegate pki init' to create it")
    _load_verify(ctx, crl, "CRL")
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


class _NamedClientContext(ssl.SSLContext):
    """A client context that verifies (and sends as SNI) one fixed server name, whatever
    host name the caller connects to: for a broker reached by address whose certificate
    names it (``gateway.yaml`` ``mqtt.server_name``). paho passes its host to
    ``wrap_socket``; this replaces it."""

    server_name: str

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_bio(*args, **kwargs)


def client_context(
    ca: Path, cert: Path, key: Path, *, server_name: str | None = None
) -> ssl.SSLContext:
    """A client context presenting ``cert`` and verifying the server against ``ca``, and
    its certificate against the host name connected to (or ``server_name`` if given): a
    certificate the CA issued for another host is refused."""
    if server_name is not None:
        named = _NamedClientContext(ssl.PROTOCOL_TLS_CLIENT)
        named.server_name = server_name
        ctx: ssl.SSLContext = named
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, ca)
    _load_chain(ctx, cert, key)
    _apply_keylog(ctx)
    return ctx


def allows_client_auth(cert_der: bytes | None) -> bool:
    """True if the certificate's extendedKeyUsage names ``clientAuth``.

    OpenSSL refuses an extendedKeyUsage without ``clientAuth`` at the handshake, but accepts
    a certificate that has no extendedKeyUsage at all (RFC 5280 §4.2.1.12: then any use is
    allowed). pacegate's CA gives every client identity ``clientAuth``, so a server that
    calls this after the handshake refuses a CA-signed certificate never meant for a client.
    """
    if not cert_der:
        return False
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku


def peer_identity(cert_der: bytes | None) -> str | None:
    """The pacegate identity in a peer certificate: its subject CN (a device id, 'gateway')."""
    if not cert_der:
        return None
    cert = x509.load_der_x509_certificate(cert_der)
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if len(cns) != 1:
        return None
    value = cns[0].value
    return value if isinstance(value, str) else value.decode()
