"""Admission of ClientHellos: a hello is signed by a pinned client for the server it names,
and fresh; anything else is refused before the server spends a KEM or keeps state. Floods
of unauthenticated hellos, from the genuine client's own address or from many, over real
loopback sockets, never stop a genuine handshake (issue 9 item 3)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator

import pytest

from pacegate.channel import ChannelError, ChannelIdentity, ChannelServerStats, connect, serve
from pacegate.channel import admission as adm
from pacegate.channel.session import NEED_DATA, ChannelSession, HandshakeComplete
from pacegate.channel.wire import FRAME_HEADER_SIZE, FrameType

HOST = "127.0.0.1"
WAIT = 30.0  # guard against hangs only; no test asserts how long anything takes

HOSPITAL = ChannelIdentity.generate("hospital")
CLOUD = ChannelIdentity.generate("cloud")
GATEWAY = ChannelIdentity.generate("gateway")
INTRUDER = ChannelIdentity.generate("intruder")


def hello_from(identity: ChannelIdentity, *, as_name: str | None = None, **opts: object) -> bytes:
    """A well-formed ClientHello for "hospital", signed by ``identity`` (under another
    name when ``as_name`` is given: a forgery)."""
    signer = identity if as_name is None else ChannelIdentity(as_name, identity.private_key)
    return ChannelSession.client(
        signer,
        server_name="hospital",
        server_key=HOSPITAL.public_key,
        **opts,  # type: ignore[arg-type]
    ).initiate()


def server_session(**opts: object) -> ChannelSession:
    return ChannelSession.server(
        HOSPITAL,
        allowed_clients={"gateway": GATEWAY.public_key},
        **opts,  # type: ignore[arg-type]
    )


def refusal_of(server: ChannelSession, hello: bytes) -> str:
    server.receive_data(hello)
    with pytest.raises(ChannelError) as info:
        server.next_event()
    out = server.data_to_send()
    assert out[:1] == bytes([FrameType.ALERT])  # the client is told, in clear, and nothing else
    assert len(out) == FRAME_HEADER_SIZE + 1
    return info.value.reason


# ------------------------------------------------------------------ the replay cache


def test_replay_cache_refuses_stale_replayed_and_too_many_hellos() -> None:
    cache = adm.HelloReplayCache(max_skew=60, max_per_client=3)
    assert cache.refusal("gateway", b"r1", hello_time=1000, now=1061) == adm.STALE
    assert cache.refusal("gateway", b"r1", hello_time=1061, now=1000) == adm.STALE
    assert cache.refusal("gateway", b"r1", hello_time=1000, now=1000) is None
    cache.admit("gateway", b"r1", 1000)
    assert cache.refusal("gateway", b"r1", hello_time=1000, now=1030) == adm.REPLAYED
    cache.admit("gateway", b"r2", 1000)
    cache.admit("gateway", b"r3", 1000)
    assert cache.refusal("gateway", b"r4", hello_time=1001, now=1001) == adm.RATE_LIMITED
    assert cache.refusal("cloud", b"r4", hello_time=1001, now=1001) is None  # others unaffected
    # once stale, entries leave the cache (it holds at most max_per_client per client)
    assert cache.refusal("gateway", b"r4", hello_time=1061, now=1061) is None
    assert len(cache) == 0


def test_replay_cache_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_skew"):
        adm.HelloReplayCache(max_skew=0)
    with pytest.raises(ValueError, match="max_per_client"):
        adm.HelloReplayCache(max_per_client=0)


# ------------------------------------------------------------------ what a hello must be


def test_hello_not_signed_by_the_pinned_key_is_refused_before_any_kem() -> None:
    server = server_session()
    assert refusal_of(server, hello_from(INTRUDER, as_name="gateway")) == "bad_signature"
    assert server.th_hello is None  # no handshake keys: no KEM was spent, no state kept


def test_hello_from_an_unknown_client_is_refused() -> None:
    assert refusal_of(server_session(), hello_from(INTRUDER)) == "unknown_client"


def test_replayed_genuine_hello_is_refused_on_another_connection() -> None:
    cache = adm.HelloReplayCache()
    hello = hello_from(GATEWAY)
    first = server_session(replay_cache=cache)
    first.receive_data(hello)
    assert first.next_event() is NEED_DATA  # admitted: a ServerHello is queued
    assert first.data_to_send()[:1] == bytes([FrameType.SERVER_HELLO])
    assert refusal_of(server_session(replay_cache=cache), hello) == "replayed_hello"


def test_hello_with_a_clock_far_from_the_servers_is_refused_and_the_client_told_why() -> None:
    server = server_session()
    client = ChannelSession.client(
        GATEWAY,
        server_name="hospital",
        server_key=HOSPITAL.public_key,
        wall_clock=lambda: 1.7e9,  # years behind the server's clock
    )
    assert refusal_of(server, client.initiate()) == "stale_hello"
    server_alert = bytes([FrameType.ALERT]) + (1).to_bytes(4, "big") + b"\x02"
    client.receive_data(server_alert)
    with pytest.raises(ChannelError, match="NTP") as info:
        client.next_event()
    assert info.value.reason == "refused_by_peer"


def test_relayed_handshake_to_a_second_server_that_pins_the_same_client_fails() -> None:
    # The gateway means "hospital"; a relay hands its hello to "cloud", which pins the
    # gateway too. The hello (and so everything the client signs) names the server it meant.
    client = ChannelSession.client(GATEWAY, server_name="hospital", server_key=HOSPITAL.public_key)
    cloud = ChannelSession.server(CLOUD, allowed_clients={"gateway": GATEWAY.public_key})
    cloud.receive_data(client.initiate())

    def run_handshake() -> None:
        while not isinstance(cloud.next_event(), HandshakeComplete):
            client.receive_data(cloud.data_to_send())
            client.next_event()
            cloud.receive_data(client.data_to_send())

    with pytest.raises(ChannelError) as info:
        run_handshake()
    assert info.value.reason == "wrong_server"
    assert cloud.peer_name is None


# ------------------------------------------------------------------ floods over loopback


@contextlib.asynccontextmanager
async def hospital_server(**opts: object) -> AsyncIterator[tuple[int, ChannelServerStats]]:
    stats = ChannelServerStats()

    async def on_session(stream: object) -> None:
        async for msg in stream:  # type: ignore[attr-defined]
            await stream.send(b"ack:" + msg)  # type: ignore[attr-defined]

    server = await serve(
        HOST,
        0,
        identity=HOSPITAL,
        allowed_clients={"gateway": GATEWAY.public_key},
        on_session=on_session,
        stats=stats,
        **opts,  # type: ignore[arg-type]
    )
    try:
        yield server.sockets[0].getsockname()[1], stats
    finally:
        server.close()
        await server.wait_closed()


async def genuine_round_trip(port: int, text: bytes) -> None:
    stream = await connect(
        HOST,
        port,
        identity=GATEWAY,
        server_name="hospital",
        server_key=HOSPITAL.public_key,
        handshake_timeout=WAIT,
    )
    try:
        await stream.send(text)
        assert await asyncio.wait_for(stream.recv(), WAIT) == b"ack:" + text
    finally:
        await stream.close()


def attacker_hellos() -> list[bytes]:
    """Well-formed hellos that no pinned client signed for this server just now: forged
    under the gateway's name, from an unknown client, and stale."""
    return [
        *(hello_from(INTRUDER, as_name="gateway") for _ in range(4)),
        hello_from(INTRUDER),
        hello_from(GATEWAY, wall_clock=lambda: 1.7e9),
    ]


async def stalled(source: str, port: int, hello: bytes) -> asyncio.StreamWriter:
    """A connection that sends a hello and then never reads, writes or closes."""
    _, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    writer.write(hello)
    return writer


@pytest.mark.integration
async def test_flood_of_stalled_hellos_from_the_genuine_clients_address_does_not_stop_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Issue 9: 200 stalled but valid ClientHellos from 127.0.0.1 made a genuine handshake
    # from the same address fail (the per-source cap was full of them).
    caplog.set_level(logging.WARNING, logger="pacegate.security")
    forged = attacker_hellos()
    async with hospital_server(handshake_timeout=WAIT) as (port, stats):
        # replays of a genuine hello that was admitted once are part of the flood too
        captured = hello_from(GATEWAY)
        flood = [await stalled(HOST, port, captured)]
        hellos = itertools.cycle([*forged, captured])
        flood += [await stalled(HOST, port, next(hellos)) for _ in range(199)]
        try:
            await until(lambda: sum(stats.refused.values()) >= 199)
            for i in range(8):  # then the genuine gateway, from the same address
                await genuine_round_trip(port, b"genuine %d" % i)
            assert stats.sessions == 8
            assert set(stats.refused) <= {
                "bad_signature",
                "unknown_client",
                "stale_hello",
                "replayed_hello",
                "handshake_timeout",  # the one stalled genuine hello, if its time came
            }
            assert stats.refused["replayed_hello"] >= 1
            assert stats.refused["bad_signature"] >= 1
        finally:
            for w in flood:
                w.close()


@pytest.mark.integration
async def test_flood_of_stalled_hellos_from_32_addresses_renewed_does_not_stop_genuine_ones() -> (
    None
):
    # Issue 9: 256 stalled hellos from 32 addresses, renewed for 35 s, made 7 of 8 genuine
    # gateway handshakes fail. Here 256 connections from 32 addresses are renewed (each
    # refused connection is replaced at once, idle sockets among them) while 8 genuine
    # handshakes run at once.
    done = asyncio.Event()
    sources = [f"127.0.0.{2 + i}" for i in range(32)]
    async with hospital_server(handshake_timeout=WAIT, first_frame_timeout=WAIT) as (port, st):
        attackers = asyncio.create_task(flood(sources, 8, port, done))
        try:
            await until(lambda: st.connections >= 256)
            results = await asyncio.gather(
                *(genuine_round_trip(port, b"genuine %d" % i) for i in range(8)),
                return_exceptions=True,
            )
            assert [r for r in results if r is not None] == []  # all 8 got through
            assert st.sessions == 8
            assert st.refused.get("bad_signature", 0) > 0
        finally:
            done.set()
            await attackers


async def flood(sources: list[str], per_source: int, port: int, done: asyncio.Event) -> None:
    """Attackers that keep ``per_source`` connections open from each source, each replaced
    as soon as the server closes it: three in four send a hello no pinned client signed, the
    others stay silent (slowloris). Bounded in connections, not in time."""
    forged = attacker_hellos()
    opened = 0
    budget = 4000

    async def attacker(source: str, slot: int) -> None:
        nonlocal opened
        while not done.is_set() and opened < budget:
            opened += 1
            try:
                reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
            except OSError:
                await asyncio.sleep(0.01)
                continue
            try:
                if slot % 4:
                    writer.write(forged[(slot + opened) % len(forged)])
                # until the server hangs up, or the test is over (never cancelled, so that
                # no socket is left to the garbage collector)
                while not done.is_set():
                    try:
                        if not await asyncio.wait_for(reader.read(65536), 0.2):
                            break
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    tasks = [asyncio.create_task(attacker(src, i)) for src in sources for i in range(per_source)]
    await done.wait()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.integration
async def test_concurrent_flood_from_the_genuine_clients_address_does_not_stop_it() -> None:
    # With a per-source cap on connections that had not sent a hello yet, 16 to 64
    # connections at a time from 127.0.0.1 evicted the gateway's own connection before its
    # hello was read. Unverified connections are now capped only in all (1,024).
    done = asyncio.Event()
    async with hospital_server(handshake_timeout=WAIT, first_frame_timeout=WAIT) as (port, st):
        attackers = asyncio.create_task(flood([HOST], 64, port, done))
        try:
            await until(lambda: st.connections >= 64)
            for i in range(8):
                await genuine_round_trip(port, b"genuine %d" % i)
            assert st.sessions == 8
            assert st.refused.get("bad_signature", 0) > 0
        finally:
            done.set()
            await attackers


async def until(predicate: object) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)
