"""The channel's state machine: one table per role, ``{(state, event): next_state}``.

Anything not in the table is refused: an event caused by the peer raises
:class:`~pacegate.channel.errors.ChannelError` (reason ``unexpected_message``), one caused
by the local application raises :class:`~pacegate.errors.LocalProtocolError`.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    # client
    START = "start"
    WAIT_SERVER_HELLO = "wait_server_hello"
    WAIT_SERVER_AUTH = "wait_server_auth"
    # server
    WAIT_CLIENT_HELLO = "wait_client_hello"
    WAIT_CLIENT_AUTH = "wait_client_auth"
    # both
    ESTABLISHED = "established"
    REKEYING = "rekeying"  # client: request sent, waiting for the response
    REKEY_RESPONDED = "rekey_responded"  # server: response sent, waiting for the client's done
    CLOSED = "closed"
    ERROR = "error"


class Event(enum.Enum):
    SEND_CLIENT_HELLO = "send_client_hello"
    RECV_CLIENT_HELLO = "recv_client_hello"
    RECV_SERVER_HELLO = "recv_server_hello"  # the client answers with its ClientAuth
    RECV_CLIENT_AUTH = "recv_client_auth"  # the server answers with its ServerAuth
    RECV_SERVER_AUTH = "recv_server_auth"
    SEND_APP = "send_app"
    RECV_APP = "recv_app"
    SEND_KEY_UPDATE = "send_key_update"
    RECV_KEY_UPDATE = "recv_key_update"
    RECV_KEY_UPDATE_RESPONSE = "recv_key_update_response"  # the client answers with done
    RECV_KEY_UPDATE_DONE = "recv_key_update_done"
    # the server asks for a key update when its own rekey limit is reached
    SEND_KEY_UPDATE_REQUEST = "send_key_update_request"
    RECV_KEY_UPDATE_REQUEST = "recv_key_update_request"  # the client answers with KeyUpdate
    SEND_CLOSE = "send_close"
    RECV_CLOSE = "recv_close"


S, E = State, Event

CLIENT_TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.START, E.SEND_CLIENT_HELLO): S.WAIT_SERVER_HELLO,
    (S.WAIT_SERVER_HELLO, E.RECV_SERVER_HELLO): S.WAIT_SERVER_AUTH,
    (S.WAIT_SERVER_AUTH, E.RECV_SERVER_AUTH): S.ESTABLISHED,
    (S.ESTABLISHED, E.SEND_APP): S.ESTABLISHED,
    (S.ESTABLISHED, E.RECV_APP): S.ESTABLISHED,
    (S.ESTABLISHED, E.SEND_KEY_UPDATE): S.REKEYING,
    (S.REKEYING, E.SEND_APP): S.REKEYING,
    (S.REKEYING, E.RECV_APP): S.REKEYING,
    (S.REKEYING, E.RECV_KEY_UPDATE_RESPONSE): S.ESTABLISHED,
    (S.ESTABLISHED, E.RECV_KEY_UPDATE_REQUEST): S.REKEYING,
    (S.REKEYING, E.RECV_KEY_UPDATE_REQUEST): S.REKEYING,  # already under way
    (S.ESTABLISHED, E.SEND_CLOSE): S.CLOSED,
    (S.REKEYING, E.SEND_CLOSE): S.CLOSED,
    (S.ESTABLISHED, E.RECV_CLOSE): S.CLOSED,
    (S.REKEYING, E.RECV_CLOSE): S.CLOSED,
}

SERVER_TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.WAIT_CLIENT_HELLO, E.RECV_CLIENT_HELLO): S.WAIT_CLIENT_AUTH,
    (S.WAIT_CLIENT_AUTH, E.RECV_CLIENT_AUTH): S.ESTABLISHED,
    (S.ESTABLISHED, E.SEND_APP): S.ESTABLISHED,
    (S.ESTABLISHED, E.RECV_APP): S.ESTABLISHED,
    (S.ESTABLISHED, E.RECV_KEY_UPDATE): S.REKEY_RESPONDED,
    (S.REKEY_RESPONDED, E.SEND_APP): S.REKEY_RESPONDED,
    (S.REKEY_RESPONDED, E.RECV_APP): S.REKEY_RESPONDED,
    (S.REKEY_RESPONDED, E.RECV_KEY_UPDATE_DONE): S.ESTABLISHED,
    (S.ESTABLISHED, E.SEND_KEY_UPDATE_REQUEST): S.ESTABLISHED,
    (S.ESTABLISHED, E.SEND_CLOSE): S.CLOSED,
    (S.REKEY_RESPONDED, E.SEND_CLOSE): S.CLOSED,
    (S.ESTABLISHED, E.RECV_CLOSE): S.CLOSED,
    (S.REKEY_RESPONDED, E.RECV_CLOSE): S.CLOSED,
}

# States in which application messages may flow.
OPEN_STATES = frozenset({S.ESTABLISHED, S.REKEYING, S.REKEY_RESPONDED})
