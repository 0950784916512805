"""The topic ACL, defined once: who may publish, subscribe to and receive what.

The rules are data (:data:`GRANTS`); :func:`allowed` decides from them and is what the
embedded broker's plugin (``broker.plugins``) calls, and ``pacegate.pki.mosquitto`` writes
mosquitto's ``acl_file`` from the same rules (:func:`mosquitto_acl_lines`). Identities are
certificate CNs (both brokers take the CN as the MQTT identity):

- a device publishes only on ``pacemakers/<its id>/telemetry`` and subscribes to nothing;
- only the gateway identity reads (subscribes to and receives) the telemetry tree,
  ``pacemakers/#``; it publishes nothing;
- only ``mosquitto-admin`` (the certificate ``pacegate pki revoke`` uses) talks to mosquitto's
  dynamic-security plugin, which the embedded broker does not have;
- anything else is refused.

Mosquitto 2.0.11's acl_file does not judge SUBSCRIBE at all (src/security_default.c,
``mosquitto_acl_check_default``: "FIXME - implement ACL subscription strings") but checks
every delivery (``MOSQ_ACL_READ`` in src/subs.c), so there a refused subscription is accepted
and receives nothing; the embedded broker refuses it outright. Publish and receive decisions
are the same on both (``tests/test_acl.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pacegate.identity import (
    GATEWAY_ID,
    GATEWAY_SUBSCRIPTION,
    MOSQUITTO_ADMIN_ID,
    RESERVED_IDS,
    TELEMETRY_TOPIC,
    is_valid_device_id,
)
from pacegate.topics import filter_covers, topic_filter_problem, topic_matches

# Stands for "each device, on its own id" in a grant's ``who`` and ``topic`` (mosquitto's own
# pattern substitution, %u = the username = the certificate CN).
DEVICE = "%u"
DYNSEC_CONTROL = "$CONTROL/dynamic-security/#"  # mosquitto's dynamic-security plugin


class Action(enum.Enum):
    PUBLISH = "publish"  # ``topic`` is a topic name
    SUBSCRIBE = "subscribe"  # ``topic`` is a filter
    RECEIVE = "receive"  # a message on the topic name ``topic`` is delivered


class Access(enum.Enum):
    READ = "read"  # subscribe and receive
    WRITE = "write"  # publish
    READWRITE = "readwrite"

    def permits(self, action: Action) -> bool:
        if action is Action.PUBLISH:
            return self is not Access.READ
        return self is not Access.WRITE


@dataclass(frozen=True)
class Grant:
    """``who`` (an identity, or :data:`DEVICE`) may ``access`` the filter ``topic`` (where
    :data:`DEVICE` stands for the device's own id)."""

    who: str
    access: Access
    topic: str
    why: str
    mosquitto_only: bool = False  # a mosquitto feature the embedded broker does not have


GATEWAY = "gateway"  # in GRANTS: the configured gateway identity (broker.yaml acl.gateway_identity)
GRANTS: tuple[Grant, ...] = (
    Grant(
        GATEWAY,
        Access.READ,
        GATEWAY_SUBSCRIPTION,
        "Only the gateway identity may subscribe to the telemetry tree.",
    ),
    Grant(
        MOSQUITTO_ADMIN_ID,
        Access.READWRITE,
        DYNSEC_CONTROL,
        "Only 'pacegate pki revoke' (its mosquitto-admin certificate) commands the\n"
        "dynamic-security plugin, which closes a revoked device's live session.",
        mosquitto_only=True,
    ),
    Grant(
        DEVICE,
        Access.WRITE,
        TELEMETRY_TOPIC.format(device_id=DEVICE),
        "Every device publishes on its own topic only and subscribes to nothing.",
    ),
)


def _who(grant: Grant, gateway_identity: str) -> str:
    return gateway_identity if grant.who == GATEWAY else grant.who


def named_identities(gateway_identity: str = GATEWAY_ID) -> frozenset[str]:
    """Identities that are not devices: the device grants never apply to them."""
    named = {_who(g, gateway_identity) for g in GRANTS if g.who != DEVICE}
    return frozenset(named | RESERVED_IDS)


def allowed(
    identity: str,
    action: Action,
    topic: str,
    *,
    gateway_identity: str = GATEWAY_ID,
    mosquitto: bool = False,
) -> bool:
    """Whether ``identity`` may do ``action`` on ``topic`` (a topic name, or for SUBSCRIBE a
    filter). ``mosquitto``: include the grants only mosquitto has."""
    if topic_filter_problem(topic) is not None:
        return False
    wildcard = "+" in topic or "#" in topic
    if wildcard and action is not Action.SUBSCRIBE:
        return False  # a topic name never holds a wildcard (MQTT 3.1.1 §4.7.1)
    if identity in named_identities(gateway_identity):
        who = identity
    elif is_valid_device_id(identity):
        who = DEVICE
    else:
        return False
    if who != DEVICE:
        # What mosquitto does, and the writer below writes: an identity that is not a
        # device gets nothing on its own substitution of a device pattern (no device has
        # its name, so nobody may publish there anyway).
        for grant in _device_grants():
            if _on(grant.topic.replace(DEVICE, identity), action, topic):
                return False
    for grant in GRANTS:
        if grant.mosquitto_only and not mosquitto:
            continue
        if _who(grant, gateway_identity) != who or not grant.access.permits(action):
            continue
        rule = grant.topic.replace(DEVICE, identity) if who == DEVICE else grant.topic
        if _on(rule, action, topic):
            return True
    return False


def _on(rule: str, action: Action, topic: str) -> bool:
    """Whether the filter ``rule`` applies to ``action`` on ``topic``: a subscription only
    if it can receive nothing the rule does not match."""
    if action is Action.SUBSCRIBE:
        return filter_covers(rule, topic)
    return topic_matches(rule, topic)


def _device_grants() -> tuple[Grant, ...]:
    return tuple(g for g in GRANTS if g.who == DEVICE)


def mosquitto_acl_lines(gateway_identity: str = GATEWAY_ID) -> list[str]:
    """The rules as mosquitto acl_file lines (username = certificate CN): one ``user`` block
    per identity that is not a device, then the device ``pattern`` lines.

    A mosquitto ``pattern`` applies to every username, so each of those blocks denies that
    identity its own substitution of the device patterns (else the gateway could publish on
    ``pacemakers/gateway/telemetry``); :func:`allowed` applies the same denial."""
    devices = _device_grants()

    def denials(who: str) -> list[str]:
        return [f"topic deny {g.topic.replace(DEVICE, who)}" for g in devices]

    lines: list[str] = []
    granted = [g for g in GRANTS if g.who != DEVICE]
    for grant in granted:
        who = _who(grant, gateway_identity)
        lines += [f"# {line}" for line in grant.why.splitlines()]
        lines += [f"user {who}", f"topic {grant.access.value} {grant.topic}", *denials(who)]
        lines.append("")
    others = named_identities(gateway_identity) - {_who(g, gateway_identity) for g in granted}
    if others:
        lines.append("# Service identities with no grant: nothing, not even a device's rights.")
        for who in sorted(others):
            lines += [f"user {who}", *denials(who)]
        lines.append("")
    return lines


def mosquitto_pattern_lines() -> list[str]:
    """The device grants as mosquitto ``pattern`` lines (after every ``user`` block)."""
    lines: list[str] = []
    for grant in _device_grants():
        lines += [f"# {line}" for line in grant.why.splitlines()]
        lines += [f"pattern {grant.access.value} {grant.topic}", ""]
    return lines
