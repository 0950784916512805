"""pacegate's PKI: a device CA, service identities, device enrolment and revocation.

Everything is written under one PKI directory whose file names are fixed by
:class:`pacegate.layout.PkiLayout`. One module per job:

- :mod:`~pacegate.pki.issue`: the X.509 recipes, the only code that builds certificates;
- :mod:`~pacegate.pki.registry`: ``registry.json`` and the directory's lock;
- :mod:`~pacegate.pki.crl`: the CRL, re-signed on every revocation;
- :mod:`~pacegate.pki.mosquitto`: mosquitto's configuration and ACL file;
  :mod:`~pacegate.pki.mosquitto_admin`: its dynamic-security client (``pki revoke``);
- :mod:`~pacegate.pki.lifecycle`: init, enrol, revoke, re-key, channel identities.

This package re-exports the operations a caller needs (the console, the tests, a
provisioning service); everything else is imported from its module.
Private keys and PSKs are written 0600 and never printed.
"""

from __future__ import annotations

from pacegate.pki.errors import PkiError
from pacegate.pki.lifecycle import (
    add_channel_identity,
    enroll_device,
    enroll_devices,
    init_pki,
    issue_cluster_identities,
    rekey_device,
    revoke_device,
)
from pacegate.pki.registry import device_ids, next_device_ids

__all__ = [
    "PkiError",
    "add_channel_identity",
    "device_ids",
    "enroll_device",
    "enroll_devices",
    "init_pki",
    "issue_cluster_identities",
    "next_device_ids",
    "rekey_device",
    "revoke_device",
]
