"""Debian's mosquitto, as pacegate configures it: ``mosquitto/pacegate.conf``, the ACL file
(generated from :mod:`pacegate.acl`), the dynamic-security plugin's file, and the account
mosquitto drops root to. The dynamic-security client is :mod:`pacegate.pki.mosquitto_admin`."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pacegate.acl import mosquitto_acl_lines, mosquitto_pattern_lines
from pacegate.layout import (
    DEFAULT_HOST,
    DEFAULT_MQTTS_PORT,
    SECRET_DIR_MODE,
    PkiLayout,
    write_public,
)
from pacegate.pki.mosquitto_admin import find_plugin, initial_dynsec_config
from pacegate.tlsconf import TLS12_CIPHERS

# pacegate's certificate-identity plugin (mosquitto/plugin/, built by './dev setup'): it
# refuses a client certificate without clientAuth and a client id that is not the CN, and
# makes the CN the username. Mosquitto 2.0.11 has no setting for either check.
IDENTITY_PLUGIN = (
    Path(__file__).resolve().parents[2]
    / "mosquitto"
    / "plugin"
    / "build"
    / "pacegate_cert_identity.so"
)


def mosquitto_acl(registry: dict[str, Any]) -> str:
    """The ACL for Debian's mosquitto, whose username is the certificate's CN (set by the
    identity plugin): the rules of :mod:`pacegate.acl`, and a denial of everything for
    each revoked device."""
    lines = [
        "# pacegate ACL for mosquitto (written by 'pacegate pki' from pacegate/acl.py; do not",
        "# edit by hand). The username is the client certificate's CN",
        "# (set by pacegate's certificate-identity plugin).",
        "",
        *mosquitto_acl_lines(),
    ]
    revoked = sorted(d for d, e in registry["devices"].items() if e["status"] == "revoked")
    for did in revoked:
        # Belt and braces: the CRL stops new handshakes and 'pki revoke' closes the live
        # session; this denies a session still open everything once mosquitto reloads.
        lines += [
            f"# revoked {registry['devices'][did]['revoked_at']}",
            f"user {did}",
            "topic deny #",
            "",
        ]
    lines += mosquitto_pattern_lines()
    return "\n".join(lines)


# The account Debian's mosquitto drops to when started as root (its package creates it).
MOSQUITTO_ACCOUNT = "mosquitto"

# A root-owned PKI run by that account: its group may pass through (no read: no listing),
# others nothing.
PKI_DIR_MODE_FOR_MOSQUITTO = 0o710


def mosquitto_run_user(layout: PkiLayout) -> str | None:
    """The account mosquitto runs as once it drops root (its ``user`` line).

    Mosquitto started as root switches to ``user`` right after reading its configuration
    (src/mosquitto.c, ``drop_privileges``), before it opens the key, CRL, ACL, pid file or
    persistence directory; started as anyone else it ignores the line. So: the owner of the
    PKI directory, who can read all of them; for a PKI owned by root, the unprivileged
    ``mosquitto`` account, to which :func:`grant_mosquitto_access` gives exactly what it
    needs (never ``user root``: a network daemon holding root). None: no such account, and
    mosquitto would fall back to ``nobody``, which can read nothing of a root-owned PKI.
    """
    try:
        owner = pwd.getpwuid(layout.root.stat().st_uid).pw_name
    except (KeyError, FileNotFoundError):
        return None
    if owner != "root":
        return owner
    try:
        pwd.getpwnam(MOSQUITTO_ACCOUNT)
    except KeyError:
        return None
    return MOSQUITTO_ACCOUNT


def mosquitto_cannot_reach(layout: PkiLayout) -> Path | None:
    """The first directory above the PKI that the account of :func:`mosquitto_run_user`
    may not search, when mosquitto is started as root (so drops to it); else None.

    Mosquitto drops root before it opens a single certificate, so such a directory (a 0700
    home, pytest's base temporary directory) makes it fail with "Unable to load CA
    certificates", naming neither the account nor the directory."""
    if os.geteuid() != 0:
        return None
    user = mosquitto_run_user(layout)
    if user is None or user == "root":
        return None
    account = pwd.getpwnam(user)
    groups = {account.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    for directory in (layout.root.resolve(), *layout.root.resolve().parents):
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return directory
    return None


def grant_mosquitto_access(layout: PkiLayout) -> None:
    """A root-owned PKI, run by the ``mosquitto`` account: it owns its own directory (pid
    file, persistence, the plugin's file) and the broker key (still 0600); the PKI
    directory lets its group through (0710, no listing), so it reaches the public CA, CRL and
    broker certificate. Every other key and PSK stays root's, unreadable to it."""
    if os.geteuid() != 0 or layout.root.stat().st_uid != 0:
        return
    try:
        account = pwd.getpwnam(MOSQUITTO_ACCOUNT)
    except KeyError:
        return
    uid, gid = account.pw_uid, account.pw_gid
    os.chown(layout.root, 0, gid)
    os.chmod(layout.root, PKI_DIR_MODE_FOR_MOSQUITTO)
    for path in (layout.mosquitto_dir, layout.mosquitto_dir / "data", layout.mosquitto_dynsec):
        if path.exists():
            os.chown(path, uid, gid)
    for item in (layout.mosquitto_dir / "data").iterdir():
        os.chown(item, uid, gid)
    if layout.broker_key.exists():
        os.chown(layout.broker_key, uid, gid)


def _identity_plugin_for(layout: PkiLayout) -> Path:
    """Where this PKI's mosquitto loads the identity plugin from: a copy in the PKI's own
    ``mosquitto/`` directory when that exists. Mosquitto loads plugins after it drops to its
    account, which can always reach that directory (it holds its pid file and persistence)
    but not necessarily the checkout the plugin was built in (a 0700 home). The copy is
    refreshed whenever the built file differs. Without a built plugin: the build path, so
    that mosquitto stops at start instead of running without the check."""
    if not IDENTITY_PLUGIN.is_file() or not layout.mosquitto_dir.is_dir():
        return IDENTITY_PLUGIN
    copy = layout.mosquitto_dir / IDENTITY_PLUGIN.name
    built = IDENTITY_PLUGIN.read_bytes()
    if not copy.is_file() or copy.read_bytes() != built:
        tmp = copy.with_name(f".{copy.name}.tmp")
        tmp.write_bytes(built)
        tmp.chmod(0o755)  # code, not a secret: mosquitto's account must map it
        os.replace(tmp, copy)
    return copy


def mosquitto_conf(
    layout: PkiLayout,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_MQTTS_PORT,
    acl_file: Path | None = None,
    extra: Sequence[str] = (),
) -> str:
    """A Mosquitto 2 configuration giving pacegate's guarantees (absolute paths)."""
    root = layout.root.resolve()
    lay = PkiLayout(root)
    acl = (acl_file or lay.mosquitto_dir / "acl").resolve()
    user = mosquitto_run_user(lay)
    plugin = find_plugin()
    identity_plugin = _identity_plugin_for(lay)
    lines = [
        "# pacegate: Mosquitto 2 configuration (written by 'pacegate pki'). Reload: SIGHUP;",
        "# 'pacegate pki revoke' reloads it and closes the revoked device's live session.",
        (
            f"user {user}"
            if user
            else f"# no 'user' line: no account to drop root to (create '{MOSQUITTO_ACCOUNT}')"
        ),
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {acl}",
        # how 'pacegate pki revoke' finds the running broker (and the process to SIGHUP)
        f"pid_file {lay.mosquitto_pid}",
        "max_packet_size 4096",
        # No retained messages: a device's retained PUBLISH closes its connection (MQTT
        # 5: DISCONNECT 0x9A; src/handle_publish.c), so nothing a device (or a revoked
        # one) leaves behind is pushed to the next subscriber. No pacegate client retains.
        "retain_available false",
        # Sessions and queued QoS 1 messages survive a broker restart (the payloads are
        # sealed readings: nothing rests on disk in clear), and a gateway away for a while
        # finds its backlog: mosquitto's default queue of 1,000 is minutes of a ward.
        "persistence true",
        f"persistence_location {lay.mosquitto_dir / 'data'}/",
        # Mosquitto PUBACKs at once and snapshots its memory every N s (fsynced); a kill -9
        # loses what the gateway had not acknowledged since. 1 s: ~1 s of readings at no
        # measured cost; autosave_on_changes loses none but caps at ~500 msg/s
        # (docs/pki-and-broker.md, "Mosquitto under kill -9").
        "autosave_interval 1",
        "max_queued_messages 100000",
        # First plugin: mosquitto asks the basic-auth plugins in this order and the first
        # answer that is not "defer" decides (src/security.c, mosquitto_unpwd_check). A
        # missing file stops mosquitto at start ("Unable to load plugin"), never silently.
        *(
            []
            if identity_plugin.is_file()
            else ["# MISSING: build it with './dev setup' (needs gcc, mosquitto-dev, libssl-dev)"]
        ),
        f"plugin {identity_plugin}",
        # The dynamic-security plugin only so that 'pki revoke' can kick a live session
        # (disableClient); it defers every ACL decision to acl_file (pacegate.pki.mosquitto_admin).
        *(
            [f"plugin {plugin}", f"plugin_opt_config_file {lay.mosquitto_dynsec}"]
            if plugin
            else ["# dynamic-security plugin not found: a revoked live session stays open"]
        ),
        "",
        f"listener {port} {host}",
        "protocol mqtt",
        "max_connections 10000",
        f"cafile {lay.ca_cert}",
        f"certfile {lay.broker_cert}",
        f"keyfile {lay.broker_key}",
        f"crlfile {lay.crl}",
        # TLS 1.2 at least (1.3 still negotiated); 1.2 suites: ECDHE + AEAD only, the same
        # list as the embedded broker's (mosquitto's default list has CBC and SHA-1 suites)
        "tls_version tlsv1.2",
        f"ciphers {TLS12_CIPHERS}",
        "require_certificate true",
        # No use_identity_as_username: with it mosquitto asks no plugin about a certificate
        # client (src/handle_connect.c, handle__connect: "Authentication assumed to be
        # cleared"). The identity plugin sets the username to the CN instead, and refuses a
        # CONNECT whose client id is not the CN before mosquitto looks up any session.
        *extra,
        "",
    ]
    return "\n".join(lines)


def write_mosquitto_files(layout: PkiLayout, registry: dict[str, Any]) -> None:
    (layout.mosquitto_dir / "data").mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
    write_public(layout.mosquitto_dir / "acl", mosquitto_acl(registry).encode())
    write_public(layout.mosquitto_dir / "pacegate.conf", mosquitto_conf(layout).encode())
    if not layout.mosquitto_dynsec.exists():  # mosquitto owns it from then on
        write_public(layout.mosquitto_dynsec, initial_dynsec_config().encode())
    grant_mosquitto_access(layout)
