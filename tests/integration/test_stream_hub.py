"""The hub against real Redis: merge, gaps, duplicates, garbage, reaping, Redis restarts."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis

from tests.stream_support import (
    FakeWorker,
    SSEReader,
    make_row,
    request_ids,
    running_stream,
    settings_for,
    wait_ready,
    wait_until,
)
from vdm_hub.shared import schema
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.integration

STREAM = "/metrics/active-requests/stream"


async def test_stream_shows_exactly_the_union_of_three_workers(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    workers = [FakeWorker(redis, keys, f"w{i}") for i in range(3)]
    for w in workers:
        await w.register()
    await workers[0].start("a1", "a2")  # before the service starts: loaded from the hashes
    async with running_stream(settings_for(redis_url, key_prefix)) as (url, _app):
        await wait_ready(url)
        async with SSEReader(url + STREAM) as reader:
            await workers[1].start("b1")
            await workers[2].start("c1", "c2", "c3")
            await workers[0].end("a2")
            expected = {"a1", "b1", "c1", "c2", "c3"}
            update = await reader.wait_update(lambda d: request_ids(d) == expected)
            assert {w["worker_id"]: w["active"] for w in update["workers"]} == {
                "w0": 1, "w1": 1, "w2": 3
            }  # fmt: skip
            # A worker that shuts down cleanly takes its rows with it.
            await workers[2].remove()
            update = await reader.wait_update(lambda d: request_ids(d) == {"a1", "b1"})
            assert [w["worker_id"] for w in update["workers"]] == ["w0", "w1"]


async def test_a_lost_batch_heals_at_once_and_a_duplicate_changes_nothing(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    # A 30 s interval: healing must come from the gap, not from any timer.
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_INTERVAL="30")
    async with running_stream(settings) as (url, app), httpx.AsyncClient(base_url=url) as client:
        await wait_ready(url)
        hub = app.state.hub
        await worker.start("r1")
        await wait_until(lambda: "r1" in hub.workers["w1"].rows, 5, "r1 applied")

        # Lose a batch: change the truth and its seq marker exactly as apply.lua would, but
        # publish nothing. The hub cannot know yet.
        lost = make_row("w1", "lost")
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.active("w1"), "lost", schema.encode_row(lost))
            pipe.hset(keys.seq, "w1", f"{worker.epoch}:3")
            await pipe.execute()
        worker.rows["lost"] = lost
        assert "lost" not in hub.workers["w1"].rows

        # The next batch (seq 4) shows the gap; the hub resyncs that worker from its hash.
        await worker.start("r2")
        await wait_until(
            lambda: set(hub.workers["w1"].rows) == {"r1", "r2", "lost"}, 5, "gap healed"
        )
        text = (await client.get("/metrics")).text
        # a hub-side gap is a missed batch; the worker itself dropped nothing
        assert 'vdm_batches_missed_total{worker="w1"} 1.0' in text
        assert 'vdm_worker_events_dropped_total{worker="w1"} 0.0' in text

        # A duplicate of an applied batch is ignored.
        version = hub.version
        prefix = schema.envelope_prefix("w1", worker.epoch)
        dup = prefix + b'4,"events":' + schema.encode([{"type": "end", "request_id": "r1",
            "status": 200, "outcome": "ok", "duration_ms": 1.0, "input_tokens": None,
            "output_tokens": None}]) + b"}"  # fmt: skip
        await redis.publish(keys.events, dup)
        await worker.start("r3")  # published after the duplicate: once seen, so was the dup
        await wait_until(lambda: "r3" in hub.workers["w1"].rows, 5, "r3 applied")
        assert set(hub.workers["w1"].rows) == {"r1", "r2", "r3", "lost"}
        assert hub.version == version + 1


async def test_garbage_on_the_channel_and_in_hashes_is_skipped_and_counted(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start("good")
    await redis.hset(keys.active("w1"), "bad", b"{not json")
    async with running_stream(settings_for(redis_url, key_prefix)) as (url, app):
        await wait_ready(url)
        for junk in (
            b"\xff\xfe",
            b"[]",
            b'{"v":99,"worker_id":"w1","epoch":"e","seq":1,"events":[]}',
            b'{"v":1,"worker_id":"w1","epoch":"' + worker.epoch.encode() + b'","seq":3,'
            b'"events":[{"type":"teleport"}]}',
            b"x" * (schema.MAX_MESSAGE_BYTES + 1),
        ):
            await redis.publish(keys.events, junk)
        await worker.start("after")
        async with httpx.AsyncClient(base_url=url) as client:

            async def counted() -> str | None:
                text = (await client.get("/metrics")).text
                return text if "vdm_messages_malformed_total 6.0" in text else None

            await wait_until(counted, 5, "6 malformed counted (1 row + 5 messages)")
            snap = (await client.get("/metrics/active-requests")).json()
            assert request_ids(snap) == {"good", "after"}
            assert (await client.get("/readyz")).status_code == 200
        assert app.state.hub.ready


async def test_a_silent_worker_turns_stale_then_is_reaped_once_by_two_hubs(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    live = FakeWorker(redis, keys, "live")
    silent = FakeWorker(redis, keys, "silent", ttl=1.5, heartbeat_interval=0.3)
    for w in (live, silent):
        await w.register()
    await silent.start("s1")
    settings = settings_for(redis_url, key_prefix)
    async with running_stream(settings) as (url1, app1), running_stream(settings) as (_u, app2):
        await wait_ready(url1)
        async with SSEReader(url1 + STREAM) as reader:
            # heartbeat interval 0.3 s: after > 0.6 s without one the worker is stale
            stale = await reader.wait_update(
                lambda d: any(
                    w["worker_id"] == "silent" and w["status"] == "stale" for w in d["workers"]
                )
            )
            assert "s1" in request_ids(stale)
            # reaped within its ttl (1.5 s) plus a second
            gone = await reader.wait_update(
                lambda d: [w["worker_id"] for w in d["workers"]] == ["live"], timeout=4
            )
            assert request_ids(gone) == set()
            assert not await redis.exists(keys.active("silent"))
            # both hubs tried; the worker was removed exactly once
            reaped = app1.state.hub.counters.reaped + app2.state.hub.counters.reaped
            assert reaped == 1
            assert [w["status"] for w in gone["workers"]] == ["up"]


@pytest.mark.timeout(60)
async def test_redis_restart_clients_stay_and_the_view_heals(key_prefix: str) -> None:
    with EmbeddedRedis() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            keys = Keys(key_prefix)
            worker = FakeWorker(client, keys, "w1")
            await worker.register()
            await worker.start("before")
            settings = settings_for(server.url, key_prefix)
            async with running_stream(settings) as (url, app), SSEReader(url + STREAM) as reader:
                await reader.wait_update(lambda d: request_ids(d) == {"before"})
                await asyncio.to_thread(server.restart)  # nothing kept: an empty Redis
                await client.connection_pool.disconnect()
                # The worker notices and re-registers its whole active set (invariant 4).
                worker.rows.pop("before")
                await worker.reregister_with("again")
                update = await reader.wait_update(lambda d: request_ids(d) == {"again"}, timeout=10)
                assert [w["worker_id"] for w in update["workers"]] == ["w1"]
                await wait_ready(url)
                assert app.state.hub.counters.full_resyncs >= 2
                assert not reader.ended
        finally:
            await client.aclose()
