"""The topic ACL is defined once (pacegate/acl.py): the embedded broker's plugin decides with
it, mosquitto's acl_file is written from it, and the two agree on a table of cases.

Mosquitto's decision is computed by evaluating the generated file the way mosquitto 2.0.11
does (src/security_default.c, ``mosquitto_acl_check_default``; lib/util_topic.c,
``mosquitto_topic_matches_sub``), written out here independently of pacegate's own matcher;
a real mosquitto and the embedded broker then confirm the case that the old files disagreed
on."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from amqtt.contexts import Action as AmqttAction

from broker.plugins import device_may
from pacegate.acl import Action, allowed
from pacegate.identity import telemetry_topic
from pacegate.pki.mosquitto import mosquitto_acl
from pacegate.topics import filter_covers, topic_matches
from tests.support import BrokerHandle, connect_as, wait_until

REPO = Path(__file__).resolve().parent.parent
EMPTY_REGISTRY: dict[str, dict[str, object]] = {"devices": {}}


# -- mosquitto 2.0.11's acl_file, as its source evaluates it ----------------------------------
def _mosquitto_matches(sub: str, topic: str) -> bool:
    """lib/util_topic.c mosquitto_topic_matches_sub: '$' on one side only never matches."""
    if sub.startswith("$") != topic.startswith("$"):
        return False
    s, t = sub.split("/"), topic.split("/")
    for i, level in enumerate(s):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(s) == len(t)


def _parse(text: str) -> tuple[dict[str, list[tuple[str, str]]], list[tuple[str, str]]]:
    users: dict[str, list[tuple[str, str]]] = {}
    patterns: list[tuple[str, str]] = []
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "user":
            current = users.setdefault(rest, [])
        elif word in ("topic", "pattern"):
            access, _, topic = rest.partition(" ")
            if not topic:  # 'topic X' alone means readwrite
                access, topic = "readwrite", access
            (patterns if word == "pattern" else current if current is not None else []).append(
                (access, topic)
            )
    return users, patterns


_GRANTS = {"read": {"read"}, "write": {"write"}, "readwrite": {"read", "write"}, "deny": set()}


def mosquitto_allows(acl_text: str, username: str, access: str, topic: str) -> bool:
    """mosquitto_acl_check_default for a client whose username and client id are its CN
    (pacegate's identity plugin sets the username to the CN and refuses any other client
    id); ``access`` 'read' or 'write'."""
    users, patterns = _parse(acl_text)

    def check(rules: list[tuple[str, str]], subst: bool) -> bool | None:
        # "ACL denials are iterated over first" (deny entries are put at the list's front)
        for acc, rule in sorted(rules, key=lambda r: r[0] != "deny"):
            if subst:
                rule = rule.replace("%c", username).replace("%u", username)
            if _mosquitto_matches(rule, topic):
                if acc == "deny":
                    return False
                if access in _GRANTS[acc]:
                    return True
        return None

    verdict = check(users.get(username, []), subst=False)
    if verdict is not None:
        return verdict
    if patterns and ("+" in username or "#" in username):
        return False  # "ACL denying access to client with dangerous username"
    return bool(check(patterns, subst=True))


# -- the table ----------------------------------------------------------------------------------
IDENTITIES = ["gateway", "pm-0001", "pm-0002", "mosquitto-admin", "broker", "hospital", "PM+1"]
TOPICS = [
    "pacemakers/pm-0001/telemetry",
    "pacemakers/pm-0002/telemetry",
    "pacemakers/gateway/telemetry",
    "pacemakers/mosquitto-admin/telemetry",
    "pacemakers/hospital/telemetry",
    "pacemakers/pm-0001/alarm",
    "pacemakers/pm-0001/telemetry/extra",
    "pacemakers",
    "hospital/records",
    "$CONTROL/dynamic-security/v1",
    "$SYS/broker/clients",
]
ACCESS = {Action.PUBLISH: "write", Action.RECEIVE: "read"}
# What only mosquitto has: its dynamic-security plugin, commanded by mosquitto-admin.
MOSQUITTO_ONLY = {
    ("mosquitto-admin", Action.PUBLISH, "$CONTROL/dynamic-security/v1"),
    ("mosquitto-admin", Action.RECEIVE, "$CONTROL/dynamic-security/v1"),
}
CASES = list(itertools.product(IDENTITIES, ACCESS, TOPICS))


@pytest.mark.parametrize(("identity", "action", "topic"), CASES)
def test_embedded_plugin_and_generated_mosquitto_acl_agree(
    identity: str, action: Action, topic: str
) -> None:
    text = mosquitto_acl(EMPTY_REGISTRY)
    on_mosquitto = mosquitto_allows(text, identity, ACCESS[action], topic)
    assert allowed(identity, action, topic, mosquitto=True) == on_mosquitto
    plugin = device_may(identity, topic, AmqttAction(action.value), "gateway")
    if (identity, action, topic) in MOSQUITTO_ONLY:
        assert on_mosquitto
        assert not plugin
    else:
        assert plugin == on_mosquitto


def test_the_table_covers_every_grant_and_some_refusals() -> None:
    decided = {c: allowed(*c, mosquitto=True) for c in CASES}
    assert decided[("gateway", Action.RECEIVE, "pacemakers/pm-0001/telemetry")]
    assert decided[("pm-0001", Action.PUBLISH, "pacemakers/pm-0001/telemetry")]
    assert decided[("mosquitto-admin", Action.PUBLISH, "$CONTROL/dynamic-security/v1")]
    assert sum(decided.values()) < len(decided) // 4


@pytest.mark.parametrize(
    ("identity", "action", "topic", "expected"),
    [
        ("pm-0001", Action.PUBLISH, "pacemakers/pm-0001/telemetry", True),
        ("pm-0001", Action.PUBLISH, "pacemakers/pm-0002/telemetry", False),
        ("pm-0001", Action.PUBLISH, "pacemakers/+/telemetry", False),  # no wildcard names
        ("pm-0001", Action.SUBSCRIBE, "pacemakers/pm-0001/telemetry", False),
        ("pm-0001", Action.RECEIVE, "pacemakers/pm-0001/telemetry", False),
        ("gateway", Action.SUBSCRIBE, "pacemakers/#", True),
        ("gateway", Action.SUBSCRIBE, "pacemakers/+/telemetry", True),
        ("gateway", Action.SUBSCRIBE, "pacemakers/+/alarm", True),  # inside pacemakers/#
        ("gateway", Action.SUBSCRIBE, "#", False),
        ("gateway", Action.SUBSCRIBE, "+/pm-0001/telemetry", False),
        ("gateway", Action.SUBSCRIBE, "pacemakers/#/telemetry", False),  # not a filter
        ("gateway", Action.PUBLISH, "pacemakers/gateway/telemetry", False),
        ("gateway", Action.PUBLISH, "pacemakers/pm-0001/telemetry", False),
        ("gateway", Action.RECEIVE, "$SYS/broker/clients", False),
        ("mosquitto-admin", Action.PUBLISH, "$CONTROL/dynamic-security/v1", False),
        ("hospital", Action.PUBLISH, "pacemakers/hospital/telemetry", False),
        ("PM-0001", Action.PUBLISH, "pacemakers/PM-0001/telemetry", False),  # not a device id
    ],
)
def test_acl_rule(identity: str, action: Action, topic: str, expected: bool) -> None:
    assert allowed(identity, action, topic) is expected


def test_a_configured_gateway_identity_takes_the_gateways_grant() -> None:
    assert allowed("gw-ward3", Action.SUBSCRIBE, "pacemakers/#", gateway_identity="gw-ward3")
    assert not allowed("gw-ward3", Action.PUBLISH, "pacemakers/gw-ward3/telemetry",
                       gateway_identity="gw-ward3")  # fmt: skip
    assert not allowed("gateway", Action.SUBSCRIBE, "pacemakers/#", gateway_identity="gw-ward3")


@pytest.mark.parametrize(
    ("outer", "inner", "covered"),
    [
        ("pacemakers/#", "pacemakers/#", True),
        ("pacemakers/#", "pacemakers", True),
        ("pacemakers/#", "pacemakers/+/x/#", True),
        ("pacemakers/#", "#", False),
        ("pacemakers/#", "+/a", False),
        ("pacemakers/+/telemetry", "pacemakers/pm-1/telemetry", True),
        ("pacemakers/+/telemetry", "pacemakers/#", False),
        ("pacemakers/pm-1/telemetry", "pacemakers/+/telemetry", False),
        ("a/b", "a/b/c", False),
    ],
)
def test_filter_covers(outer: str, inner: str, covered: bool) -> None:
    assert filter_covers(outer, inner) is covered
    if covered:  # spot-check with a topic name the inner filter matches
        name = inner.replace("+", "x").replace("/#", "").replace("#", "x")
        assert topic_matches(outer, name)


def test_committed_mosquitto_acl_is_the_generated_one() -> None:
    committed = (REPO / "mosquitto" / "acl").read_text()
    assert committed == mosquitto_acl(EMPTY_REGISTRY), (
        "mosquitto/acl is stale: write pacegate.pki.mosquitto.mosquitto_acl({'devices': {}}) "
        "into it"
    )


@pytest.mark.integration
def test_gateway_cannot_publish_even_on_the_topic_named_after_it(broker: BrokerHandle) -> None:
    # The old mosquitto ACL gave every username, the gateway's too, the device pattern
    # pacemakers/%u/telemetry; the gateway (which reads pacemakers/#) would then have
    # received its own forgery as if a device named 'gateway' had sent it.
    outcome, gw = connect_as(broker, "gateway")
    assert outcome.connected
    assert gw is not None
    dev = None
    try:
        assert gw.subscribe("pacemakers/#") == [1]
        gw.publish(telemetry_topic("pm-0001").replace("pm-0001", "gateway"), b"forged")
        out, dev = connect_as(broker, "pm-0001")
        assert out.connected
        assert dev is not None
        dev.publish(telemetry_topic("pm-0001"), b"own")  # the marker, after the forgery
        assert wait_until(lambda: (telemetry_topic("pm-0001"), b"own") in gw.messages)
        time.sleep(0.2)  # room for a wrongly delivered copy
        assert [p for _, p in gw.messages] == [b"own"]
    finally:
        if dev is not None:
            dev.close()
        gw.close()
