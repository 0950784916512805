"""pacegate's amqtt plugins: who may connect (certificate identity = client id, not
revoked) and what each identity may do with which topic.

Rules (ARCHITECTURE.md):
- the MQTT client id must equal the identity in the client certificate (its CN);
- a device publishes only on ``pacemakers/<its id>/telemetry`` and subscribes to nothing;
- only the gateway identity subscribes, and only to ``pacemakers/#`` or narrower filters
  under ``pacemakers/``; it publishes nothing;
- anything else is refused and logged as a security event (never with a payload).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from pacegate.identity import is_valid_device_id, telemetry_topic
from pacegate.log import security_event
from pacegate.tlsconf import peer_identity

COMPONENT = "broker"
TELEMETRY_ROOT = "pacemakers/"


def session_peer_cert(session: Session | None) -> bytes | None:
    if session is None or session.ssl_object is None:
        return None
    der = session.ssl_object.getpeercert(binary_form=True)
    return der if der else None


def _remote(session: Session) -> str:
    return f"{session.remote_address}:{session.remote_port}"


class _GuardMixin:
    context: Any

    def _revoked(self, der: bytes) -> bool:
        guard = getattr(self.context._broker_instance, "guard", None)
        return bool(guard is not None and guard.is_revoked_der(der))


class CertIdentityAuthPlugin(_GuardMixin, BaseAuthPlugin):  # type: ignore[misc]
    """CONNECT is accepted only if the certificate's identity is the client id."""

    async def authenticate(self, *, session: Session) -> bool | None:
        der = session_peer_cert(session)
        identity = peer_identity(der)
        if der is None or identity is None:
            security_event(
                "connect_refused",
                component=COMPONENT,
                reason="no_client_certificate",
                peer=_remote(session),
                client_id=session.client_id,
            )
            return False
        if session.client_id != identity:
            security_event(
                "connect_refused",
                component=COMPONENT,
                reason="client_id_mismatch",
                peer=identity,
                client_id=session.client_id,
                remote=_remote(session),
            )
            return False
        if self._revoked(der):
            security_event(
                "connect_refused",
                component=COMPONENT,
                reason="certificate_revoked",
                peer=identity,
                remote=_remote(session),
            )
            return False
        return True


def device_may(identity: str, topic: str, action: Action, gateway_identity: str) -> bool:
    """The topic ACL as a pure function (``topic`` is a topic name or a filter)."""
    if identity == gateway_identity:
        if action is Action.SUBSCRIBE:
            return topic == "pacemakers/#" or (
                topic.startswith(TELEMETRY_ROOT) and topic.endswith("/telemetry")
            )
        if action is Action.RECEIVE:
            return topic.startswith(TELEMETRY_ROOT)
        return False
    if not is_valid_device_id(identity):
        return False
    if action is Action.PUBLISH:
        return topic == telemetry_topic(identity)
    return False  # devices subscribe to (and so receive) nothing


class TopicAclPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Enforces :func:`device_may`; a refused PUBLISH is dropped before any broadcast."""

    @dataclass
    class Config:
        gateway_identity: str = "gateway"

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or topic is None or action is None:
            return False
        identity = peer_identity(session_peer_cert(session))
        if identity is not None and device_may(
            identity, topic, action, self.config.gateway_identity
        ):
            return True
        if action is not Action.RECEIVE:
            security_event(
                f"{action.value}_refused",
                component=COMPONENT,
                reason="topic_acl",
                peer=identity or session.client_id,
                topic=topic,
            )
        return False
