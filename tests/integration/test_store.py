"""The protocol's Lua scripts against a real Redis: atomic state + notice, contiguous seq."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

from tests.stream_support import FakeWorker
from vdm_hub.shared import schema
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.store import NotRegistered, WireScripts, list_worker_ids, read_worker_state

pytestmark = pytest.mark.integration

TTL = 10_000


def _record(worker_id: str, epoch: str) -> schema.WorkerRecord:
    return schema.WorkerRecord(
        worker_id=worker_id,
        host="h",
        pid=1,
        started_at=time.time(),
        upstream="http://u",
        version="t",
        epoch=epoch,
        heartbeat_interval=2.0,
        ttl=10.0,
    )


def _row(worker_id: str, request_id: str) -> schema.Row:
    return schema.Row(
        request_id=request_id,
        worker_id=worker_id,
        method="POST",
        path="/v1/chat/completions",
        model="m",
        provider="openai",
        is_streaming=False,
        start_time=time.time(),
        phase="upstream",
        bytes_out=0,
        input_tokens=None,
        output_tokens=None,
        ttft_ms=None,
        chunks_out=None,
        ttfb_ms=None,
        last_output_at=None,
        labels=None,
    )


async def _next_batch(pubsub: aioredis.client.PubSub) -> schema.Batch:
    async with asyncio.timeout(5):
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                return schema.decode_batch(msg["data"])


async def test_register_apply_remove_publish_contiguous_batches(
    redis: aioredis.Redis, keys: Keys
) -> None:
    scripts = WireScripts(redis, keys)
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.events)
        await scripts.register(_record("w1", "e1"), [], ttl_ms=10_000)
        up = await _next_batch(pubsub)
        assert (up.epoch, up.seq, up.events[0].type) == ("e1", 1, "worker_up")

        prefix = schema.envelope_prefix("w1", "e1")
        row = _row("w1", "r1")
        start = schema.encode([{"type": "start", "row": row}])
        seq = await scripts.apply(
            "w1", "e1", prefix, start, [("r1", schema.encode_row(row))], [], [], 100, ttl_ms=TTL
        )
        assert seq == 2
        batch = await _next_batch(pubsub)
        (started,) = batch.events
        assert batch.seq == 2 and isinstance(started, schema.Start)
        assert started.row.as_row() == row
        state = await read_worker_state(redis, keys, "w1")
        assert (state.epoch, state.seq, list(state.rows)) == ("e1", 2, ["r1"])

        done = schema.CompletedEntry(
            request_id="r1",
            worker_id="w1",
            model="m",
            method="POST",
            path="/p",
            status=200,
            outcome="ok",
            start_time=row["start_time"],
            duration_ms=12.5,
            input_tokens=3,
            output_tokens=None,
            bytes_out=10,
            ttft_ms=9.5,
            ttfb_ms=2.25,
            labels={"team": "a"},
        )
        end = schema.encode(
            [
                {
                    "type": "end",
                    "request_id": "r1",
                    "status": 200,
                    "outcome": "ok",
                    "duration_ms": 12.5,
                    "input_tokens": 3,
                    "output_tokens": None,
                }
            ]
        )
        assert await scripts.apply("w1", "e1", prefix, end, [], ["r1"], [done], 100, TTL) == 3
        assert (await _next_batch(pubsub)).seq == 3
        assert (await read_worker_state(redis, keys, "w1")).rows == {}
        ((entry_id, fields),) = await redis.xrange(keys.completed)
        assert schema.decode_completed(entry_id, fields) == {**done, "id": entry_id.decode()}

        # A reaper does nothing while the deadline is in the future; the owner can remove.
        assert await scripts.remove("w1", reason="reaped", expired_only=True) == 0
        assert await scripts.remove("w1", reason="shutdown", epoch="e1") == 4
        down = await _next_batch(pubsub)
        assert (down.seq, down.events[0].type) == (4, "worker_down")
        assert await scripts.remove("w1", reason="shutdown", epoch="e1") == 0  # idempotent
        with pytest.raises(NotRegistered):
            await scripts.apply("w1", "e1", prefix, start, [], [], [], 100, TTL)
        assert not await scripts.heartbeat("w1", "e1", ttl_ms=TTL)


async def _expire(scripts: WireScripts, redis: aioredis.Redis, keys: Keys, wid: str) -> None:
    """Until ``wid``'s deadline has passed on Redis's clock (bounded)."""
    async with asyncio.timeout(5):
        while True:
            deadline = await redis.zscore(keys.alive, wid)
            if deadline is None or deadline < await scripts.redis_time_ms():
                return
            await asyncio.sleep(0.005)


async def test_reaper_removes_expired_worker_once(redis: aioredis.Redis, keys: Keys) -> None:
    scripts = WireScripts(redis, keys)
    row = _row("w2", "r9")
    await scripts.register(_record("w2", "e2"), [("r9", schema.encode_row(row))], ttl_ms=1)
    await _expire(scripts, redis, keys, "w2")
    results = await asyncio.gather(
        *(scripts.remove("w2", reason="reaped", expired_only=True) for _ in range(5))
    )
    assert sorted(results) == [0, 0, 0, 0, 2]
    assert not await redis.exists(keys.active("w2"))
    assert not await redis.hexists(keys.workers, "w2")


async def test_deadlines_are_redis_time_plus_the_ttl(redis: aioredis.Redis, keys: Keys) -> None:
    # The caller sends a TTL, never a deadline of its own clock: whatever the worker's clock
    # says, the deadline is Redis's TIME plus the TTL.
    scripts = WireScripts(redis, keys)
    before = await scripts.redis_time_ms()
    await scripts.register(_record("w3", "e3"), [], ttl_ms=7_000)
    after = await scripts.redis_time_ms()
    deadline = await redis.zscore(keys.alive, "w3")
    assert deadline is not None and before + 7_000 <= deadline <= after + 7_000
    assert await scripts.heartbeat("w3", "e3", ttl_ms=9_000)
    deadline = await redis.zscore(keys.alive, "w3")
    assert deadline is not None and deadline >= after + 9_000
    seconds, micros = await redis.time()
    assert abs(await scripts.redis_time_ms() - (seconds * 1000 + micros // 1000)) < 5_000


async def test_every_applied_batch_pushes_the_deadline_forward(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # A worker that is publishing is alive, heartbeat or not.
    scripts = WireScripts(redis, keys)
    await scripts.register(_record("w4", "e4"), [], ttl_ms=1)
    await _expire(scripts, redis, keys, "w4")
    row = _row("w4", "r1")
    start = schema.encode([{"type": "start", "row": row}])
    prefix = schema.envelope_prefix("w4", "e4")
    now = await scripts.redis_time_ms()
    await scripts.apply("w4", "e4", prefix, start, [], [], [], 100, 60_000)
    deadline = await redis.zscore(keys.alive, "w4")
    assert deadline is not None and deadline >= now + 60_000
    assert await scripts.remove("w4", reason="reaped", expired_only=True) == 0


async def test_a_malformed_seq_marker_is_garbage_and_reaping_goes_on(
    redis: aioredis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    scripts = WireScripts(redis, keys)
    await scripts.register(_record("ok", "e5"), [], ttl_ms=1)
    # Markers someone else wrote: no ':' at all, and a seq that is not a number.
    await redis.hset(keys.seq, mapping={"bad1": "garbage", "bad2": "e6:x"})
    await redis.zadd(keys.alive, {"bad1": 1, "bad2": 1})
    await _expire(scripts, redis, keys, "ok")
    for wid in ("bad1", "bad2", "ok"):
        assert await scripts.remove(wid, reason="reaped", expired_only=True) > 0, wid
    assert await redis.hlen(keys.seq) == 0 and await redis.zcard(keys.alive) == 0
    # A worker whose marker is garbage is told to re-register, not handed a script error.
    await redis.hset(keys.seq, "bad2", "e6:x")
    with pytest.raises(NotRegistered):
        await scripts.apply("bad2", "e6", b"{", b"[]", [], [], [], 100, TTL)
    assert not await scripts.heartbeat("bad1", "e6", ttl_ms=TTL)

    # A script that does fail is logged, not swallowed.
    await redis.set(keys.alive, "not a zset")
    with caplog.at_level(logging.ERROR, logger="vdm.store"), pytest.raises(ResponseError):
        await scripts.remove("ok", reason="reaped", expired_only=True)
    assert "Redis script remove failed" in caplog.text and "WRONGTYPE" in caplog.text


@pytest.fixture
async def full() -> AsyncIterator[aioredis.Redis]:
    """A Redis of our own at maxmemory (noeviction): every write that may grow memory is
    refused (OOM), as is every command queued in a MULTI."""
    server = await asyncio.to_thread(EmbeddedRedis().start)
    client = aioredis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


async def test_state_reads_work_at_maxmemory(full: aioredis.Redis) -> None:
    keys = Keys("mm")
    worker = FakeWorker(full, keys, "w1")
    await worker.register()
    await worker.start("r1", "r2")
    await full.config_set("maxmemory-policy", "noeviction")
    await full.config_set("maxmemory", 1)
    # Before: a MULTI read, which Redis refuses at maxmemory (every queued command is).
    with pytest.raises(OutOfMemoryError):
        async with full.pipeline(transaction=True) as pipe:
            pipe.hget(keys.seq, "w1")
            await pipe.execute()
    state = await read_worker_state(full, keys, "w1")
    assert set(state.rows) == {"r1", "r2"} and state.epoch == worker.epoch
    assert state.record is not None and state.deadline_ms is not None
    assert await list_worker_ids(full, keys) == {"w1"}
    # ...while the worker's own writes are refused.
    with pytest.raises(OutOfMemoryError):
        await worker.heartbeat()


async def test_register_and_heartbeat_measure_the_offset_to_redis_s_clock(
    redis: aioredis.Redis, keys: Keys
) -> None:
    scripts = WireScripts(redis, keys)
    await scripts.register(_record("w7", "e7"), [], ttl_ms=TTL)
    assert await scripts.heartbeat("w7", "e7", ttl_ms=TTL)
    # This process and Redis share the host's clock: within the measurement's own error.
    assert scripts.clock.offset == 0.0
    assert not await scripts.heartbeat("w7", "other-epoch", ttl_ms=TTL)
