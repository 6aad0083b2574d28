"""The hub's ``sync`` against a real Redis that refuses writes (maxmemory with noeviction):
nobody is reaped while heartbeats cannot land, and once writes are accepted again every worker
gets a fresh TTL before its deadline counts. And reconciliation: a worker that vanished from
Redis without a ``worker_down`` leaves the view.

A dedicated Redis per test: maxmemory and FLUSHALL are server-wide."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.stream_support import FakeWorker
from vdm_hub.services.stream.hub import READER, Hub
from vdm_hub.services.stream.sync import OUT_OF_MEMORY
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.store import WireScripts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture
async def own_redis() -> AsyncIterator[aioredis.Redis]:
    server = await asyncio.to_thread(EmbeddedRedis().start)
    client = aioredis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


async def _fill_up(redis: aioredis.Redis) -> None:
    """Redis at maxmemory: every write that may grow memory is refused (OOM)."""
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)


async def _in_sync_hub(redis: aioredis.Redis, keys: Keys) -> Hub:
    hub = Hub(redis, keys)
    await hub.full_resync()
    hub.sync.clear(READER)  # what Hub.run does once subscribed and resynced
    return hub


async def test_no_one_is_reaped_while_writes_are_refused_and_then_after_a_fresh_ttl(
    own_redis: aioredis.Redis,
) -> None:
    keys = Keys("oom")
    worker = FakeWorker(own_redis, keys, "w1", ttl=0.5)
    await worker.register()
    await worker.start("r1")
    hub = await _in_sync_hub(own_redis, keys)
    await hub.reap_once()
    assert hub.sync.ok and "w1" in hub.workers

    await _fill_up(own_redis)
    scripts = WireScripts(own_redis, keys)
    deadline = await own_redis.zscore(keys.alive, "w1")
    assert deadline is not None
    while await scripts.redis_time_ms() <= deadline:  # its heartbeat could not have landed
        await asyncio.sleep(0.05)
    before = hub.version
    await hub.reap_once()
    assert not hub.sync.ok and hub.sync.reason == OUT_OF_MEMORY
    assert hub.version > before, "a change of sync is a new version: clients learn at once"
    assert "w1" in hub.workers and hub.counters.reaped == 0
    assert await own_redis.zscore(keys.alive, "w1") is not None

    # Writes accepted again: in sync, but the worker's expired deadline does not count until
    # it had one TTL to heartbeat.
    await own_redis.config_set("maxmemory", 0)
    await hub.reap_once()
    recovered = await scripts.redis_time_ms()
    assert hub.sync.ok and "w1" in hub.workers and hub.counters.reaped == 0
    # It never heartbeats (it died meanwhile): reaped once the fresh TTL is over.
    while "w1" in hub.workers:
        await hub.reap_once()
        assert await scripts.redis_time_ms() < recovered + 5_000, "never reaped"
        await asyncio.sleep(0.05)
    assert await scripts.redis_time_ms() >= recovered + 500
    assert hub.counters.reaped == 1


async def test_a_worker_redis_forgot_leaves_the_view_at_the_next_reaper_tick(
    own_redis: aioredis.Redis,
) -> None:
    keys = Keys("gone")
    dead, live = FakeWorker(own_redis, keys, "dead"), FakeWorker(own_redis, keys, "live")
    for worker in (dead, live):
        await worker.register()
        await worker.start(f"{worker.worker_id}-r1")
    hub = await _in_sync_hub(own_redis, keys)
    assert set(hub.workers) == {"dead", "live"}
    await own_redis.flushall()
    await live.register()  # a live worker rewrites its state (its heartbeat was refused)
    t0 = time.monotonic()
    await hub.reap_once()
    # Before: kept forever, since a worker missing from P:alive was never looked at.
    assert set(hub.workers) == {"live"}, "the worker Redis no longer knows is still shown"
    assert set(hub.workers["live"].rows) == {"live-r1"}
    assert time.monotonic() - t0 < 5
