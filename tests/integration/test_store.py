"""The protocol's Lua scripts against a real Redis: atomic state + notice, contiguous seq."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from shared import schema
from shared.keys import Keys
from shared.store import NotRegistered, WireScripts, now_ms, read_worker_state

pytestmark = pytest.mark.integration


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
        await scripts.register(_record("w1", "e1"), now_ms() + 10_000, [])
        up = await _next_batch(pubsub)
        assert (up["epoch"], up["seq"], up["events"][0]["type"]) == ("e1", 1, "worker_up")

        prefix = schema.envelope_prefix("w1", "e1")
        row = _row("w1", "r1")
        start = schema.encode([{"type": "start", "row": row}])
        seq = await scripts.apply(
            "w1", "e1", prefix, start, [("r1", schema.encode_row(row))], [], [], 100
        )
        assert seq == 2
        batch = await _next_batch(pubsub)
        assert batch["seq"] == 2 and batch["events"][0]["row"] == row
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
        assert await scripts.apply("w1", "e1", prefix, end, [], ["r1"], [done], 100) == 3
        assert (await _next_batch(pubsub))["seq"] == 3
        assert (await read_worker_state(redis, keys, "w1")).rows == {}
        ((entry_id, fields),) = await redis.xrange(keys.completed)
        assert schema.decode_completed(entry_id, fields)["output_tokens"] is None

        # A reaper does nothing while the deadline is in the future; the owner can remove.
        assert await scripts.remove("w1", reason="reaped", now_ms=now_ms()) == 0
        assert await scripts.remove("w1", reason="shutdown", epoch="e1") == 4
        down = await _next_batch(pubsub)
        assert (down["seq"], down["events"][0]["type"]) == (4, "worker_down")
        assert await scripts.remove("w1", reason="shutdown", epoch="e1") == 0  # idempotent
        with pytest.raises(NotRegistered):
            await scripts.apply("w1", "e1", prefix, start, [], [], [], 100)
        assert not await scripts.heartbeat("w1", "e1", now_ms() + 1000)


async def test_reaper_removes_expired_worker_once(redis: aioredis.Redis, keys: Keys) -> None:
    scripts = WireScripts(redis, keys)
    row = _row("w2", "r9")
    await scripts.register(_record("w2", "e2"), now_ms() - 1, [("r9", schema.encode_row(row))])
    results = await asyncio.gather(
        *(scripts.remove("w2", reason="reaped", now_ms=now_ms()) for _ in range(5))
    )
    assert sorted(results) == [0, 0, 0, 0, 2]
    assert not await redis.exists(keys.active("w2"))
    assert not await redis.hexists(keys.workers, "w2")
