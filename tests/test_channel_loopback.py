"""The PQ channel over real loopback sockets: round trip, refusals, record attacks, rekey.

Attacks on records go through :class:`FrameProxy`, a real TCP man-in-the-middle between
client and server that sees whole frames and can flip, replay, reorder or cut them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pacegate.channel import (
    ChannelClosed,
    ChannelError,
    ChannelIdentity,
    ChannelServerStats,
    ChannelStream,
    connect,
    serve,
)

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
        assert stream.stats.messages_sent == 2 and stream.stats.records_sent > 16
