"""TLS contexts for every pacegate endpoint: one place decides versions and verification.

- TLS 1.2 at least (ESP32-class stacks speak 1.2), 1.3 preferred (OpenSSL negotiates it
  whenever both sides can).
- Servers *require* a client certificate (``CERT_REQUIRED``): a handshake without one fails.
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

KEYLOG_ENV = "SSLKEYLOGFILE"


def _apply_keylog(ctx: ssl.SSLContext) -> None:
    path = os.environ.get(KEYLOG_ENV)
    if path:
        # The key log decrypts the traffic: create it owner-only before OpenSSL opens it
        # (OpenSSL would create it with the umask's mode, world-readable by default).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        ctx.keylog_filename = path


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    for p in (cert, key):
        if not p.exists():
            raise ConfigError(
                p,
                "",
                "file not found",
                fix="create it with 'pacegate pki init' / 'pacegate pki enroll'",
            )
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
