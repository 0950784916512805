"""Cost of the post-quantum channel: handshake time, and record throughput against plain
TCP carrying the same length-prefixed messages, in the same run, on loopback.

    .venv/bin/python bench/bench_channel.py [--handshakes 100] [--seconds 2] [--json]

Handshakes: full ``connect`` over loopback (TCP connect, hybrid KEM, both ML-DSA-65
signatures and verifications, both sides in this process, so the figure is the CPU of
*both* ends) and the same handshake in memory (sans-IO, no sockets). Throughput: one client
streams messages of a given size for ``--seconds`` to a server that counts them, once over
the channel and once over plain TCP; the same asyncio framing loop on both. Numbers are
from one run on the machine at hand: use them for design, not as promises.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable

from pacegate.channel import ChannelIdentity, ChannelStream, connect, serve
from pacegate.channel.session import NEED_DATA, ChannelSession

HOST = "127.0.0.1"
HOSPITAL = ChannelIdentity.generate("hospital")
GATEWAY = ChannelIdentity.generate("gateway")
SIZES = (100, 4_096, 65_536, 332_000)  # one reading, a batch, a full record, a CKKS ciphertext
DONE = b"done"


def handshake_in_memory() -> float:
    t0 = time.perf_counter()
    client = ChannelSession.client(GATEWAY, server_name="hospital", server_key=HOSPITAL.public_key)
    server = ChannelSession.server(HOSPITAL, allowed_clients={"gateway": GATEWAY.public_key})
    server.receive_data(client.initiate())
    for a, b in ((server, client), (client, server), (server, client)):
        while a.next_event() is not NEED_DATA and not a.established:
            pass
        b.receive_data(a.data_to_send())
    while client.next_event() is not NEED_DATA:
        pass
    assert client.established
    assert server.established
    return time.perf_counter() - t0


async def handshakes_over_loopback(n: int) -> list[float]:
    async def idle(stream: ChannelStream) -> None:
        async for _ in stream:
            pass

    server = await serve(
        HOST,
        0,
        identity=HOSPITAL,
        allowed_clients={"gateway": GATEWAY.public_key},
        on_session=idle,
    )
    port = server.sockets[0].getsockname()[1]
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            stream = await connect(
                HOST,
                port,
                identity=GATEWAY,
                server_name="hospital",
                server_key=HOSPITAL.public_key,
            )
            times.append(time.perf_counter() - t0)
            await stream.close()
    finally:
        server.close()
        await server.wait_closed()
    return times


async def channel_throughput(size: int, seconds: float) -> tuple[int, float]:
    got = asyncio.get_running_loop().create_future()

    async def count(stream: ChannelStream) -> None:
        n = 0
        async for msg in stream:
            if msg == DONE:
                await stream.send(DONE)
                break
            n += 1
        got.set_result(n)

    server = await serve(
        HOST,
        0,
        identity=HOSPITAL,
        allowed_clients={"gateway": GATEWAY.public_key},
        on_session=count,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        stream = await connect(
            HOST, port, identity=GATEWAY, server_name="hospital", server_key=HOSPITAL.public_key
        )
        payload = bytes(size)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(64):
                await stream.send(payload)
        await stream.send(DONE)
        await stream.recv()
        elapsed = time.perf_counter() - t0
        await stream.close()
        return await got, elapsed
    finally:
        server.close()
        await server.wait_closed()


async def tcp_throughput(size: int, seconds: float) -> tuple[int, float]:
    """The baseline: the same messages, 4-byte length prefix, no crypto."""
    got = asyncio.get_running_loop().create_future()
    header = struct.Struct(">I")

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while True:
            (length,) = header.unpack(await reader.readexactly(4))
            msg = await reader.readexactly(length)
            if msg == DONE:
                writer.write(header.pack(len(DONE)) + DONE)
                await writer.drain()
                break
            n += 1
        writer.close()
        got.set_result(n)

    server = await asyncio.start_server(count, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        payload = bytes(size)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(64):
                writer.write(header.pack(size) + payload)
                await writer.drain()
        writer.write(header.pack(len(DONE)) + DONE)
        await writer.drain()
        await reader.readexactly(4 + len(DONE))
        elapsed = time.perf_counter() - t0
        writer.close()
        await writer.wait_closed()
        return await got, elapsed
    finally:
        server.close()
        await server.wait_closed()


def summary(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {
        "mean_ms": round(statistics.fmean(ms), 2),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2),
    }


async def run(handshakes: int, seconds: float) -> dict[str, object]:
    handshake_in_memory()  # warm-up
    in_memory = [handshake_in_memory() for _ in range(handshakes)]
    await handshakes_over_loopback(3)  # warm-up
    loopback = await handshakes_over_loopback(handshakes)
    rows = []
    for size in SIZES:
        runs: dict[str, Callable[[int, float], Awaitable[tuple[int, float]]]] = {
            "channel": channel_throughput,
            "tcp": tcp_throughput,
        }
        row: dict[str, object] = {"message_bytes": size}
        rate: dict[str, float] = {}
        for name, fn in runs.items():
            n, elapsed = await fn(size, seconds)
            rate[name] = n / elapsed
            row[f"{name}_msg_per_s"] = round(rate[name])
            row[f"{name}_MB_per_s"] = round(rate[name] * size / 1e6, 1)
        row["channel_vs_tcp"] = round(rate["channel"] / rate["tcp"], 3)
        rows.append(row)
    return {
        "handshake_in_memory": summary(in_memory),
        "handshake_loopback": summary(loopback),
        "handshakes": handshakes,
        "throughput": rows,
        "seconds_per_run": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handshakes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    result = asyncio.run(run(args.handshakes, args.seconds))
    if args.json:
        print(json.dumps(result))
        return 0
    out = sys.stdout
    hm, hl = result["handshake_in_memory"], result["handshake_loopback"]
    print(f"handshake, both ends in one process ({args.handshakes} runs):", file=out)
    print(f"  in memory (sans-IO): {hm}", file=out)
    print(f"  loopback TCP:        {hl}", file=out)
    print("one-way throughput, channel vs plain TCP (same framing loop):", file=out)
    cols = ("bytes", 8), ("channel msg/s", 14), ("MB/s", 8), ("tcp msg/s", 11), ("MB/s", 8)
    print("  " + " ".join(f"{name:>{width}}" for name, width in cols) + f" {'ratio':>6}")
    rows = result["throughput"]
    assert isinstance(rows, list)
    for r in rows:
        print(
            f"  {r['message_bytes']:>8} {r['channel_msg_per_s']:>14} {r['channel_MB_per_s']:>8}"
            f" {r['tcp_msg_per_s']:>11} {r['tcp_MB_per_s']:>8} {r['channel_vs_tcp']:>6}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
