"""MQTT topic filters: their syntax, and which device a published topic names. Pure.

The gateway's routes are MQTT subscription filters; the parser (``gateway.config``) refuses a
filter :func:`topic_filter_problem` objects to, and the pipeline asks :func:`device_id_in` which
device a message's topic belongs to.
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


def device_id_in(levels: tuple[str, ...], device_id_level: int, topic: str) -> str | None:
    """The device id in ``topic`` if it matches the filter split into ``levels``, else None.

    ``levels`` is a valid filter (:func:`topic_filter_problem` passed it) whose level
    ``device_id_level`` is a '+'."""
    parts = topic.split("/")
    if levels and levels[-1] == "#":
        if len(parts) < len(levels) - 1:
            return None
        fixed = levels[:-1]
    else:
        if len(parts) != len(levels):
            return None
        fixed = levels
    for want, got in zip(fixed, parts, strict=False):
        if want != "+" and want != got:
            return None
    # MQTT 3.1.1 §4.7.2: wildcards at the first level do not match '$' topics
    if parts[0].startswith("$") and levels[0] in ("+", "#"):
        return None
    return parts[device_id_level]
