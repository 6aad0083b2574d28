"""Cancel of a request in an instrumented app, through Redis, on a real Uvicorn server.

Before, a cancel of such a request answered 202 and did nothing: only the worker's reverse
proxy had a way to stop a request. Now the wrapper stops any app as a client disconnect would:
a Starlette ``StreamingResponse`` stops (its generator's ``finally`` runs: the upstream call is
closed) and the client sees its stream break off; an endpoint that waits on something else is
cancelled after a grace and its client gets 499; all within 2 s, with outcome ``cancelled``.
An app instrumented with ``cancel=False`` says so in its worker record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import vdm_hub
from tests.embed_support import completed, until, workers
from tests.serving import running
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]


class Upstream:
    """What the app's endpoints wait on, and what they saw of it."""

    def __init__(self) -> None:
        self.streaming = asyncio.Event()
        self.closed: list[str] = []


def app_with(upstream: Upstream) -> Any:
    async def stream(request: Any) -> StreamingResponse:
        await request.body()

        async def tokens() -> AsyncIterator[bytes]:
            try:
                for n in range(1000):
                    yield b'data: {"choices":[{"delta":{"content":"t%d"}}]}\n\n' % n
                    upstream.streaming.set()
                    await asyncio.sleep(0.05)  # the upstream's next token
                yield b"data: [DONE]\n\n"
            finally:
                upstream.closed.append("stream")  # where a real app closes its upstream call

        return StreamingResponse(tokens(), media_type="text/event-stream")

    async def whole(request: Any) -> JSONResponse:
        await request.body()
        try:
            await asyncio.sleep(60)  # a whole answer, awaited in one go: it never sends early
        finally:
            upstream.closed.append("whole")
        return JSONResponse({})

    routes = [
        Route("/v1/chat/completions", stream, methods=["POST"]),
        Route("/v1/messages", whole, methods=["POST"]),
    ]
    return vdm_hub.instrument(Starlette(routes=routes), worker_id="cx-1")


async def cancel(redis: aioredis.Redis, keys: Keys, request_id: str) -> None:
    channel = keys.cancel("cx-1")

    async def listening() -> bool:
        return bool(await redis.pubsub_numsub(channel) == [(channel.encode(), 1)])

    await until(listening)
    message = orjson.dumps({"request_id": request_id, "by": "test"})
    assert await redis.publish(channel, message) == 1


async def test_a_cancelled_stream_stops_the_app_and_breaks_off_for_the_client(
    app_env: dict[str, str], redis: aioredis.Redis, keys: Keys
) -> None:
    upstream = Upstream()
    async with running(app_with(upstream), "app") as (url, _), httpx.AsyncClient() as client:
        await until(lambda: workers(redis, keys))
        body = {"model": "m", "stream": True, "messages": []}
        headers = {"x-request-id": "s1"}
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            chunks = response.aiter_bytes()
            assert b"t0" in await anext(chunks)
            started = time.monotonic()
            await cancel(redis, keys, "s1")
            with pytest.raises(httpx.RemoteProtocolError):  # cut, not a clean end
                async for chunk in chunks:
                    assert b"[DONE]" not in chunk
            assert time.monotonic() - started < 2.0
        (entry,) = await until(lambda: completed(redis, keys))
        assert (entry["request_id"], entry["outcome"]) == ("s1", "cancelled")
        assert upstream.closed == ["stream"]
        assert await redis.hgetall(keys.active("cx-1")) == {}


async def test_a_cancelled_request_waiting_on_its_upstream_gets_499_within_2_s(
    app_env: dict[str, str], redis: aioredis.Redis, keys: Keys
) -> None:
    upstream = Upstream()
    async with running(app_with(upstream), "app") as (url, _), httpx.AsyncClient() as client:
        await until(lambda: workers(redis, keys))
        call = asyncio.create_task(
            client.post(f"{url}/v1/messages", json={"model": "m"}, headers={"x-request-id": "w1"})
        )

        async def in_flight() -> bool:
            return b"w1" in await redis.hkeys(keys.active("cx-1"))

        await until(in_flight)
        started = time.monotonic()
        await cancel(redis, keys, "w1")
        response = await asyncio.wait_for(call, 5)
        assert time.monotonic() - started < 2.0
        assert response.status_code == 499 and response.json()["error"] == "cancelled"
        (entry,) = await until(lambda: completed(redis, keys))
        assert (entry["outcome"], entry["status"]) == ("cancelled", 499)
        assert upstream.closed == ["whole"]


async def test_an_app_instrumented_without_cancel_says_so(
    app_env: dict[str, str], redis: aioredis.Redis, keys: Keys
) -> None:
    app = vdm_hub.instrument(Starlette(), worker_id="nc-1", cancel=False)
    async with running(app, "app"):
        await until(lambda: workers(redis, keys))
        record = schema.decode_worker_record(await redis.hget(keys.workers, "nc-1"))
        assert record["cancellable"] is False
        channel = keys.cancel("nc-1")
        assert await redis.pubsub_numsub(channel) == [(channel.encode(), 0)]
