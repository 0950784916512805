"""The sans-IO channel core, two sessions wired together in memory (no sockets)."""

from __future__ import annotations

import pytest

from pacegate.channel import ChannelError, ChannelIdentity
from pacegate.channel import keyschedule as ks
from pacegate.channel.session import (
    MIN_MESSAGE_SIZE_LIMIT,
    NEED_DATA,
    ChannelEvent,
    ChannelSession,
    HandshakeComplete,
    Message,
    PeerClosed,
)
from pacegate.channel.states import CLIENT_TRANSITIONS, SERVER_TRANSITIONS, State
from pacegate.channel.wire import FRAME_HEADER, FRAME_HEADER_SIZE, ClientHello, FrameType
from pacegate.errors import LocalProtocolError

HOSPITAL = ChannelIdentity.generate("hospital")
GATEWAY = ChannelIdentity.generate("gateway")


def new_pair(**opts: object) -> tuple[ChannelSession, ChannelSession]:
    client_opts = {k[2:]: v for k, v in opts.items() if k.startswith("c_")}
    server_opts = {k[2:]: v for k, v in opts.items() if k.startswith("s_")}
    client = ChannelSession.client(
        GATEWAY, server_name="hospital", server_key=HOSPITAL.public_key, **client_opts
    )
    server = ChannelSession.server(
        HOSPITAL, allowed_clients={"gateway": GATEWAY.public_key}, **server_opts
    )
    return client, server


def events(session: ChannelSession, data: bytes = b"") -> list[ChannelEvent]:
    if data:
        session.receive_data(data)
    out = []
    while (e := session.next_event()) is not NEED_DATA:
        out.append(e)
        if isinstance(e, PeerClosed):
            break
    return out


def handshake(client: ChannelSession, server: ChannelSession) -> None:
    assert events(server, client.initiate()) == []
    assert events(client, server.data_to_send()) == []  # ServerHello -> our ClientAuth
    assert events(server, client.data_to_send()) == [HandshakeComplete("gateway")]
    assert events(client, server.data_to_send()) == [HandshakeComplete("hospital")]


def test_in_memory_handshake_authenticates_both_and_carries_messages_both_ways() -> None:
    client, server = new_pair()
    handshake(client, server)
    assert client.state is State.ESTABLISHED and server.state is State.ESTABLISHED
    assert events(server, client.send(b"reading")) == [Message(b"reading")]
    assert events(client, server.send(b"stored")) == [Message(b"stored")]
    assert events(server, client.send(b"")) == [Message(b"")]


def test_messages_larger_than_a_record_are_fragmented_and_reassembled() -> None:
    client, server = new_pair()
    handshake(client, server)
    big = bytes(range(256)) * 4000  # ~1 MB, 16 records
    wire = client.send(big)
    assert client.stats.records_sent >= 16
    assert events(server, wire) == [Message(big)]


def test_send_before_the_handshake_is_a_local_error() -> None:
    client, _ = new_pair()
    with pytest.raises(LocalProtocolError):
        client.send(b"too early")


def test_message_over_the_local_limit_is_a_local_error() -> None:
    client, server = new_pair(c_max_message_size=MIN_MESSAGE_SIZE_LIMIT)
    handshake(client, server)
    with pytest.raises(LocalProtocolError):
        client.send(bytes(MIN_MESSAGE_SIZE_LIMIT + 1))


def test_message_over_the_receivers_limit_closes_the_session() -> None:
    client, server = new_pair(
        c_max_message_size=4 * MIN_MESSAGE_SIZE_LIMIT, s_max_message_size=MIN_MESSAGE_SIZE_LIMIT
    )
    handshake(client, server)
    with pytest.raises(ChannelError) as info:
        events(server, client.send(bytes(2 * MIN_MESSAGE_SIZE_LIMIT)))
    assert info.value.reason == "message_too_large"
    assert server.state is State.ERROR


def test_server_refuses_a_server_hello_as_the_first_frame() -> None:
    _client, server = new_pair()
    other_client, other_server = new_pair()
    events(other_server, other_client.initiate())
    with pytest.raises(ChannelError) as info:
        events(server, other_server.data_to_send())
    assert info.value.reason == "unexpected_message"


def test_client_refuses_a_client_hello() -> None:
    hello = new_pair()[0].initiate()
    client, _ = new_pair()
    client.initiate()
    with pytest.raises(ChannelError) as info:
        events(client, hello)
    assert info.value.reason == "unexpected_message"


def test_second_client_hello_after_the_handshake_is_refused() -> None:
    client, server = new_pair()
    handshake(client, server)
    late, _ = new_pair()
    with pytest.raises(ChannelError) as info:
        events(server, late.initiate())
    assert info.value.reason == "unexpected_message"


def test_reflected_record_is_refused_one_key_per_direction() -> None:
    client, server = new_pair()
    handshake(client, server)
    own = client.send(b"reflect me")
    with pytest.raises(ChannelError) as info:
        events(client, own)
    assert info.value.reason == "bad_record"


def test_record_spliced_from_another_session_is_refused() -> None:
    c1, s1 = new_pair()
    c2, s2 = new_pair()
    handshake(c1, s1)
    handshake(c2, s2)
    with pytest.raises(ChannelError) as info:
        events(s2, c1.send(b"from session 1"))
    assert info.value.reason == "bad_record"


def _rewrite_client_hello(raw: bytes, versions: tuple[int, ...]) -> bytes:
    hello = ClientHello.decode(raw[FRAME_HEADER_SIZE:])
    forged = ClientHello(
        versions, hello.suites, hello.random, hello.x25519_public, hello.kem_public
    ).encode()
    return FRAME_HEADER.pack(FrameType.CLIENT_HELLO, len(forged)) + forged


def test_stripped_version_offer_downgrade_is_detected_by_the_transcript() -> None:
    # The client offers a future version 2 and version 1; a man in the middle strips 2 so
    # that the server "chooses" 1. The server's choice is legal, but the transcripts differ.
    client, server = new_pair(c_offer_versions=(0x0002, 0x0001))
    forged = _rewrite_client_hello(client.initiate(), (0x0001,))
    assert events(server, forged) == []
    assert events(client, server.data_to_send()) == []
    with pytest.raises(ChannelError) as info:
        events(server, client.data_to_send())  # ClientAuth under the client's keys
    assert info.value.reason == "bad_record"
    assert server.peer_name is None and client.peer_name is None


def test_honest_offer_with_an_unknown_future_version_negotiates_version_1() -> None:
    client, server = new_pair(c_offer_versions=(0x0002, 0x0001))
    handshake(client, server)
    assert client.version == server.version == 0x0001


def test_offer_without_a_common_version_is_refused() -> None:
    client, server = new_pair(c_offer_versions=(0x0002,))
    with pytest.raises(ChannelError) as info:
        events(server, client.initiate())
    assert info.value.reason == "unsupported_version"


def test_server_hello_choosing_a_version_not_offered_is_refused() -> None:
    client, server = new_pair()
    events(server, client.initiate())
    reply = bytearray(server.data_to_send())
    reply[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + 2] = b"\x00\x02"
    with pytest.raises(ChannelError) as info:
        events(client, bytes(reply))
    assert info.value.reason == "unsupported_version"


def test_clean_close_is_told_apart_from_a_truncation() -> None:
    client, server = new_pair()
    handshake(client, server)
    server.receive_data(client.close())
    server.receive_data(b"")
    assert events(server) == [PeerClosed(0)]

    client, server = new_pair()
    handshake(client, server)
    server.receive_data(b"")  # EOF, no Close record
    with pytest.raises(ChannelError) as info:
        events(server)
    assert info.value.reason == "truncated"


def test_eof_during_the_handshake_is_a_channel_error() -> None:
    client, server = new_pair()
    server.receive_data(client.initiate()[:100])
    server.receive_data(b"")
    with pytest.raises(ChannelError) as info:
        events(server)
    assert info.value.reason == "truncated"


def test_a_failed_session_keeps_refusing() -> None:
    _client, server = new_pair()
    server.receive_data(b"\xff" * 10)
    with pytest.raises(ChannelError):
        server.next_event()
    with pytest.raises(ChannelError):
        server.next_event()
    assert server.state is State.ERROR


def _exchange(client: ChannelSession, server: ChannelSession, msg: bytes) -> None:
    assert events(server, client.send(msg)) == [Message(msg)]
    assert events(client, server.send(b"ack")) == [Message(b"ack")]
    events(server, client.data_to_send())  # a KeyUpdateDone, if one is pending


def test_rekey_after_n_records_uses_a_fresh_kem_exchange_and_old_records_fail() -> None:
    client, server = new_pair(c_rekey_after_records=3)
    handshake(client, server)
    old_record = client.send(b"epoch 0")
    events(server, old_record)
    for i in range(10):
        _exchange(client, server, b"m%d" % i)
    assert client.epoch == server.epoch >= 3
    assert client.stats.rekeys == client.epoch
    with pytest.raises(ChannelError) as info:
        events(server, old_record)  # replay from an old epoch
    assert info.value.reason == "bad_record"


def test_rekey_after_t_seconds_with_an_injected_clock() -> None:
    now = [0.0]
    client, server = new_pair(c_rekey_after_seconds=30.0, c_clock=lambda: now[0])
    handshake(client, server)
    _exchange(client, server, b"a")
    assert client.epoch == 0
    now[0] += 31.0
    _exchange(client, server, b"b")
    _exchange(client, server, b"c")
    assert client.epoch == server.epoch == 1


def test_key_update_messages_in_the_wrong_state_are_refused() -> None:
    client, server = new_pair()
    handshake(client, server)
    request = client.request_rekey()
    assert request
    events(server, request)
    with pytest.raises(ChannelError) as info:
        events(server, request)  # a second request (replayed) while one is in flight
    assert info.value.reason in {"bad_record", "unexpected_message"}


def test_only_the_client_starts_key_updates() -> None:
    client, server = new_pair()
    handshake(client, server)
    with pytest.raises(LocalProtocolError):
        server.request_rekey()


def test_state_tables_have_no_transition_out_of_closed_or_error() -> None:
    for table in (CLIENT_TRANSITIONS, SERVER_TRANSITIONS):
        assert not [k for k in table if k[0] in (State.CLOSED, State.ERROR)]


def test_traffic_keys_differ_per_direction_and_epoch() -> None:
    master = bytes(32)
    c0, s0 = ks.application_keys(master, 0)
    c1, s1 = ks.application_keys(master, 1)
    assert len({c0.key, s0.key, c1.key, s1.key}) == 4
    assert "redacted" in repr(c0)


def test_hybrid_secret_needs_both_kem_and_x25519() -> None:
    from pacegate.channel.kem import CryptographyKem

    kem = CryptographyKem()
    init = ks.HybridInitiator(kem)
    shared, x_pub, ct = ks.hybrid_respond(kem, init.x25519_public, init.kem_public)
    assert init.finish(x_pub, ct) == shared and len(shared) == 64
    with pytest.raises(ChannelError) as info:
        ks.hybrid_respond(kem, bytes(32), init.kem_public)  # low-order X25519 point
    assert info.value.reason == "bad_key_share"
