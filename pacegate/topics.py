"""MQTT topic names and filters (MQTT 3.1.1 §4.7), pure: a filter's syntax, whether a filter
matches a topic name, and whether one filter covers another.

The gateway's routes (``gateway.config``, ``gateway.topics``) and the topic ACL
(:mod:`pacegate.acl`) both match through these functions, so they cannot disagree about
what ``+``, ``#`` and ``$`` mean.
"""

from __future__ import annotations

MQTT_TOPIC_MAX_BYTES = 65535  # MQTT 3.1.1 §1.5.3: a UTF-8 string with a 16-bit length

# The same rule as topic_filter_problem, for the JSON Schema (editors): '+' fills a level,
# '#' only at the end.
TOPIC_FILTER_PATTERN = r"^(?:(?:\+|[^+#/\u0000]*)/)*(?:\+|#|[^+#/\u0000]*)$"


def topic_filter_problem(topic: str) -> tuple[str, str] | None:
    """Why ``topic`` is not a valid MQTT subscription filter, as (problem, fix), or None."""
    if not topic:
        return "a topic filter cannot be empty", "write e.g. 'pacemakers/+/telemetry'"
    if len(topic.encode("utf-8")) > MQTT_TOPIC_MAX_BYTES:
        return f"longer than {MQTT_TOPIC_MAX_BYTES} bytes", "shorten the filter"
    if "\x00" in topic:
        return "contains a NUL character", "remove it"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return (
                f"'+' must fill a whole topic level (level {i} is {level!r})",
                "write '/+/' between slashes, e.g. 'pacemakers/+/telemetry'",
            )
        if "#" in level and level != "#":
            return (
                f"'#' must fill a whole topic level (level {i} is {level!r})",
                "write '#' alone after the last '/', e.g. 'pacemakers/#'",
            )
        if level == "#" and i != len(levels) - 1:
            return "'#' must be the last level", "move '#' to the end or use '+' for one level"
    return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether the topic name ``topic`` matches the valid filter ``topic_filter``."""
    levels = topic_filter.split("/")
    parts = topic.split("/")
    # MQTT 3.1.1 §4.7.2: a filter starting with a wildcard does not match a '$' topic
    if parts[0].startswith("$") and levels[0] in ("+", "#"):
        return False
    if levels[-1] == "#":
        # 'a/#' also matches 'a' itself (§4.7.1.2)
        if len(parts) < len(levels) - 1:
            return False
        levels = levels[:-1]
        parts = parts[: len(levels)]
    elif len(parts) != len(levels):
        return False
    return all(want in ("+", got) for want, got in zip(levels, parts, strict=True))


def filter_covers(outer: str, inner: str) -> bool:
    """Whether every topic name the filter ``inner`` matches is matched by ``outer`` too
    (both valid filters): what a subscription to ``inner`` may receive, ``outer`` allows."""
    o, i = outer.split("/"), inner.split("/")
    if i[0] in ("+", "#") and o[0] not in ("+", "#"):
        # 'inner' reaches topics whose first level is not o[0]
        return False
    for n, want in enumerate(o):
        if want == "#":
            return True
        if n >= len(i):
            return False
        got = i[n]
        if got == "#" or (want != "+" and got != want):
            return False
    return len(i) == len(o)
