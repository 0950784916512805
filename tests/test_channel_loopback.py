"""The PQ channel over real loopback sockets: round trip, refusals, record attacks, rekey.

Attacks on records go through :class:`FrameProxy`, a real TCP man-in-the-middle between
client and server that sees whole frames and can flip, replay, reorder or cut them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pacegate.channel import (
    ChannelClosed,
    ChannelError,
    ChannelIdentity,
    ChannelServerStats,
    ChannelStream,
    connect,
    serve,
)
from pacegate.channel.wire import FRAME_HEADER, FRAME_HEADER_SIZE, FrameType

HOST = "127.0.0.1"
WAIT = 20.0  # guard against hangs only; no test asserts how long anything takes

# Key generation costs a few ms; one set of identities serves the whole module.
HOSPITAL = ChannelIdentity.generate("hospital")
GATEWAY = ChannelIdentity.generate("gateway")
INTRUDER = ChannelIdentity.generate("intruder")


@dataclass
class Recorder:
    """The server's application: acks every message, remembers how each session ended."""

    messages: list[bytes] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    ends: asyncio.Queue[ChannelError | None] = field(default_factory=asyncio.Queue)

    async def on_session(self, stream: ChannelStream) -> None:
        self.peers.append(stream.peer_name)
        try:
            while True:
                msg = await stream.recv()
                self.messages.append(msg)
                await stream.send(b"ack:" + msg[:16])
        except ChannelClosed as exc:
            self.ends.put_nowait(exc.cause)

    async def next_end(self) -> ChannelError | None:
        return await asyncio.wait_for(self.ends.get(), WAIT)


@dataclass
class Server:
    port: int
    recorder: Recorder
    stats: ChannelServerStats


@contextlib.asynccontextmanager
async def running_server(**opts: object) -> AsyncIterator[Server]:
    recorder = Recorder()
    stats = ChannelServerStats()
    allowed = opts.pop("allowed_clients", {"gateway": GATEWAY.public_key})
    server = await serve(
        HOST,
        0,
        identity=HOSPITAL,
        allowed_clients=allowed,  # type: ignore[arg-type]
        on_session=recorder.on_session,
        stats=stats,
        **opts,  # type: ignore[arg-type]
    )
    try:
        yield Server(server.sockets[0].getsockname()[1], recorder, stats)
    finally:
        server.close()
        await server.wait_closed()


async def gateway_connect(port: int, **opts: object) -> ChannelStream:
    kwargs: dict[str, object] = {
        "identity": GATEWAY,
        "server_name": "hospital",
        "server_key": HOSPITAL.public_key,
    }
    kwargs.update(opts)
    return await connect(HOST, port, **kwargs)  # type: ignore[arg-type]


@pytest.mark.integration
async def test_round_trip_over_loopback_authenticates_both_peers() -> None:
    async with running_server() as srv:
        stream = await gateway_connect(srv.port)
        try:
            assert stream.peer_name == "hospital"
            await stream.send(b"reading batch 1")
            assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:reading batch 1"
            big = bytes(range(256)) * 4096  # 1 MiB: many records, one message
            await stream.send(big)
            assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:" + big[:16]
        finally:
            await stream.close()
        assert await srv.recorder.next_end() is None  # clean close, not a truncation
        assert srv.recorder.peers == ["gateway"]
        assert srv.recorder.messages == [b"reading batch 1", big]
        assert stream.stats.messages_sent == 2
        assert stream.stats.records_sent > 16


# ------------------------------------------------------------------ a man in the middle


class Cut:
    """In a hook's output: close both directions here (a truncation)."""


CUT = Cut()
FrameHook = Callable[[int, bytes], list[bytes | Cut]]


class FrameProxy:
    """A real TCP relay on loopback that hands every frame to a hook before forwarding."""

    def __init__(
        self,
        target_port: int,
        c2s: FrameHook | None = None,
        s2c: FrameHook | None = None,
    ) -> None:
        self.target_port = target_port
        self.c2s = c2s
        self.s2c = s2c
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FrameProxy:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection(HOST, self.target_port)
        writers = (cwriter, swriter)
        tasks = [
            asyncio.create_task(self._pump(creader, swriter, self.c2s, writers)),
            asyncio.create_task(self._pump(sreader, cwriter, self.s2c, writers)),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        hook: FrameHook | None,
        writers: tuple[asyncio.StreamWriter, ...],
    ) -> None:
        index = 0
        try:
            while True:
                header = await reader.readexactly(FRAME_HEADER_SIZE)
                _, length = FRAME_HEADER.unpack(header)
                frame = header + await reader.readexactly(length)
                out = hook(index, frame) if hook else [frame]
                index += 1
                for item in out:
                    if isinstance(item, Cut):
                        await writer.drain()
                        for w in writers:
                            w.close()
                        return
                    writer.write(item)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# Client-to-server frame indices: 0 ClientHello, 1 ClientAuth, then one record per small
# application message: 2 = "A", 3 = "B", 4 = "C".
def flip_last_byte(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


def tampered(i: int, f: bytes) -> list[bytes | Cut]:
    return [flip_last_byte(f)] if i == 3 else [f]


def replayed(i: int, f: bytes) -> list[bytes | Cut]:
    return [f, f] if i == 2 else [f]


def dropped(i: int, f: bytes) -> list[bytes | Cut]:
    return [] if i == 3 else [f]


def truncated_between_records(i: int, f: bytes) -> list[bytes | Cut]:
    return [CUT] if i == 3 else [f]


def truncated_inside_a_record(i: int, f: bytes) -> list[bytes | Cut]:
    return [f[: len(f) // 2], CUT] if i == 3 else [f]


def make_reorderer() -> FrameHook:
    held: list[bytes] = []

    def reordered(i: int, f: bytes) -> list[bytes | Cut]:
        if i == 3:
            held.append(f)
            return []
        if i == 4:
            return [f, *held]
        return [f]

    return reordered


@pytest.mark.integration
@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (lambda: tampered, "bad_record"),
        (lambda: replayed, "bad_record"),
        (make_reorderer, "bad_record"),
        (lambda: dropped, "bad_record"),
        (lambda: truncated_between_records, "truncated"),
        (lambda: truncated_inside_a_record, "truncated"),
    ],
    ids=["tampered", "replayed", "reordered", "dropped", "truncated", "cut-mid-record"],
)
async def test_record_attack_closes_the_session_and_nothing_is_delivered_twice(
    attack: Callable[[], FrameHook], reason: str
) -> None:
    async with running_server() as srv, FrameProxy(srv.port, c2s=attack()) as proxy:
        stream = await gateway_connect(proxy.port)
        try:
            for msg in (b"A", b"B", b"C"):
                await stream.send(msg)
            acks: list[bytes] = []

            async def read_until_closed() -> None:
                while True:
                    acks.append(await asyncio.wait_for(stream.recv(), WAIT))

            with pytest.raises(ChannelClosed):
                await read_until_closed()
        finally:
            await stream.close()
        cause = await srv.recorder.next_end()
        assert cause is not None
        assert cause.reason == reason
        assert srv.recorder.messages == [b"A"]  # the prefix before the attack, once
        # the server may fail on B before its application acknowledged A: both are fine
        assert acks in ([], [b"ack:A"])


# ------------------------------------------------------------------ who may talk


@pytest.mark.integration
async def test_unknown_client_is_refused_before_any_application_data() -> None:
    async with running_server() as srv:
        with pytest.raises(ChannelError) as info:
            await gateway_connect(srv.port, identity=INTRUDER)
        assert info.value.reason == "refused_by_peer"
        assert srv.stats.refused == {"unknown_client": 1}
        assert srv.recorder.peers == []
        assert srv.stats.sessions == 0


@pytest.mark.integration
async def test_client_with_a_known_name_but_an_unpinned_key_is_refused() -> None:
    impostor_gateway = ChannelIdentity("gateway", INTRUDER.private_key)
    async with running_server() as srv:
        with pytest.raises(ChannelError) as info:
            await gateway_connect(srv.port, identity=impostor_gateway)
        assert info.value.reason == "refused_by_peer"
        assert srv.stats.refused == {"bad_signature": 1}
        assert srv.recorder.peers == []


@pytest.mark.integration
async def test_impostor_server_with_the_wrong_key_is_refused_by_the_client() -> None:
    recorder = Recorder()
    impostor = ChannelIdentity("hospital", INTRUDER.private_key)
    server = await serve(
        HOST,
        0,
        identity=impostor,
        allowed_clients={"gateway": GATEWAY.public_key},
        on_session=recorder.on_session,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ChannelError) as info:
            await gateway_connect(port)
        assert info.value.reason == "bad_server_identity"
        # the client never sent a message: the impostor's session ends empty
        assert await recorder.next_end() is not None
        assert recorder.messages == []
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.integration
async def test_server_with_another_pinned_name_is_refused_by_the_client() -> None:
    async with running_server() as srv:
        with pytest.raises(ChannelError) as info:
            await gateway_connect(srv.port, server_name="cloud")
        # the hello names the server the client meant: the server refuses it at once
        assert info.value.reason == "refused_by_peer"
        assert srv.stats.refused == {"wrong_server": 1}
        assert srv.stats.sessions == 0


# ------------------------------------------------------------------ downgrade


def _add_legacy_version(i: int, f: bytes) -> list[bytes | Cut]:
    """Rewrite the ClientHello's offer from [v1] to [v1, 0x0000] (a 'legacy' version)."""
    if i != 0:
        return [f]
    body = f[FRAME_HEADER_SIZE:]
    assert body[0] == 1  # one version offered
    new_body = bytes([2]) + body[1:3] + b"\x00\x00" + body[3:]
    return [FRAME_HEADER.pack(FrameType.CLIENT_HELLO, len(new_body)) + new_body]


def _change_server_random(i: int, f: bytes) -> list[bytes | Cut]:
    if i != 0:
        return [f]
    return [f[:10] + bytes([f[10] ^ 0xFF]) + f[11:]]


@pytest.mark.integration
@pytest.mark.parametrize(
    "hooks",
    [{"c2s": _add_legacy_version}, {"s2c": _change_server_random}],
    ids=["altered-client-offer", "altered-server-hello"],
)
async def test_altered_hello_in_the_transcript_fails_the_handshake(
    hooks: dict[str, FrameHook],
) -> None:
    async with running_server() as srv, FrameProxy(srv.port, **hooks) as proxy:
        with pytest.raises(ChannelError):
            await gateway_connect(proxy.port)
        assert srv.stats.sessions == 0
        assert sum(srv.stats.refused.values()) == 1
        assert srv.recorder.peers == []


# ------------------------------------------------------------------ rekey


@pytest.mark.integration
async def test_rekey_after_n_records_is_transparent_and_traffic_continues() -> None:
    async with running_server() as srv:
        stream = await gateway_connect(srv.port, rekey_after_records=4)
        try:
            for i in range(40):
                await stream.send(b"m%d" % i)
                assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:m%d" % i
            assert stream.stats.rekeys >= 5
            assert stream.epoch == stream.stats.rekeys
        finally:
            await stream.close()
        assert await srv.recorder.next_end() is None
        assert srv.recorder.messages == [b"m%d" % i for i in range(40)]


@pytest.mark.integration
async def test_rekey_after_t_seconds_is_transparent_and_traffic_continues() -> None:
    now = [1000.0]
    async with running_server() as srv:
        stream = await gateway_connect(srv.port, rekey_after_seconds=60.0, clock=lambda: now[0])
        try:
            for i in range(6):
                now[0] += 61.0  # a minute passes between readings
                await stream.send(b"t%d" % i)
                assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:t%d" % i
            assert stream.stats.rekeys >= 5
        finally:
            await stream.close()
        assert srv.recorder.messages == [b"t%d" % i for i in range(6)]


@pytest.mark.integration
async def test_rekey_completes_while_the_client_only_sends() -> None:
    got: list[bytes] = []
    done = asyncio.Event()

    async def sink(stream: ChannelStream) -> None:
        async for m in stream:
            got.append(m)
        done.set()

    server = await serve(
        HOST,
        0,
        identity=HOSPITAL,
        allowed_clients={"gateway": GATEWAY.public_key},
        on_session=sink,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        stream = await gateway_connect(port, rekey_after_records=8)
        for i in range(100):
            await stream.send(b"s%d" % i)
        await stream.close()
        await asyncio.wait_for(done.wait(), WAIT)
        assert got == [b"s%d" % i for i in range(100)]
        assert stream.stats.rekeys >= 3
    finally:
        server.close()
        await server.wait_closed()


# ------------------------------------------------------------------ garbage and floods


async def _send_raw(port: int, data: bytes, *, then_close: bool = True) -> bytes:
    """Write ``data`` to the server as a stranger; returns what the server answered."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        if then_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before closing (a reset, when it left our bytes unread, counts
    as closed too)."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""


async def _valid_client_hello() -> bytes:
    from pacegate.channel.session import ChannelSession

    return ChannelSession.client(
        GATEWAY, server_name="hospital", server_key=HOSPITAL.public_key
    ).initiate()


@pytest.mark.integration
async def test_garbage_never_crashes_the_server_and_each_is_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hello, other_hello = await _valid_client_hello(), await _valid_client_hello()
    garbage = [
        b"GET / HTTP/1.1\r\nHost: hospital\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100),  # a TLS ClientHello
        bytes(5),
        b"\x01\xff\xff\xff\xff",  # a ClientHello announcing 4 GiB
        b"\x17\x00\x00\x00\x10" + bytes(16),  # a record before any handshake
        hello[:200],  # half a hello, then EOF
        hello + b"\x17\x00\x00\x00\x20" + bytes(32),  # a hello, then a forged record
        other_hello[:-1] + bytes([other_hello[-1] ^ 1]),  # a hello with a corrupted signature
        b"",  # connect and close at once
    ]
    caplog.set_level(logging.WARNING, logger="pacegate.security")
    async with running_server() as srv:
        answers = await asyncio.gather(*(_send_raw(srv.port, g) for g in garbage))
        # nothing readable came back, except a ServerHello or an Alert to well-formed hellos
        for g, answer in zip(garbage, answers, strict=True):
            assert answer == b"" or (g.startswith(hello[:5]) and answer[:1] in (b"\x02", b"\x15"))
        # the server still serves a real gateway afterwards
        stream = await gateway_connect(srv.port)
        await stream.send(b"still alive")
        assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:still alive"
        await stream.close()
        assert sum(srv.stats.refused.values()) == len(garbage)
        assert srv.stats.sessions == 1
    refusals = [
        r
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == ("channel_handshake_refused")
    ]
    assert len(refusals) == len(garbage)


@pytest.mark.integration
async def test_half_open_connection_is_closed_at_the_handshake_timeout() -> None:
    async with running_server(handshake_timeout=0.3) as srv:
        reader, writer = await asyncio.open_connection(HOST, srv.port)
        try:
            # a real gateway is served while the silent connection waits
            stream = await gateway_connect(srv.port)
            await stream.send(b"x")
            assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:x"
            await stream.close()
            assert await _read_until_closed(reader) == b""  # the server hung up
            assert srv.stats.refused == {"handshake_timeout": 1}
        finally:
            writer.close()


async def _open_from(source: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection from ``source`` (any 127.0.0.0/8 address is loopback on Linux),
    so that one test can play several hosts."""
    return await asyncio.open_connection(HOST, port, local_addr=(source, 0))


async def _until(predicate: Callable[[], bool]) -> None:
    """Wait for the server to have processed what we did (bounded; no duration asserted)."""
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.005)


async def _stalled_after_hello(
    source: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends a genuine ClientHello, reads the ServerHello and then stalls:
    the server holds it as a pending handshake until handshake_timeout."""
    reader, writer = await _open_from(source, port)
    writer.write(await _valid_client_hello())
    await writer.drain()
    header = await asyncio.wait_for(reader.readexactly(FRAME_HEADER_SIZE), WAIT)
    ftype, length = FRAME_HEADER.unpack(header)
    assert ftype == FrameType.SERVER_HELLO
    await reader.readexactly(length)
    return reader, writer


async def _round_trip(port: int, text: bytes) -> None:
    stream = await gateway_connect(port)
    try:
        await stream.send(text)
        assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:" + text[:16]
    finally:
        await stream.close()


@pytest.mark.integration
@pytest.mark.parametrize("spread", [True, False], ids=["40-sources", "same-source"])
async def test_idle_connections_beyond_the_server_limit_cannot_lock_out_a_genuine_client(
    spread: bool,
) -> None:
    # F3: 256 connections that send nothing used to hold every handshake slot for the whole
    # handshake_timeout, and the genuine gateway was refused (handshake_limit).
    async with running_server(
        handshake_timeout=WAIT * 3, first_frame_timeout=WAIT * 3, max_unverified_connections=256
    ) as srv:
        sources = [f"127.0.0.{2 + i // 8}" if spread else HOST for i in range(320)]
        idle = [await _open_from(src, srv.port) for src in sources]
        try:
            await _until(lambda: srv.stats.connections == len(idle))
            # no per-source cap on idle sockets; the server keeps 256, the 64 oldest went
            assert srv.stats.pending_handshakes == srv.stats.unverified_connections == 256
            assert srv.stats.refused == {"handshake_evicted": 64}
            # the genuine gateway (from 127.0.0.1, like the same-source flood) gets in at once
            await _round_trip(srv.port, b"still reachable")
            assert srv.stats.sessions == 1
            assert srv.stats.refused == {"handshake_evicted": 65}  # made room for it
        finally:
            for _, w in idle:
                w.close()


@pytest.mark.integration
async def test_one_source_cannot_hold_more_than_the_per_source_cap() -> None:
    # Past a verified hello (only a pinned client gets there) one address holds at most
    # max_pending_per_source handshakes; idle sockets do not count against it.
    async with running_server(
        handshake_timeout=WAIT * 3, first_frame_timeout=WAIT * 3, max_pending_per_source=4
    ) as srv:
        idle = [await _open_from("127.0.0.2", srv.port) for _ in range(10)]
        stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            await _until(lambda: srv.stats.connections == 10)
            assert srv.stats.pending_by_source == {"127.0.0.2": 10}
            stalled = [await _stalled_after_hello("127.0.0.2", srv.port) for _ in range(4)]
            assert srv.stats.pending_by_source == {"127.0.0.2": 14}
            # a fifth verified hello from the same address is refused before its KEM
            reader, writer = await _open_from("127.0.0.2", srv.port)
            stalled.append((reader, writer))
            writer.write(await _valid_client_hello())
            answer = await _read_until_closed(reader)
            assert answer == bytes([FrameType.ALERT]) + b"\x00\x00\x00\x01\x03"  # busy
            assert srv.stats.refused == {"handshake_source_limit": 1}
            # another host is not affected
            await _round_trip(srv.port, b"other host")
        finally:
            for _, w in idle + stalled:
                w.close()


@pytest.mark.integration
async def test_full_server_of_stalled_hellos_refuses_the_newcomer_and_recovers() -> None:
    async with running_server(handshake_timeout=WAIT * 3, max_pending_handshakes=4) as srv:
        stalled = [await _stalled_after_hello(f"127.0.0.{2 + i}", srv.port) for i in range(4)]
        try:
            assert srv.stats.pending_handshakes == 4
            with pytest.raises(ChannelError) as info:
                await gateway_connect(srv.port)  # every slot holds a verified, stalled hello
            assert info.value.reason == "refused_by_peer"  # Alert(busy), before any KEM
            assert srv.stats.refused == {"handshake_limit": 1}
            for _, w in stalled:
                w.close()
            await _until(lambda: srv.stats.pending_handshakes == 0)
            await _round_trip(srv.port, b"after the flood")
        finally:
            for _, w in stalled:
                w.close()


@pytest.mark.integration
async def test_connection_without_its_first_frame_is_closed_at_the_first_frame_timeout() -> None:
    async with running_server(handshake_timeout=WAIT * 3, first_frame_timeout=0.2) as srv:
        # a genuine hello that then stalls is under handshake_timeout, not the first-frame one
        _, hello_w = await _stalled_after_hello(HOST, srv.port)
        silent_r, silent_w = await asyncio.open_connection(HOST, srv.port)
        dribble_r, dribble_w = await asyncio.open_connection(HOST, srv.port)
        try:
            dribble_w.write((await _valid_client_hello())[:100])  # part of a hello, then waits
            assert await _read_until_closed(silent_r) == b""
            assert await _read_until_closed(dribble_r) == b""
            assert srv.stats.refused == {"first_frame_timeout": 2}
            # the stalled hello started first, yet is still pending: a later deadline applies
            assert srv.stats.pending_handshakes == 1
            # a genuine client sends its hello at once and is unaffected
            await _round_trip(srv.port, b"prompt client")
        finally:
            for w in (hello_w, silent_w, dribble_w):
                w.close()


def test_server_options_are_checked_when_it_starts() -> None:
    for bad in (
        {"first_frame_timeout": 0},
        {"handshake_timeout": -1.0},
        {"max_pending_per_source": 0},
        {"max_pending_handshakes": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            asyncio.run(
                serve(
                    HOST,
                    0,
                    identity=HOSPITAL,
                    allowed_clients={},
                    on_session=Recorder().on_session,
                    **bad,  # type: ignore[arg-type]
                )
            )


def test_source_key_groups_an_ipv6_host_by_its_64_and_unmaps_ipv4() -> None:
    from pacegate.admission import source_key as _source_key

    assert _source_key("127.0.0.1") == "127.0.0.1"
    assert _source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert _source_key("2001:db8:1:2:aaaa::1") == _source_key("2001:db8:1:2:bbbb::9%eth0")
    assert _source_key("2001:db8:1:2::1") != _source_key("2001:db8:1:3::1")
    assert _source_key("not-an-ip") == "not-an-ip"


@pytest.mark.integration
async def test_client_connect_to_a_silent_server_times_out_with_a_channel_error() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ChannelError) as info:
            await gateway_connect(port, handshake_timeout=0.3)
        assert info.value.reason == "handshake_timeout"
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


@pytest.mark.integration
async def test_unreachable_server_raises_oserror_for_the_caller_to_spool() -> None:
    probe = await asyncio.start_server(lambda r, w: None, HOST, 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await gateway_connect(port)


@pytest.mark.integration
async def test_failing_application_handler_closes_only_its_session() -> None:
    calls = 0

    async def flaky(stream: ChannelStream) -> None:
        nonlocal calls
        calls += 1
        msg = await stream.recv()
        if msg == b"boom":
            raise RuntimeError("application bug")
        await stream.send(b"ok")

    stats = ChannelServerStats()
    server = await serve(
        HOST,
        0,
        identity=HOSPITAL,
        allowed_clients={"gateway": GATEWAY.public_key},
        on_session=flaky,
        stats=stats,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        bad = await gateway_connect(port)
        await bad.send(b"boom")
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(bad.recv(), WAIT)
        await bad.close()
        good = await gateway_connect(port)
        await good.send(b"fine")
        assert await asyncio.wait_for(good.recv(), WAIT) == b"ok"
        await good.close()
        assert calls == 2
        assert stats.session_errors == 1
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Leaked sockets are reported by the test that leaked them, not a later one."""
    yield
    gc.collect()


@pytest.mark.integration
async def test_a_receiver_that_does_not_read_pushes_back_on_the_sender(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pacegate.channel import aio

    monkeypatch.setattr(aio, "_INBOX_BYTES", 1024 * 1024)
    streams: asyncio.Queue[ChannelStream] = asyncio.Queue()
    release = asyncio.Event()
    received: list[bytes] = []

    async def slow_reader(stream: ChannelStream) -> None:
        streams.put_nowait(stream)
        await release.wait()
        async for m in stream:
            received.append(m)

    server = await serve(
        HOST,
        0,
        identity=HOSPITAL,
        allowed_clients={"gateway": GATEWAY.public_key},
        on_session=slow_reader,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        client = await gateway_connect(port)
        server_side = await asyncio.wait_for(streams.get(), WAIT)
        messages = [bytes([i]) * (1024 * 1024) for i in range(24)]

        async def send_all() -> None:
            for m in messages:
                await client.send(m)
            await client.close()

        sender = asyncio.create_task(send_all())
        await asyncio.sleep(0.5)  # let the sender run until TCP pushes back
        assert not sender.done()  # 24 MiB did not all fit: the sender is held back
        assert server_side._inbox_bytes <= 2 * 1024 * 1024  # buffered: bounded
        release.set()
        await asyncio.wait_for(sender, WAIT)
        for _ in range(200):
            if len(received) == len(messages):
                break
            await asyncio.sleep(0.05)
        assert received == messages
    finally:
        release.set()
        server.close()
        await server.wait_closed()


@pytest.mark.integration
async def test_an_idle_client_rekeys_on_time_without_traffic() -> None:
    async with running_server() as srv:
        stream = await gateway_connect(srv.port, rekey_after_seconds=0.1)
        try:
            for _ in range(400):  # bounded wait; the assertion is on the epoch, not the time
                if stream.epoch >= 2:
                    break
                await asyncio.sleep(0.02)
            assert stream.epoch >= 2
            assert stream.stats.messages_sent == 0
            await stream.send(b"after idle")
            assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:after idle"
        finally:
            await stream.close()
        assert await srv.recorder.next_end() is None


@pytest.mark.integration
async def test_clients_enrolled_or_removed_in_the_live_mapping_apply_to_new_sessions() -> None:
    allowed = {"gateway": GATEWAY.public_key}
    async with running_server(allowed_clients=allowed) as srv:
        with pytest.raises(ChannelError):
            await gateway_connect(srv.port, identity=INTRUDER)
        allowed["intruder"] = INTRUDER.public_key  # enrolled
        stream = await gateway_connect(srv.port, identity=INTRUDER)
        await stream.close()
        del allowed["gateway"]  # removed
        with pytest.raises(ChannelError):
            await gateway_connect(srv.port)
        assert srv.recorder.peers == ["intruder"]


# ------------------------------------------------------------------ trust changes end sessions


@pytest.mark.integration
async def test_removing_a_pinned_client_closes_its_live_session_within_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Issue 14: an un-pinned client's session used to rekey on forever.
    caplog.set_level(logging.WARNING, logger="pacegate.security")
    allowed = {"gateway": GATEWAY.public_key}
    async with running_server(allowed_clients=allowed) as srv:
        stream = await gateway_connect(srv.port)
        try:
            await stream.send(b"pinned")
            assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:pinned"
            del allowed["gateway"]  # the operator removes it; no traffic follows
            with pytest.raises(ChannelClosed) as info:
                await asyncio.wait_for(stream.recv(), WAIT)
            assert info.value.cause is not None
            assert info.value.cause.reason == "refused_by_peer"
            cause = await srv.recorder.next_end()
            assert cause is not None
            assert cause.reason == "client_unpinned"
        finally:
            await stream.close()
    reasons = [getattr(r, "fields", {}).get("reason") for r in caplog.records]
    assert "client_unpinned" in reasons


@pytest.mark.integration
async def test_a_session_past_its_maximum_lifetime_is_closed_and_the_client_reconnects() -> None:
    async with running_server(max_session_lifetime=0.5) as srv:
        stream = await gateway_connect(srv.port)  # the client's own lifetime is the default
        try:
            with pytest.raises(ChannelClosed) as info:
                await asyncio.wait_for(stream.recv(), WAIT)
            assert info.value.cause is not None
            assert info.value.cause.reason == "session_expired"
        finally:
            await stream.close()
        cause = await srv.recorder.next_end()
        assert cause is not None
        assert cause.reason == "session_expired"
        await _round_trip(srv.port, b"re-authenticated")  # a full handshake again
        assert srv.stats.sessions == 2


@pytest.mark.integration
async def test_server_enforces_its_own_rekey_limits_against_a_lax_client() -> None:
    # Issue 14: a server configured for 10 records / 1 s sent 101 records over 10,000 s in
    # epoch 0, because only the client counted. Here the client would never rekey on its own.
    sent: list[int] = []

    async def chatty(stream: ChannelStream) -> None:
        for i in range(101):
            await stream.send(b"s%d" % i)
        sent.append(stream.epoch)
        await stream.recv()  # until the client closes

    server = await serve(
        HOST,
        0,
        identity=HOSPITAL,
        allowed_clients={"gateway": GATEWAY.public_key},
        on_session=chatty,
        rekey_after_records=10,
        rekey_after_seconds=1.0,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        stream = await gateway_connect(port, rekey_after_records=10**6, rekey_after_seconds=1e6)
        try:
            got = [await asyncio.wait_for(stream.recv(), WAIT) for _ in range(101)]
            assert got == [b"s%d" % i for i in range(101)]
            assert stream.epoch >= 5  # at least one key update per 20 server records
            epoch = stream.epoch
            # and on time: an idle session is rekeyed once the server's period is over
            async with asyncio.timeout(WAIT):
                while stream.epoch == epoch:
                    await asyncio.sleep(0.05)
        finally:
            await stream.close()
        assert sent
        assert sent[0] >= 5
    finally:
        server.close()
        await server.wait_closed()
