"""Worker ids on a real Redis: ``{index}`` gives live processes distinct small numbers, two live
publishers given one fixed id end up under two ids (one moves, once, and says so) instead of
superseding each other forever, and a restarted process takes over its crashed predecessor's
id at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.settings import Settings
from vdm_hub.shared.store import WireScripts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def settings(redis_url: str, key_prefix: str, worker_id: str) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "VDM_KEY_PREFIX": key_prefix,
            "VDM_WORKER_ID": worker_id,
            "VDM_WORKER_HEARTBEAT_INTERVAL": "0.1",
            "VDM_WORKER_TTL": "2",
        }
    )


@contextlib.asynccontextmanager
async def publishing(s: Settings) -> AsyncIterator[Publisher]:
    publisher = Publisher(s)
    await publisher.start_background()
    try:
        async with asyncio.timeout(10):
            await publisher.wait_registered()
        yield publisher
    finally:
        await publisher.close()


async def registered(redis: aioredis.Redis, keys: Keys) -> dict[str, schema.WorkerRecord]:
    raw = await redis.hgetall(keys.workers)
    return {k.decode(): schema.decode_worker_record(v) for k, v in raw.items()}


async def test_index_gives_each_live_process_its_own_number(
    redis: aioredis.Redis, redis_url: str, key_prefix: str, keys: Keys
) -> None:
    s = settings(redis_url, key_prefix, "gw-{index}")
    async with contextlib.AsyncExitStack() as stack:
        publishers = [await stack.enter_async_context(publishing(s)) for _ in range(3)]
        assert sorted(p.worker_id for p in publishers) == ["gw-1", "gw-2", "gw-3"]
        records = await registered(redis, keys)
        assert {r["instance"] for r in records.values()} == {p.instance for p in publishers}
        second = next(p for p in publishers if p.worker_id == "gw-2")
        await second.close()
        # A process that starts now takes the number the closed one left free.
        async with publishing(s) as newcomer:
            assert newcomer.worker_id == "gw-2"
            assert set(await registered(redis, keys)) == {"gw-1", "gw-2", "gw-3"}


async def test_two_live_publishers_with_one_fixed_id_settle_on_two_ids(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = settings(redis_url, key_prefix, "dup")
    caplog.set_level(logging.INFO, logger="vdm.publisher")
    async with publishing(s) as first, publishing(s) as second:
        # The second took the id over; the first finds out at its next heartbeat and moves.
        # Its record is in Redis a moment before the first counts its registration (the Lua
        # call returns first): wait for both, or the count taken below may be the old one.
        async with asyncio.timeout(10):
            while set(await registered(redis, keys)) != {"dup", "dup-2"} or first.registrations < 2:
                await asyncio.sleep(0.02)
        assert (second.worker_id, first.worker_id) == ("dup", "dup-2")
        # Settled: no more re-registrations over several heartbeats, and the rows in flight
        # moved with the id (the cancel channel too).
        counts = (first.registrations, second.registrations)
        first.start(_row("r1", first.worker_id))
        await asyncio.sleep(0.6)
        assert (first.registrations, second.registrations) == counts
        rows = await redis.hgetall(keys.active("dup-2"))
        assert schema.decode_row(rows[b"r1"])["worker_id"] == "dup-2"
        assert first.cancels.channel == keys.cancel("dup-2")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "worker id dup is also in use" in warnings[0].getMessage()
    assert "publishes as dup-2" in warnings[0].getMessage()


async def test_a_restarted_process_takes_over_its_crashed_predecessors_id(
    redis: aioredis.Redis, redis_url: str, key_prefix: str, keys: Keys
) -> None:
    # A predecessor that registered and died: its deadline is still ahead, nobody beats.
    crashed = schema.WorkerRecord(
        worker_id="gw",
        host="h",
        pid=1,
        started_at=1.0,
        upstream="",
        version="",
        epoch="old",
        heartbeat_interval=0.1,
        ttl=2.0,
        instance="dead",
    )
    await WireScripts(redis, keys).register(crashed, [("r0", b"{}")], ttl_ms=60_000)
    async with publishing(settings(redis_url, key_prefix, "gw")) as publisher:
        assert publisher.worker_id == "gw"
        assert (await registered(redis, keys))["gw"]["instance"] == publisher.instance
        assert await redis.hkeys(keys.active("gw")) == []  # the dead one's rows are gone


def _row(request_id: str, worker_id: str) -> schema.Row:
    return {
        "request_id": request_id,
        "worker_id": worker_id,
        "method": "POST",
        "path": "/v1/messages",
        "model": "m",
        "provider": None,
        "is_streaming": False,
        "start_time": 1.0,
        "phase": "upstream",
        "bytes_out": 0,
        "input_tokens": None,
        "output_tokens": None,
        "ttft_ms": None,
        "chunks_out": None,
        "labels": None,
    }
