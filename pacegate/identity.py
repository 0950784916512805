"""Device identifiers: the one rule that decides what a device id may be.

A device id is a certificate CN, a SAN URI, an MQTT topic level, an MQTT client id and a
directory name. So it may hold only what is safe in all five: lower-case letters, digits,
``-`` and ``_``, starting with a letter or digit, at most 64 characters. No ``+``/``#``/``/``
(MQTT wildcards and level separators), no ``.`` (no ``..`` path escapes), no upper case
(case-insensitive file systems would let two ids share a directory).
"""

from __future__ import annotations

import re

DEVICE_ID_MAX_LEN = (
    64  # MQTT 3.1.1 brokers must accept client ids up to 23 bytes; all ours accept 64
)
_DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

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


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe everywhere a device id goes, else raise ValueError."""
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise ValueError(
            f"device id {device_id!r} is not allowed: use 1-{DEVICE_ID_MAX_LEN} characters "
            "from a-z, 0-9, '-' and '_', starting with a letter or digit"
        )
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
