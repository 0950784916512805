"""Every amqtt name pacegate's embedded broker overrides, calls or reads, in one table.

pacegate enforces its guarantees by subclassing amqtt 0.12.1 (``server.py``,
``delivery.py``, ``strict.py``, ``plugins.py``), and much of what it hooks is private to
amqtt. ``tests/test_amqtt_contract.py`` reads :data:`AMQTT_HOOKS` and asserts that each
name still exists with the parameters listed here, so an amqtt upgrade that renames or
reshapes one fails in CI instead of silently switching a check off in production. A new
contact with amqtt goes into this table in the same change.
"""

from __future__ import annotations

from dataclasses import dataclass

# the version the table was checked against (pyproject.toml pins it)
AMQTT_VERSION = "0.12.1"


@dataclass(frozen=True)
class Hook:
    """``owner`` (a dotted class or module path) has ``name``.

    kind ``"method"``: a callable whose parameters (without ``self``/``cls``) are
    ``params``, in order; ``"attr"``: an instance attribute that a method of ``owner``
    assigns (``self.<name> =``); ``"member"``: a class or module member (enum value,
    constant, class)."""

    owner: str
    name: str
    kind: str = "method"
    params: tuple[str, ...] = ()
    why: str = ""


_BROKER = "amqtt.broker.Broker"
_HANDLER = "amqtt.mqtt.protocol.handler.ProtocolHandler"
_BROKER_HANDLER = "amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler"
_SESSION = "amqtt.session.Session"

AMQTT_HOOKS: tuple[Hook, ...] = (
    # -- Broker: overridden (server.py) --------------------------------------------------
    Hook(_BROKER, "__init__", params=("config", "loop", "plugin_namespace")),
    Hook(_BROKER, "_create_ssl_context", params=("listener",), why="our CRL-aware context"),
    Hook(
        _BROKER,
        "_create_server_instance",
        params=("listener_name", "listener_type", "address", "port", "ssl_context"),
        why="TLS per connection, with the newest context",
    ),
    Hook(_BROKER, "stream_connected", params=("reader", "writer", "listener_name")),
    Hook(_BROKER, "_client_connected", params=("listener_name", "reader", "writer")),
    Hook(
        _BROKER,
        "_initialize_client_session",
        params=("reader", "writer", "remote_address", "remote_port"),
        why="CONNECT judged against the certificate before any session is touched; takeover",
    ),
    Hook(_BROKER, "_delete_session", params=("client_id",)),
    Hook(
        _BROKER,
        "_handle_client_session",
        params=("reader", "writer", "client_session", "handler", "server", "listener_name"),
        why="authenticate before amqtt's takeover",
    ),
    Hook(
        _BROKER,
        "_handle_message_delivery",
        params=("client_session", "handler", "wait_deliver"),
        why="payload size, topic checks and ACL before relay",
    ),
    Hook(_BROKER, "_publish_session_retained_messages", params=("session",)),
    Hook(
        _BROKER,
        "_publish_retained_messages_for_subscription",
        params=("subscription", "session"),
        why="amqtt sends retained messages for filters the session does not hold",
    ),
    Hook(_BROKER, "retain_message", params=("source_session", "topic_name", "data", "qos")),
    Hook(_BROKER, "add_subscription", params=("subscription", "session"), why="QoS <= 1"),
    Hook(
        _BROKER,
        "_topic_filtering",
        params=("session", "topic", "action"),
        why="allowed ACL decisions remembered",
    ),
    Hook(
        _BROKER,
        "_broadcast_message",
        params=("session", "topic", "data", "force_qos"),
        why="end-to-end acknowledgement tickets (delivery.py)",
    ),
    Hook(
        _BROKER,
        "_retain_broadcast_message",
        params=("broadcast", "qos", "target_session"),
        why="offline queue bound and compaction (delivery.py)",
    ),
    # -- Broker: called ------------------------------------------------------------------
    Hook(_BROKER, "_authenticate", params=("session", "_")),
    Hook(_BROKER, "_get_handler", params=("session",)),
    Hook(_BROKER, "_matches", params=("topic", "a_filter")),
    Hook(_BROKER, "start"),
    Hook(_BROKER, "shutdown"),
    # -- Broker: state read --------------------------------------------------------------
    Hook(_BROKER, "_run_broadcast", params=("running_tasks",), why="several per pass"),
    Hook(_BROKER, "_broadcast_queue", kind="attr"),
    Hook(_BROKER, "_servers", kind="attr"),
    Hook(_BROKER, "_sessions", kind="attr"),
    Hook(_BROKER, "_subscriptions", kind="attr"),
    Hook(_BROKER, "_retained_messages", kind="attr"),
    Hook(_BROKER, "_loop", kind="attr"),
    Hook(_BROKER, "config", kind="attr"),
    Hook(_BROKER, "listeners_config", kind="attr"),
    Hook(_BROKER, "plugins_manager", kind="attr"),
    Hook("amqtt.broker.BrokerContext", "_broker_instance", kind="attr", why="plugins.py"),
    # -- protocol handlers (delivery.py, strict.py) ---------------------------------------
    Hook(_HANDLER, "start"),
    Hook(_HANDLER, "stop"),
    Hook(_HANDLER, "_reader_loop", why="replaced by strict.StrictHandler's judging loop"),
    Hook(_HANDLER, "_send_packet", params=("packet",)),
    Hook(_HANDLER, "_retry_deliveries"),
    Hook(_HANDLER, "_handle_message_flow", params=("app_message",)),
    Hook(_HANDLER, "_handle_qos1_message_flow", params=("app_message",)),
    Hook(_HANDLER, "mqtt_publish", params=("topic", "data", "qos", "retain", "ack_timeout")),
    Hook(_HANDLER, "handle_publish", params=("publish_packet",)),
    Hook(_HANDLER, "handle_puback", params=("puback",)),
    Hook(_HANDLER, "_puback_waiters", kind="attr"),
    Hook(_HANDLER, "_reader_ready", kind="attr"),
    Hook(_HANDLER, "_reader_stopped", kind="attr"),
    Hook(_HANDLER, "session", kind="attr"),
    Hook(_HANDLER, "reader", kind="attr"),
    Hook(_HANDLER, "writer", kind="attr"),
    Hook(_BROKER_HANDLER, "__init__", params=("plugins_manager", "session", "loop")),
    Hook(
        _BROKER_HANDLER, "init_from_connect", params=("reader", "writer", "plugins_manager", "loop")
    ),
    Hook(_BROKER_HANDLER, "attach", params=("session", "reader", "writer")),
    Hook(_BROKER_HANDLER, "mqtt_connack_authorize", params=("authorize",)),
    Hook(_BROKER_HANDLER, "handle_connection_closed"),
    Hook(_BROKER_HANDLER, "handle_disconnect", params=("disconnect",)),
    Hook(_BROKER_HANDLER, "handle_subscribe", params=("subscribe",)),
    Hook(_BROKER_HANDLER, "handle_unsubscribe", params=("unsubscribe",)),
    Hook(_BROKER_HANDLER, "handle_pingreq", params=("pingreq",)),
    Hook(_BROKER_HANDLER, "_disconnect_waiter", kind="attr"),
    Hook(_BROKER_HANDLER, "_pending_subscriptions", kind="attr", why="bounded in strict.py"),
    Hook(_BROKER_HANDLER, "_pending_unsubscriptions", kind="attr", why="bounded in strict.py"),
    Hook("amqtt.mqtt.protocol.broker_handler", "Subscription", kind="member"),
    Hook("amqtt.mqtt.protocol.broker_handler", "UnSubscription", kind="member"),
    # -- packets and adapters (strict.py decodes from bytes already judged) --------------
    Hook("amqtt.mqtt", "packet_class", params=("fixed_header",)),
    Hook(
        "amqtt.mqtt.packet.MQTTFixedHeader", "__init__", params=("packet_type", "flags", "length")
    ),
    Hook(
        "amqtt.mqtt.packet.MQTTPacket",
        "from_stream",
        params=("reader", "fixed_header", "variable_header"),
    ),
    Hook("amqtt.adapters.BufferReader", "__init__", params=("buffer",)),
    Hook("amqtt.adapters.StreamReaderAdapter", "read", params=("n",)),
    Hook("amqtt.adapters.StreamWriterAdapter", "write", params=("data",), why="coalesced"),
    Hook("amqtt.adapters.StreamWriterAdapter", "close"),
    Hook("amqtt.adapters.StreamWriterAdapter", "_writer", kind="attr"),
    Hook("amqtt.adapters.StreamWriterAdapter", "is_closed", kind="attr"),
    Hook("amqtt.adapters.WriterAdapter", "get_ssl_info"),
    Hook("amqtt.adapters.WriterAdapter", "get_peer_info"),
    # -- sessions ------------------------------------------------------------------------
    *(
        Hook(_SESSION, name, kind="attr")
        for name in (
            "client_id",
            "clean_session",
            "will_flag",
            "will_topic",
            "will_message",
            "keep_alive",
            "username",
            "password",
            "remote_address",
            "remote_port",
            "ssl_object",
            "parent",
            "attributes",
            "transitions",
            "inflight_in",
            "inflight_out",
            "retained_messages",
        )
    ),
    Hook(_SESSION, "next_packet_id", kind="member"),
    # -- plugins (plugins.py) ------------------------------------------------------------
    Hook("amqtt.plugins.base.BasePlugin", "Config", kind="member", why="plugin options"),
    Hook("amqtt.plugins.base.BaseAuthPlugin", "authenticate", params=("session",)),
    Hook(
        "amqtt.plugins.base.BaseTopicPlugin",
        "topic_filtering",
        params=("session", "topic", "action"),
    ),
    *(Hook("amqtt.contexts.Action", m, kind="member") for m in ("PUBLISH", "SUBSCRIBE", "RECEIVE")),
)
