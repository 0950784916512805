"""pacegate's amqtt plugins: who may connect (certificate identity = client id, not
revoked) and what each identity may do with which topic.

Both plugins judge the *connection's* certificate, never ``session.ssl_object``: for a
persistent (``clean_session=False``) client id amqtt hands over the session object of the
previous connection, whose ``ssl_object`` is that connection's certificate. The broker
(``broker.server``) binds each accepted session to the certificate of the
connection that owns it (:data:`IDENTITY_KEY`, :data:`CERT_KEY` in ``session.attributes``)
and publishes the certificate of the connection being handled in :data:`CONN_CERT`.

Rules (ARCHITECTURE.md):
- the MQTT client id must equal the identity in the client certificate (its CN);
- what each identity may publish, subscribe to and receive is :mod:`pacegate.acl` (a device
  publishes on its own telemetry topic only; only the gateway reads ``pacemakers/#``);
- anything else is refused and logged as a security event (never with a payload).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from broker.amqtt_api import Action, BaseAuthPlugin, BaseTopicPlugin, Session
from pacegate import acl
from pacegate.log import security_event
from pacegate.tlsconf import peer_identity

COMPONENT = "broker"


# ``session.attributes`` keys: the identity and certificate (DER) of the connection that
# owns the session, set by the broker once the CONNECT's client id matched that identity.
IDENTITY_KEY = "pacegate.identity"
CERT_KEY = "pacegate.cert_der"
SERIAL_KEY = "pacegate.cert_serial"  # that certificate's serial (None if it has none)

# The client certificate (DER) of the connection handled by the current task, set by the
# broker right after the TLS handshake (each connection is its own task).
CONN_CERT: ContextVar[bytes | None] = ContextVar("pacegate_conn_cert", default=None)


def session_identity(session: Session | None) -> str | None:
    """The certificate identity bound to ``session`` by the broker (None: not bound)."""
    if session is None:
        return None
    identity = session.attributes.get(IDENTITY_KEY)
    return identity if isinstance(identity, str) else None


def _remote(session: Session) -> str:
    return f"{session.remote_address}:{session.remote_port}"


class _GuardMixin:
    context: Any

    def _revoked(self, der: bytes) -> bool:
        guard = getattr(self.context._broker_instance, "guard", None)
        return bool(guard is not None and guard.is_revoked_der(der))


class CertIdentityAuthPlugin(_GuardMixin, BaseAuthPlugin):  # type: ignore[misc]
    """CONNECT is accepted only if the identity in the certificate of the connection being
    handled (:data:`CONN_CERT`) is the client id, and that certificate is not revoked."""

    async def authenticate(self, *, session: Session) -> bool | None:
        der = CONN_CERT.get()
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
        if session.client_id != identity or session_identity(session) != identity:
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


# amqtt's actions are the ACL's, by value
_ACTIONS = {action: acl.Action(action.value) for action in Action}


def device_may(identity: str, topic: str, action: Action, gateway_identity: str) -> bool:
    """The topic ACL (:func:`pacegate.acl.allowed`, the one definition mosquitto's ACL file
    is written from too) for an amqtt action; ``topic`` is a topic name or a filter."""
    return acl.allowed(identity, _ACTIONS[action], topic, gateway_identity=gateway_identity)


class TopicAclPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Enforces :func:`device_may` for the identity bound to the session (that of the
    certificate of the connection owning it); a refused PUBLISH is dropped before any
    broadcast. An unbound session may do nothing."""

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
        identity = session_identity(session)
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
