"""Cancel on the worker, against a real Redis and real sockets: a message on the worker's
cancel channel (published here as a stream service would) aborts the upstream call, closes the
client's response (a stream ends abruptly, a waiting client gets a 499, never a clean 200) and
ends the request with outcome `cancelled`; unknown ids and garbage are counted, not fatal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.serving import running
from tests.worker_harness import GatedUpstream, running_worker, worker_settings
from vdm_hub.services.proxy.app import WorkerApp
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.store import read_worker_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, GatedUpstream]]:
    app = GatedUpstream()
    async with running(app, "upstream") as (url, _):
        yield url, app


async def _until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def _listening(app: WorkerApp) -> None:
    assert app.publisher is not None
    async with asyncio.timeout(10):
        await app.publisher.cancels.subscribed.wait()


async def _cancel(redis: aioredis.Redis, keys: Keys, request_id: str, by: str = "test") -> int:
    message = orjson.dumps({"request_id": request_id, "by": by})
    return int(await redis.publish(keys.cancel("w1"), message))


async def _entry(redis: aioredis.Redis, keys: Keys) -> schema.CompletedEntry:
    async def one() -> bool:
        return bool(await redis.xlen(keys.completed) == 1)

    await _until(one)
    ((entry_id, fields),) = await redis.xrange(keys.completed)
    return schema.decode_completed(entry_id, fields)


async def test_cancel_ends_a_stream_abruptly_and_records_cancelled(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    caplog.set_level("INFO", logger="vdm.cancel")
    async with running_worker(settings, up_url) as (url, app), httpx.AsyncClient() as client:
        await _listening(app)
        async with client.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": "m-stream", "stream": True},
            headers={"x-gate": "held", "x-request-id": "to-cancel"},
            timeout=30,
        ) as response:
            chunks = response.aiter_raw()
            async with asyncio.timeout(10):
                first = await anext(chunks)
            assert first.startswith(b"data: ")
            assert await _cancel(redis, keys, "to-cancel", by="session:alice") == 1
            # Bounded generously for a loaded machine; the worker acts within milliseconds.
            async with asyncio.timeout(10):
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _ in chunks:
                        pass
        entry = await _entry(redis, keys)
        assert (await read_worker_state(redis, keys, "w1")).rows == {}
    assert (entry["request_id"], entry["outcome"], entry["status"]) == (
        "to-cancel",
        "cancelled",
        200,
    )
    assert not up.gate("held").is_set(), "the upstream never had to finish"
    assert "'to-cancel'" in caplog.text and "'session:alice'" in caplog.text


async def test_cancel_of_a_request_waiting_for_its_answer_gives_a_499(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    async with running_worker(settings, up_url) as (url, app), httpx.AsyncClient() as client:
        await _listening(app)
        call = asyncio.create_task(
            client.post(
                f"{url}/v1/messages",
                json={"model": "claude-x"},
                headers={"x-gate": "wait", "x-request-id": "slow-one"},
                timeout=30,
            )
        )
        await asyncio.wait_for(up.arrival("wait").wait(), 10)
        await _cancel(redis, keys, "slow-one")
        response = await asyncio.wait_for(call, 10)
        entry = await _entry(redis, keys)
        assert app.publisher is not None
        assert app.publisher.status()["cancels"]["applied"] == 1
    assert response.status_code == 499
    assert response.json()["error"] == "cancelled"
    assert (entry["outcome"], entry["status"]) == ("cancelled", 499)


async def test_unknown_ids_and_garbage_are_counted_and_change_nothing(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    async with running_worker(settings, up_url) as (url, app), httpx.AsyncClient() as client:
        assert app.publisher is not None
        await _listening(app)
        call = asyncio.create_task(
            client.post(
                f"{url}/v1/messages",
                json={"model": "m"},
                headers={"x-gate": "keep", "x-request-id": "keep-me"},
                timeout=30,
            )
        )
        await asyncio.wait_for(up.arrival("keep").wait(), 10)
        await _cancel(redis, keys, "nobody-here")
        for garbage in (b"not json", b"[1,2]", b'{"request_id": 7}', b"\xff" * 10, b"{}" * 5000):
            await redis.publish(keys.cancel("w1"), garbage)
        cancels = app.publisher.cancels

        async def all_seen() -> bool:
            return cancels.unknown == 1 and cancels.malformed == 5

        await _until(all_seen)
        up.gate("keep").set()
        response = await asyncio.wait_for(call, 10)
        entry = await _entry(redis, keys)
    assert response.status_code == 200
    assert entry["outcome"] == "ok"
    assert cancels.cancelled == 0


async def test_the_listener_comes_back_after_its_connection_is_killed(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    upstream: tuple[str, GatedUpstream],
) -> None:
    up_url, up = upstream
    settings = worker_settings(redis_url, key_prefix)
    async with running_worker(settings, up_url) as (url, app), httpx.AsyncClient() as client:
        assert app.publisher is not None
        await _listening(app)
        # Drop every pub/sub client (as a Redis restart or a proxy in between would).
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")

        async def listening_again() -> bool:
            return bool(
                await redis.pubsub_numsub(keys.cancel("w1")) == [(keys.cancel("w1").encode(), 1)]
            )

        await _until(listening_again)
        call = asyncio.create_task(
            client.post(
                f"{url}/v1/messages",
                json={"model": "m"},
                headers={"x-gate": "again", "x-request-id": "after-kill"},
                timeout=30,
            )
        )
        await asyncio.wait_for(up.arrival("again").wait(), 10)
        await _cancel(redis, keys, "after-kill")
        response = await asyncio.wait_for(call, 10)
    assert response.status_code == 499
