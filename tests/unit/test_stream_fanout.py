"""Broadcaster: encode once, conflation, leading-edge throttle, close ends every stream."""

from __future__ import annotations

import asyncio

import orjson

from services.stream.fanout import Broadcaster, Client
from services.stream.sse import client_frames


def _bc(throttle: float = 0.2, interval: float = 30.0) -> Broadcaster:
    return Broadcaster(None, interval=interval, heartbeat=30.0, throttle=throttle, max_clients=10)


async def test_a_slow_client_gets_only_the_newest_frame_shared_by_identity() -> None:
    bc = _bc()
    frames = client_frames(bc, Client())
    first = await anext(frames)
    assert first.startswith(b"retry: ") and b"event: update" in first
    for _ in range(5):
        bc.encode_update()  # five versions while the client was not reading
    newest = await anext(frames)
    assert newest is bc.update_frame  # the very same bytes object, no copy
    assert bc.encodes == 6


async def test_leading_edge_throttle_and_close() -> None:
    bc = _bc(throttle=0.5)
    task = asyncio.create_task(bc.run_updates())
    try:
        await asyncio.sleep(0.6)  # a quiet spell longer than the window
        before = bc.encodes
        bc.notify_change()
        async with asyncio.timeout(0.3):  # lone change: out at once, not after the window
            while bc.encodes == before:
                await asyncio.sleep(0.01)
        for _ in range(20):  # churn inside one window: at most one more encode
            bc.notify_change()
            await asyncio.sleep(0.01)
        assert bc.encodes - before <= 2
    finally:
        task.cancel()
    frames = client_frames(bc, Client())
    await anext(frames)
    waiting = asyncio.create_task(anext(frames))
    await asyncio.sleep(0)
    bc.close()
    async with asyncio.timeout(1):
        try:
            await waiting
            raise AssertionError("a frame after close")
        except StopAsyncIteration:
            pass


def test_disabled_snapshot_shape() -> None:
    bc = _bc()
    data = bc.update_frame.split(b"data: ", 1)[1].strip()
    assert orjson.loads(data)["disabled"] is True
