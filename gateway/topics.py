"""Which device a published topic names, for a route's filter. Pure.

Filter syntax and matching are the core's (:mod:`pacegate.topics`), shared with the broker's
topic ACL; this module only adds the route's rule that one '+' level holds the device id.
"""

from __future__ import annotations

from pacegate.topics import topic_matches


def device_id_in(topic_filter: str, device_id_level: int, topic: str) -> str | None:
    """The device id in ``topic`` if it matches ``topic_filter``, else None.

    ``topic_filter`` is valid (:func:`pacegate.topics.topic_filter_problem` passed it) and
    its level ``device_id_level`` is a '+'."""
    if not topic_matches(topic_filter, topic):
        return None
    return topic.split("/")[device_id_level]
