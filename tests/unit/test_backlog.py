"""Finished requests across a Redis outage: all of them are kept up to the bound in bytes (the
old backlog kept 2,000 and dropped the rest silently); past it the oldest go, counted in the
worker record and logged once with the number."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import fakeredis
import pytest

from tests.unit.test_publisher import _end, _row
from vdm_hub.services.proxy.backlog import CompletedBacklog, entry_size
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared import schema
from vdm_hub.shared.settings import Settings


def _entry(rid: str, labels: dict[str, str] | None = None) -> schema.CompletedEntry:
    return {
        "request_id": rid,
        "worker_id": "w1",
        "model": "gpt-4o-mini",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "start_time": 1.0,
        "duration_ms": 1.0,
        "input_tokens": 1,
        "output_tokens": 2,
        "bytes_out": 3,
        "ttft_ms": None,
        "labels": labels,
    }


def test_the_bound_is_in_bytes_and_the_oldest_go_first() -> None:
    size = entry_size(_entry("r00"))
    backlog = CompletedBacklog(limit=10 * size)
    for i in range(15):
        backlog.append(_entry(f"r{i:02d}"))
    assert len(backlog) == 10 and backlog.bytes <= backlog.limit
    assert (backlog.dropped, backlog.unreported) == (5, 5)
    taken = backlog.take(3)
    assert [e["request_id"] for e in taken] == ["r05", "r06", "r07"]
    backlog.append(_entry("r15"))
    backlog.append(_entry("r16"))
    backlog.put_back(taken)  # not written after all: in front again, the oldest to go
    assert [e["request_id"] for e in backlog.take(100)] == [f"r{i:02d}" for i in range(7, 17)]
    assert backlog.dropped == 7 and backlog.bytes == 0
    # Labels count: a big entry takes more of the bound.
    assert entry_size(_entry("r", {"k" * 32: "v" * 128})) > size + 160


def _settings(**extra: str) -> Settings:
    return Settings.from_env(
        {"VDM_WORKER_ID": "w1", "VDM_KEY_PREFIX": "u", "VDM_COMPLETED_MAXLEN": "100000", **extra}
    )


@pytest.fixture
async def server() -> AsyncIterator[fakeredis.FakeServer]:
    yield fakeredis.FakeServer()


async def _through_an_outage(
    server: fakeredis.FakeServer, settings: Settings, finished: int
) -> Publisher:
    redis = fakeredis.FakeAsyncRedis(server=server)
    pub = Publisher(settings, redis)
    await pub.start_background()
    async with asyncio.timeout(5):
        await pub.wait_registered()
    server.connected = False
    for i in range(finished):
        pub.start(_row(f"r{i}"))
        _end(pub, f"r{i}")
    async with asyncio.timeout(5):
        while pub.flush_failures == 0:
            await asyncio.sleep(0.01)
    server.connected = True
    async with asyncio.timeout(10):
        while pub._has_pending() or not pub.connected:
            await asyncio.sleep(0.01)
    return pub


async def test_every_finished_request_outlives_an_outage_within_the_bound(
    server: fakeredis.FakeServer,
) -> None:
    pub = await _through_an_outage(server, _settings(), 5_000)
    try:
        assert await pub.redis.xlen("u:completed") == 5_000
        assert pub.status()["completed_dropped"] == 0
    finally:
        await pub.close()


async def test_past_the_bound_the_oldest_are_dropped_counted_and_logged_once(
    server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    bound = 100 * entry_size(_entry("0" * 2))
    caplog.set_level(logging.INFO, logger="vdm.publisher")
    pub = await _through_an_outage(server, _settings(VDM_COMPLETED_BACKLOG_BYTES=str(bound)), 300)
    try:
        kept = await pub.redis.xlen("u:completed")
        dropped = pub.status()["completed_dropped"]
        assert kept + dropped == 300 and 50 < kept < 120  # ~100 of these (shorter paths)
        newest = (await pub.redis.xrevrange("u:completed", count=1))[0][1]
        assert newest[b"request_id"] == b"r299"  # the oldest went, not the newest
        # The re-registration that ended the outage carried the count for the stream service.
        record = schema.decode_worker_record(await pub.redis.hget("u:workers", "w1"))
        assert record["completed_dropped"] == dropped
        reports = [r.getMessage() for r in caplog.records if "were dropped" in r.getMessage()]
        assert reports == [reports[0]] and reports[0].startswith(f"{dropped} finished requests")
        unreachable = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
        assert len(unreachable) == 1
    finally:
        await pub.close()
