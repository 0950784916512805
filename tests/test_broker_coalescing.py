"""The embedded broker's writes: packets of one event-loop turn leave as one write.

A real loopback TCP connection; the broker's writer adapter wraps its ``StreamWriter``
through a recorder that only notes each write it passes on, so what reaches the transport
(how many writes, which bytes, in which order) is what is asserted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from broker.server import COALESCE_MAX_BYTES, CoalescingWriter

pytestmark = pytest.mark.integration


class RecordingWriter:
    """A real StreamWriter that notes each write it is given."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._writer.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


async def _connected(
    body: Callable[[CoalescingWriter, RecordingWriter], Awaitable[None]],
) -> bytes:
    """Run ``body`` on a writer to a loopback peer; return all the peer received."""
    received = asyncio.get_running_loop().create_future()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.read())  # until EOF
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, raw = await asyncio.open_connection("127.0.0.1", port)
    recorder = RecordingWriter(raw)
    adapter = CoalescingWriter(cast(asyncio.StreamWriter, recorder))
    try:
        await body(adapter, recorder)
        data: bytes = await asyncio.wait_for(received, 30)
    finally:
        server.close()
        await server.wait_closed()
    return data


@pytest.mark.timeout(60)
def test_packets_written_in_one_loop_turn_leave_as_one_write_in_order() -> None:
    seen: list[list[bytes]] = []

    async def body(adapter: CoalescingWriter, recorder: RecordingWriter) -> None:
        for part in (b"one", b"two", b"three"):
            adapter.write(part)
            await adapter.drain()  # amqtt drains after each packet: no turn of the loop
        seen.append(list(recorder.writes))  # nothing written yet: this turn is not over
        await asyncio.sleep(0)
        seen.append(list(recorder.writes))
        adapter.write(b"four")  # a later turn: a write of its own
        await asyncio.sleep(0)
        await adapter.close()

    data = asyncio.run(_connected(body))
    assert seen == [[], [b"onetwothree"]]
    assert data == b"onetwothreefour"


@pytest.mark.timeout(60)
def test_close_sends_what_is_pending_first() -> None:
    async def body(adapter: CoalescingWriter, _recorder: RecordingWriter) -> None:
        adapter.write(b"connack")
        await adapter.close()  # the same turn: the CONNACK must not be lost

    assert asyncio.run(_connected(body)) == b"connack"


@pytest.mark.timeout(60)
def test_a_large_write_reaches_the_transport_at_once_so_drain_sees_it() -> None:
    """Backpressure: past COALESCE_MAX_BYTES pending, the bytes go to the transport in the
    same call, so that drain() can pause the writer on a slow peer."""
    counts: list[int] = []
    big = b"x" * COALESCE_MAX_BYTES

    async def body(adapter: CoalescingWriter, recorder: RecordingWriter) -> None:
        adapter.write(b"head")
        adapter.write(big)
        counts.append(len(recorder.writes))
        await adapter.close()

    data = asyncio.run(_connected(body))
    assert counts == [1]
    assert data == b"head" + big
