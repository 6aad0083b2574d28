"""The worker when Redis goes away: proxying goes on, and on Redis's return the worker's hash
equals its real in-flight set (protocol invariant 4)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis

from tests.serving import running
from tests.worker_harness import GatedUpstream, running_worker, worker_settings
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.store import read_worker_state

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, GatedUpstream]]:
    app = GatedUpstream()
    async with running(app, "upstream") as (url, _):
        yield url, app


@pytest.mark.timeout(60)
async def test_redis_stopped_mid_load_every_request_succeeds_and_state_heals(
    own_redis: EmbeddedRedis, key_prefix: str, upstream: tuple[str, GatedUpstream]
) -> None:
    up_url, up = upstream
    keys = Keys(key_prefix)
    settings = worker_settings(own_redis.url, key_prefix)
    redis = aioredis.Redis.from_url(own_redis.url, socket_timeout=2)
    held: dict[str, asyncio.Task[httpx.Response]] = {}
    # Closed in `finally`: a failing assertion must not leave this client's socket to the
    # garbage collector, which turns it into a ResourceWarning inside a later test.
    try:
        async with (
            running_worker(settings, up_url) as (url, app),
            httpx.AsyncClient(timeout=30) as client,
        ):
            assert app.publisher is not None

            def hold(name: str) -> None:
                held[name] = asyncio.create_task(
                    client.post(
                        f"{url}/v1/messages",
                        json={"model": "m"},
                        headers={"x-gate": name, "x-request-id": name},
                    )
                )

            for name in ("a", "b", "c"):
                hold(name)
            for name in ("a", "b", "c"):
                await asyncio.wait_for(up.arrival(name).wait(), 5)

            own_redis.kill()
            quick = await asyncio.gather(
                *(client.post(f"{url}/v1/messages", json={"model": "q"}) for _ in range(30))
            )
            assert [r.status_code for r in quick] == [200] * 30
            for name in ("d", "e"):
                hold(name)
                await asyncio.wait_for(up.arrival(name).wait(), 5)
            up.gate("a").set()
            assert (await held["a"]).status_code == 200
            assert set(app.publisher.active) == {"b", "c", "d", "e"}

            own_redis.start()  # same port, empty: nothing survived the outage

            async def healed() -> bool:
                try:
                    state = await read_worker_state(redis, keys, "w1")
                except (OSError, aioredis.ConnectionError):
                    return False
                return set(state.rows) == {"b", "c", "d", "e"}

            async with asyncio.timeout(15):
                while not await healed():
                    await asyncio.sleep(0.05)
            # The rows are back as soon as the re-registration's script has run, but the
            # publisher calls itself connected only once that flush has returned, after the
            # next round trip (the finished requests' backlog): on a loaded machine a check
            # right after the rows appear could land in between. Wait for it, bounded.
            async with asyncio.timeout(10):
                while not app.publisher.connected:
                    await asyncio.sleep(0.01)
            assert app.publisher.events_dropped > 0

            for name in ("b", "c", "d", "e"):
                up.gate(name).set()
            assert [(await held[n]).status_code for n in "bcde"] == [200] * 4

            async def empty() -> bool:
                return (await read_worker_state(redis, keys, "w1")).rows == {}

            async with asyncio.timeout(10):
                while not await empty():
                    await asyncio.sleep(0.05)
    finally:
        for task in held.values():
            task.cancel()
        await asyncio.gather(*held.values(), return_exceptions=True)
        await redis.aclose()
