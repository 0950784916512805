"""The one module that imports amqtt: every amqtt name the embedded broker uses.

pacegate's broker is amqtt 0.12.1 subclassed and hooked (``server.py``, ``delivery.py``,
``strict.py``, ``plugins.py``); those modules take amqtt's names from here only, so the
whole surface pacegate depends on is this list, and :data:`broker.amqtt_hooks.AMQTT_HOOKS`
the members of it pacegate overrides, calls or reads. ``tests/test_amqtt_contract.py``
checks both: each hooked name exists with the expected signature, and no other module of
pacegate imports amqtt. An amqtt upgrade therefore starts here.
"""

from __future__ import annotations

from amqtt.adapters import (
    BufferReader,
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WriterAdapter,
)
from amqtt.broker import Broker, Server
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.plugins.manager import PluginManager
from amqtt.session import (
    OUTGOING,
    ApplicationMessage,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)

__all__ = [
    "OUTGOING",
    "QOS_0",
    "QOS_1",
    "AMQTTError",
    "Action",
    "ApplicationMessage",
    "BaseAuthPlugin",
    "BaseTopicPlugin",
    "Broker",
    "BrokerProtocolHandler",
    "BufferReader",
    "DisconnectPacket",
    "IncomingApplicationMessage",
    "ListenerType",
    "MQTTError",
    "MQTTFixedHeader",
    "NoDataError",
    "OutgoingApplicationMessage",
    "PluginManager",
    "ProtocolHandler",
    "PubackPacket",
    "PublishPacket",
    "ReaderAdapter",
    "Server",
    "Session",
    "StreamReaderAdapter",
    "StreamWriterAdapter",
    "Subscription",
    "UnSubscription",
    "WriterAdapter",
    "packet_class",
]
