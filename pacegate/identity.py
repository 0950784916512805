"""Identity names: the one rule that decides what a device id or a service's name may be.

Every identity pacegate names (a device, the gateway, the hospital, the cloud, each channel
peer) follows :func:`validate_identity_name`; a device id also may not take a service's name
(:func:`validate_device_id`). A device id is a certificate CN, a SAN URI, an MQTT topic level,
an MQTT client id and a directory name; a channel peer's name travels in the handshake, names
the files ``channel/<name>.mldsa.{key,pub}`` and labels logs and metrics. So a name holds only
what is safe in all of them: lower-case letters, digits, ``-`` and ``_``, starting with a
letter or digit, at most 64 characters. No ``+``/``#``/``/`` (MQTT wildcards and level
separators); no ``.``: ``<name>.mldsa.key`` must split back into one name, and a dot-free
name can never be ``.``/``..`` or a suffix trick in a path or a host name; no upper case
(case-insensitive file systems would let two ids share a directory). The channel once also
allowed ``.`` while the hospital's and the cloud's configs refused it: a dotted gateway name
could be issued but never configured.
"""

from __future__ import annotations

import re

# MQTT 3.1.1 brokers must accept client ids up to 23 bytes; all ours accept 64, and the
# channel handshake carries a name with a 1-byte length
IDENTITY_NAME_MAX_LEN = 64
DEVICE_ID_MAX_LEN = IDENTITY_NAME_MAX_LEN
_IDENTITY_NAME = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{IDENTITY_NAME_MAX_LEN - 1}}}")
IDENTITY_NAME_PATTERN = f"^{_IDENTITY_NAME.pattern}$"  # the same rule, for JSON Schema
IDENTITY_NAME_RULE = (
    f"1-{IDENTITY_NAME_MAX_LEN} characters from a-z, 0-9, '-' and '_', "
    "starting with a letter or digit"
)

# The gateway's certificate CN, the only identity that reads the telemetry tree (pacegate.acl).
GATEWAY_ID = "gateway"
# The certificate 'pacegate pki revoke' uses to give mosquitto's dynamic-security plugin
# its commands (the only identity the ACL lets publish on $CONTROL/dynamic-security/#).
MOSQUITTO_ADMIN_ID = "mosquitto-admin"
# Identities that are not devices; a device may not take one of these names.
RESERVED_IDS = frozenset({GATEWAY_ID, "broker", "hospital", "cloud", "ca", MOSQUITTO_ADMIN_ID})

SAN_URI_PREFIX = "urn:pacegate:device:"
TELEMETRY_TOPIC = "pacemakers/{device_id}/telemetry"
TELEMETRY_FILTER = "pacemakers/+/telemetry"
GATEWAY_SUBSCRIPTION = "pacemakers/#"


def is_identity_name(name: object) -> bool:
    """Whether ``name`` follows the identity-name rule (module docstring)."""
    return isinstance(name, str) and _IDENTITY_NAME.fullmatch(name) is not None


def validate_identity_name(name: object, what: str = "identity name") -> str:
    """Return ``name`` if it follows the rule, else raise ValueError naming ``what``."""
    if not is_identity_name(name):
        raise ValueError(f"{what} {name!r} is not allowed: use {IDENTITY_NAME_RULE}")
    return str(name)


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe everywhere a device id goes, else raise ValueError."""
    validate_identity_name(device_id, "device id")
    if device_id in RESERVED_IDS:
        raise ValueError(f"device id {device_id!r} is reserved for a pacegate service identity")
    return device_id


def is_valid_device_id(device_id: str) -> bool:
    try:
        validate_device_id(device_id)
    except ValueError:
        return False
    return True


def telemetry_topic(device_id: str) -> str:
    return TELEMETRY_TOPIC.format(device_id=validate_device_id(device_id))


def device_san_uri(device_id: str) -> str:
    return SAN_URI_PREFIX + validate_device_id(device_id)
