"""Broadcaster: encode once, conflation, close ends every stream."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from vdm_hub.services.stream.fanout import Broadcaster, Client
from vdm_hub.services.stream.feeds import snapshot_feed


def _bc(throttle: float = 0.2, interval: float = 30.0) -> Broadcaster:
    return Broadcaster(None, interval=interval, heartbeat=30.0, throttle=throttle, max_clients=10)


async def test_a_slow_client_gets_only_the_newest_frame_shared_by_identity() -> None:
    bc = _bc()
    frames = snapshot_feed(bc, Client(), 1e9)
    first = await anext(frames)
    assert first.startswith(b"retry: ") and b"event: update" in first
    for _ in range(5):
        bc.encode_update()  # five versions while the client was not reading
    newest = await anext(frames)
    assert newest is bc.update_frame  # the very same bytes object, no copy
    assert bc.encodes == 6


# close_threadsafe is what the signal handler calls: it schedules close() on the loop of the
# future the parked client waits on.
@pytest.mark.parametrize("close", ["close", "close_threadsafe"])
async def test_close_ends_a_parked_feed(close: str) -> None:
    bc = _bc()
    frames = snapshot_feed(bc, Client(), 1e9)
    await anext(frames)
    waiting = asyncio.create_task(anext(frames))
    async with asyncio.timeout(5):
        while bc._next is None:  # not parked on the shared future yet
            await asyncio.sleep(0)
    getattr(bc, close)()
    assert bc.closed
    async with asyncio.timeout(1):
        try:
            await waiting
            raise AssertionError("a frame after close")
        except StopAsyncIteration:
            pass


def test_close_threadsafe_without_a_parked_client_sets_the_flag() -> None:
    bc = _bc()
    bc.close_threadsafe()  # no loop at all: nothing to schedule, a new client sees `closed`
    assert bc.closed


def test_disabled_snapshot_shape() -> None:
    bc = _bc()
    data = bc.update_frame.split(b"data: ", 1)[1].strip()
    assert orjson.loads(data)["disabled"] is True
