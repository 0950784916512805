"""h11's fuzz invariant for the channel: whatever bytes a peer sends, whole or byte by byte,
a session either parses them or raises ChannelError, never any other exception."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacegate.channel import ChannelError, ChannelIdentity
from pacegate.channel.session import NEED_DATA, ChannelSession, PeerClosed
from pacegate.channel.wire import FRAME_HEADER, FrameType
from tests.support import examples

HOSPITAL = ChannelIdentity.generate("hospital")
GATEWAY = ChannelIdentity.generate("gateway")
FUZZ = settings(
    max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# Both sides read this one instant: the real handshake bytes below are made once at import and
# replayed for minutes on a slow machine, which the server's hello clock window would (rightly)
# refuse as stale before the fuzzer reached the layers behind it.
FUZZ_TIME = time.time()


def fuzz_clock() -> float:
    return FUZZ_TIME


def new_server() -> ChannelSession:
    return ChannelSession.server(
        HOSPITAL, allowed_clients={"gateway": GATEWAY.public_key}, wall_clock=fuzz_clock
    )


def new_client() -> ChannelSession:
    return ChannelSession.client(
        GATEWAY, server_name="hospital", server_key=HOSPITAL.public_key, wall_clock=fuzz_clock
    )


def feed(session: ChannelSession, chunks: list[bytes]) -> None:
    """Feed chunks then EOF; only ChannelError may escape."""
    try:
        for chunk in [*chunks, b""]:
            session.receive_data(chunk)
            while True:
                event = session.next_event()
                if event is NEED_DATA or isinstance(event, PeerClosed):
                    break
    except ChannelError:
        return


def whole_and_bytewise(data: bytes, make: object) -> None:
    assert callable(make)
    feed(make(), [data])
    feed(make(), [data[i : i + 1] for i in range(len(data))])


# A real handshake's bytes, to mutate: the fuzzer reaches deeper than with random bytes.
def _established_pair() -> tuple[ChannelSession, ChannelSession, bytes, bytes, bytes]:
    client, server = new_client(), new_server()
    hello = client.initiate()
    server.receive_data(hello)
    server.next_event()
    server_hello = server.data_to_send()
    client.receive_data(server_hello)
    client.next_event()
    client_auth = client.data_to_send()
    server.receive_data(client_auth)
    server.next_event()
    client.receive_data(server.data_to_send())
    client.next_event()
    return client, server, hello, server_hello, client_auth


_, _, HELLO, SERVER_HELLO, CLIENT_AUTH = _established_pair()
frame_types = st.sampled_from([int(t) for t in FrameType] + [0x00, 0x15, 0xFF])


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """Frames with plausible headers and random bodies, several in a row."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        body = draw(st.binary(max_size=300))
        out += FRAME_HEADER.pack(draw(frame_types), len(body)) + body
    return out


Mutation = tuple[list[tuple[float, int]], float | None]
mutations = st.tuples(
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),
    st.none() | st.floats(0, 1),
)


def apply(mutation: Mutation, original: bytes) -> bytes:
    """XOR a few bytes at relative positions, then maybe cut at a relative length."""
    flips, cut = mutation
    data = bytearray(original)
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    return bytes(data[: int(cut * len(data))]) if cut is not None else bytes(data)


def mutated(original: bytes) -> st.SearchStrategy[bytes]:
    return mutations.map(lambda m: apply(m, original))


@FUZZ
@given(st.binary(max_size=2000))
def test_server_fed_arbitrary_bytes_raises_only_channel_error(data: bytes) -> None:
    whole_and_bytewise(data, new_server)


@FUZZ
@given(framed_garbage())
def test_server_fed_framed_garbage_raises_only_channel_error(data: bytes) -> None:
    whole_and_bytewise(data, new_server)


@FUZZ
@given(mutated(HELLO))
def test_server_fed_a_mutated_client_hello_raises_only_channel_error(data: bytes) -> None:
    feed(new_server(), [data])


@FUZZ
@given(st.binary(max_size=2000) | framed_garbage() | mutated(SERVER_HELLO))
def test_client_fed_arbitrary_bytes_raises_only_channel_error(data: bytes) -> None:
    def waiting_client() -> ChannelSession:
        c = new_client()
        c.initiate()
        return c

    whole_and_bytewise(data, waiting_client)


@FUZZ
@given(mutated(CLIENT_AUTH) | framed_garbage())
def test_server_fed_a_mutated_client_auth_raises_only_channel_error(data: bytes) -> None:
    server = new_server()
    server.receive_data(HELLO)
    server.next_event()
    feed(server, [data])  # another session's keys: must fail, and only as ChannelError


@FUZZ
@given(mutations, st.booleans(), st.integers(1, 3))
def test_established_session_fed_mutated_records_raises_only_channel_error(
    mutation: Mutation, bytewise: bool, count: int
) -> None:
    client, server, *_ = _established_pair()
    wire = b"".join(client.send(b"reading %d" % i) for i in range(count))
    wire += client.request_rekey() + client.send(b"after") + client.close()
    data = apply(mutation, wire)
    feed(server, [data[i : i + 1] for i in range(len(data))] if bytewise else [data])
