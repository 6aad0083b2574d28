"""The publisher's batching and healing, against fakeredis (with Lua)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from services.proxy import publisher as publisher_module
from services.proxy.publisher import Publisher
from shared import schema
from shared.keys import Keys
from shared.schema import Outcome, Phase
from shared.settings import Settings
from shared.store import read_worker_state


def _settings() -> Settings:
    return Settings.from_env({"VDM_WORKER_ID": "w1", "VDM_KEY_PREFIX": "u"})


def _row(rid: str) -> schema.Row:
    return schema.Row(
        request_id=rid,
        worker_id="w1",
        method="POST",
        path="/v1/messages",
        model=None,
        provider="anthropic",
        is_streaming=False,
        start_time=time.time(),
        phase="upstream",
        bytes_out=0,
        input_tokens=None,
        output_tokens=None,
    )


async def _drain(pub: Publisher) -> None:
    async with asyncio.timeout(5):
        while pub._has_pending():
            await pub._flush_once()


async def test_progress_before_flush_is_folded_into_the_start_event(
    fake_redis: aioredis.Redis,
) -> None:
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)  # registers
    pub.start(_row("r1"))
    pub.progress("r1", {"model": "m1", "is_streaming": True})
    assert len(pub._events) == 1
    await _drain(pub)
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert state.rows["r1"]["model"] == "m1" and state.rows["r1"]["is_streaming"] is True
    assert state.seq == 2

    pub.progress("r1", {"phase": Phase.STREAMING})
    pub.progress("r1", {"bytes_out": 10})
    assert len(pub._events) == 1  # one progress event carrying both changes
    assert pub._events[0] == {
        "type": "progress",
        "request_id": "r1",
        "phase": "streaming",
        "bytes_out": 10,
    }


async def test_start_and_end_in_one_batch_leave_no_row_and_one_completed_entry(
    fake_redis: aioredis.Redis,
) -> None:
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    pub.start(_row("r2"))
    pub.end(
        "r2",
        status=200,
        outcome=Outcome.OK,
        duration_ms=1.5,
        bytes_out=3,
        input_tokens=1,
        output_tokens=2,
    )
    await _drain(pub)
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert state.rows == {}
    assert await fake_redis.xlen("u:completed") == 1


async def test_queue_overflow_drops_counts_and_rewrites_the_active_set(
    fake_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "MAX_PENDING_EVENTS", 5)
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    first_epoch = pub.epoch
    for i in range(8):
        pub.start(_row(f"r{i}"))
    assert pub.events_dropped == 3
    await _drain(pub)
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert pub.epoch != first_epoch, "a rewrite takes a new epoch"
    assert set(state.rows) == {f"r{i}" for i in range(8)}


async def test_reaped_worker_reregisters_with_its_active_set(fake_redis: aioredis.Redis) -> None:
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    pub.start(_row("keep"))
    await _drain(pub)
    await pub.scripts.remove("w1", reason="reaped")  # unconditional, as if expired
    assert not await fake_redis.hexists("u:workers", "w1")
    pub.start(_row("new"))
    await _drain(pub)  # apply refused -> re-register
    await _drain(pub)
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert set(state.rows) == {"keep", "new"}
    assert state.record is not None and state.record["epoch"] == pub.epoch


async def test_close_deregisters_and_publishes_worker_down(fake_redis: aioredis.Redis) -> None:
    pub = Publisher(_settings(), fake_redis)
    await pub.start_background()
    async with asyncio.timeout(5):
        await pub.wait_registered()
    async with fake_redis.pubsub() as pubsub:
        await pubsub.subscribe("u:events")
        await pub.close()
        async with asyncio.timeout(5):
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if msg is not None:
                    batch = schema.decode_batch(msg["data"])
                    if batch["events"][0]["type"] == "worker_down":
                        break
    assert await fake_redis.keys("u:*") == []
