"""The sans-IO channel core, two sessions wired together in memory (no sockets)."""

from __future__ import annotations

import dataclasses

import pytest

from pacegate.channel import ChannelError, ChannelIdentity
from pacegate.channel import keyschedule as ks
from pacegate.channel.session import (
    MIN_MESSAGE_SIZE_LIMIT,
    NEED_DATA,
    PROTOCOL_VERSION,
    ChannelEvent,
    ChannelSession,
    HandshakeComplete,
    Message,
    PeerClosed,
)
from pacegate.channel.states import CLIENT_TRANSITIONS, SERVER_TRANSITIONS, State
from pacegate.channel.wire import (
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    ClientHello,
    CloseReason,
    ContentType,
    FrameType,
)
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
    assert client.state is State.ESTABLISHED
    assert server.state is State.ESTABLISHED
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
    forged = dataclasses.replace(hello, versions=versions).encode()
    return FRAME_HEADER.pack(FrameType.CLIENT_HELLO, len(forged)) + forged


def test_stripped_version_offer_downgrade_is_detected_by_the_transcript() -> None:
    # The client offers a future version 3 and version 2; a man in the middle strips 3 so
    # that the server "chooses" 2. The offer is signed (the hello is the start of the
    # transcript), so the server refuses the altered hello before it answers, and tells the
    # client so.
    client, server = new_pair(c_offer_versions=(0x0003, 0x0002))
    forged = _rewrite_client_hello(client.initiate(), (0x0002,))
    with pytest.raises(ChannelError) as info:
        events(server, forged)
    assert info.value.reason == "bad_signature"
    with pytest.raises(ChannelError) as refused:
        events(client, server.data_to_send())  # the Alert
    assert refused.value.reason == "refused_by_peer"
    assert server.peer_name is None
    assert client.peer_name is None


def test_honest_offer_with_an_unknown_future_version_negotiates_the_current_version() -> None:
    client, server = new_pair(c_offer_versions=(0x0003, 0x0002))
    handshake(client, server)
    assert client.version == server.version == PROTOCOL_VERSION == 0x0002


@pytest.mark.parametrize("offer", [(0x0003,), (0x0001,)], ids=["future-only", "version-1"])
def test_offer_without_a_common_version_is_refused(offer: tuple[int, ...]) -> None:
    client, server = new_pair(c_offer_versions=offer)
    with pytest.raises(ChannelError) as info:
        events(server, client.initiate())
    assert info.value.reason == "unsupported_version"


def test_server_hello_choosing_a_version_not_offered_is_refused() -> None:
    client, server = new_pair()
    events(server, client.initiate())
    reply = bytearray(server.data_to_send())
    reply[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + 2] = b"\x00\x03"
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
    # (the server asks for one with a KeyUpdateRequest, see the server-limit tests)
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
    assert init.finish(x_pub, ct) == shared
    assert len(shared) == 64
    with pytest.raises(ChannelError) as info:
        ks.hybrid_respond(kem, bytes(32), init.kem_public)  # low-order X25519 point
    assert info.value.reason == "bad_key_share"


# ------------------------------------------------------------------ trust and lifetime


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_removing_a_pinned_client_ends_its_live_session_with_close_unauthorized() -> None:
    allowed = {"gateway": GATEWAY.public_key}
    client = ChannelSession.client(GATEWAY, server_name="hospital", server_key=HOSPITAL.public_key)
    server = ChannelSession.server(HOSPITAL, allowed_clients=allowed)
    handshake(client, server)
    _exchange(client, server, b"while pinned")
    del allowed["gateway"]
    with pytest.raises(ChannelError) as info:
        server.poll()  # what the server's timer does every second
    assert info.value.reason == "client_unpinned"
    assert server.state is State.ERROR
    assert events(client, server.data_to_send()) == [PeerClosed(CloseReason.UNAUTHORIZED)]


def test_replacing_a_clients_pinned_key_ends_its_session_at_its_next_record() -> None:
    allowed = {"gateway": GATEWAY.public_key}
    client = ChannelSession.client(GATEWAY, server_name="hospital", server_key=HOSPITAL.public_key)
    server = ChannelSession.server(HOSPITAL, allowed_clients=allowed)
    handshake(client, server)
    allowed["gateway"] = ChannelIdentity.generate("gateway").public_key
    with pytest.raises(ChannelError) as info:
        events(server, client.send(b"after the key changed"))
    assert info.value.reason == "client_unpinned"


def test_a_session_ends_at_its_maximum_lifetime_on_both_sides() -> None:
    clock = FakeClock()
    client, server = new_pair(
        c_clock=clock, s_clock=clock, c_max_session_lifetime=60.0, s_max_session_lifetime=60.0
    )
    handshake(client, server)
    clock.now += 30
    _exchange(client, server, b"half way")
    assert client.epoch == 0  # the lifetime is not a rekey: it needs a new handshake
    clock.now += 31
    with pytest.raises(ChannelError) as info:
        client.send(b"too late")
    assert info.value.reason == "session_expired"
    assert client.state is State.ERROR
    assert events(server, client.data_to_send()) == [PeerClosed(CloseReason.EXPIRED)]
    # and a server ends it on its own, even if the client never does
    client, server = new_pair(s_clock=clock, s_max_session_lifetime=60.0)
    handshake(client, server)
    clock.now += 61
    with pytest.raises(ChannelError) as info:
        server.poll()
    assert info.value.reason == "session_expired"


# ------------------------------------------------------------------ the server's rekey limits


def test_server_at_its_record_limit_asks_the_client_to_rekey() -> None:
    # A server configured for 10 records used to send 101 and more in epoch 0.
    client, server = new_pair(s_rekey_after_records=10)
    handshake(client, server)
    wire = b"".join(server.send(b"s%d" % i) for i in range(10))  # the 10th asks for a rekey
    assert server.rekey_due() is False  # asked once; now waiting for the client
    assert len(events(client, wire)) == 10
    assert client.state is State.REKEYING  # the request started the client's key update
    events(server, client.data_to_send())
    events(client, server.data_to_send())
    events(server, client.data_to_send())
    assert client.epoch == server.epoch == 1
    _exchange(client, server, b"in epoch 1")


def test_server_at_its_time_limit_asks_for_a_rekey_and_closes_a_client_that_ignores_it() -> None:
    clock = FakeClock()
    client, server = new_pair(s_clock=clock, s_rekey_after_seconds=1.0, s_rekey_grace=5.0)
    handshake(client, server)
    clock.now += 2
    request = server.poll()
    assert request  # a KeyUpdateRequest record
    # a client that does not rekey (we drop its answer) is closed after the grace
    events(client, request)
    client.data_to_send()
    clock.now += 6
    with pytest.raises(ChannelError) as info:
        server.poll()
    assert info.value.reason == "rekey_overdue"
    assert events(client, server.data_to_send()) == [PeerClosed(CloseReason.EXPIRED)]


def test_client_that_keeps_sending_past_twice_the_limit_without_rekeying_is_closed() -> None:
    client, server = new_pair(s_rekey_after_records=4, c_rekey_after_records=10**6)
    handshake(client, server)
    limit = server._epoch_record_limit

    def send_past_the_limit() -> None:
        for i in range(limit + 1):
            events(server, client.send(b"%d" % i))
            server.data_to_send()  # the server's requests, which this client ignores

    with pytest.raises(ChannelError) as info:
        send_past_the_limit()
    assert info.value.reason == "rekey_overdue"
    assert server.stats.records_received <= limit + 2  # handshake record + the limit


# ------------------------------------------------------------------ records and failures


def test_records_per_key_are_capped_near_two_to_the_23() -> None:
    # 2^32 records of 64 KiB gave an AES-GCM advantage of ~2^-40; TLS 1.3's margin is 2^-57
    assert ks.MAX_RECORDS_PER_KEY <= 2**23
    protection = ks.RecordProtection(ks.TrafficKeys(bytes(32), bytes(12)))
    protection.seq = 2**23 - 1
    protection.seal(b"h", b"last record of this key")
    with pytest.raises(ChannelError) as info:
        protection.seal(b"h", b"one too many")
    assert info.value.reason == "key_exhausted"


def test_local_key_exhaustion_fails_the_session_instead_of_leaving_it_established() -> None:
    client, server = new_pair()
    handshake(client, server)
    assert client._send is not None
    client._send.seq = ks.MAX_RECORDS_PER_KEY
    with pytest.raises(ChannelError) as info:
        client.send(b"beyond the cap")
    assert info.value.reason == "key_exhausted"
    assert client.state is State.ERROR
    assert client.error is not None
    with pytest.raises(LocalProtocolError):
        client.send(b"still refused")


def test_a_failed_session_drops_its_record_keys() -> None:
    client, server = new_pair()
    handshake(client, server)
    with pytest.raises(ChannelError):
        events(server, b"\x17\x00\x00\x00\x20" + bytes(32))  # a forged record
    assert server._send is None
    assert server._recv is None
    assert server._pending_recv is None
    assert server._master is None


def _seal_as_client(client: ChannelSession, inner: bytes) -> bytes:
    client._seal(inner)
    return client.data_to_send()


def test_empty_app_fragments_are_refused() -> None:
    # 200,000 empty fragments used to be held without reaching max_message_size
    client, server = new_pair()
    handshake(client, server)
    with pytest.raises(ChannelError) as info:
        events(server, _seal_as_client(client, bytes([ContentType.APP_FRAGMENT])))
    assert info.value.reason == "malformed"


def test_many_tiny_fragments_are_held_as_their_bytes_only() -> None:
    client, server = new_pair()
    handshake(client, server)
    wire = b"".join(
        _seal_as_client(client, bytes([ContentType.APP_FRAGMENT, i % 256])) for i in range(2000)
    )
    wire += _seal_as_client(client, bytes([ContentType.APP_FINAL]))
    assert events(server, wire) == [Message(bytes(i % 256 for i in range(2000)))]
    assert isinstance(server._partial, bytearray)


def test_rekey_limits_beyond_the_key_cap_are_refused_locally() -> None:
    with pytest.raises(LocalProtocolError):
        new_pair(c_rekey_after_records=ks.MAX_RECORDS_PER_KEY)
