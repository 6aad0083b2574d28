"""The worker's response side through a real worker, a real Redis and the demo upstream on
real sockets: TTFT is the first token, not the preamble; one X-Request-Id per response; a
WebSocket upgrade is refused cleanly; a stream cut by the shutdown grace ends as `error`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.exceptions import InvalidStatus

from tests.serving import running
from tests.worker_harness import running_worker, worker_settings
from vdm_hub.services.demo.upstream import create_app
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.store import read_worker_state

pytestmark = pytest.mark.integration

FIRST_TOKEN_DELAY_MS = 1500


@pytest.fixture
async def demo() -> AsyncIterator[str]:
    async with running(create_app(latency=0, chunk_delay=0, chunks=3), "demo-upstream") as (
        url,
        _,
    ):
        yield url


async def _until(predicate: Callable[[], Awaitable[object]], timeout: float = 10.0) -> object:
    async with asyncio.timeout(timeout):
        while not (value := await predicate()):
            await asyncio.sleep(0.01)
        return value


async def _completed(redis: aioredis.Redis, keys: Keys) -> list[schema.CompletedEntry]:
    return [schema.decode_completed(i, f) for i, f in await redis.xrange(keys.completed)]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions", "/v1/responses"])
async def test_ttft_through_a_worker_is_the_first_token_not_the_preamble(
    redis: aioredis.Redis, redis_url: str, key_prefix: str, keys: Keys, demo: str, path: str
) -> None:
    """The demo upstream sends its vendor's preamble (message_start/ping, a role-only chunk,
    response.created...) at once and the first token 1.5 s later, as vandamme-proxy and the
    real APIs do: the row shows the stream started (ttfb) long before ttft."""
    settings = worker_settings(redis_url, key_prefix)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-request-id": "ttft-1", "x-demo-first-token-delay-ms": str(FIRST_TOKEN_DELAY_MS)}
    async with running_worker(settings, demo) as (url, _), httpx.AsyncClient() as client:
        call = asyncio.create_task(client.post(f"{url}{path}", json=body, headers=headers))

        async def streaming_without_a_token() -> schema.Row | None:
            row = (await read_worker_state(redis, keys, "w1")).rows.get("ttft-1")
            return row if row is not None and row["phase"] == "streaming" else None

        row = await _until(streaming_without_a_token)
        assert isinstance(row, dict)
        assert row["ttfb_ms"] is not None and row["ttft_ms"] is None
        assert row["chunks_out"] and row["last_output_at"] is not None
        response = await call
        assert response.status_code == 200
        (entry,) = await _until(lambda: _completed(redis, keys))  # type: ignore[misc]
    assert entry["ttft_ms"] is not None and entry["ttfb_ms"] is not None
    assert entry["ttft_ms"] >= FIRST_TOKEN_DELAY_MS > entry["ttfb_ms"]
    assert entry["outcome"] == "ok" and entry["output_tokens"] == 3


async def test_the_client_gets_one_x_request_id_and_the_upstreams_under_its_own_name(
    redis_url: str, key_prefix: str, demo: str
) -> None:
    settings = worker_settings(redis_url, key_prefix)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with running_worker(settings, demo) as (url, _), httpx.AsyncClient() as client:
        openai = await client.post(
            f"{url}/v1/chat/completions", json=body, headers={"x-request-id": "client-7"}
        )
        anthropic = await client.post(f"{url}/v1/messages", json=body)
    # OpenAI's upstream sends its own x-request-id: moved aside, the client's id is the one.
    assert openai.headers.get_list("x-request-id") == ["client-7"]
    (upstream_id,) = openai.headers.get_list("x-upstream-request-id")
    assert upstream_id.startswith("req_")
    # Anthropic's is `request-id`, no clash: it passes as it is; the hub's id is fresh.
    (ours,) = anthropic.headers.get_list("x-request-id")
    assert len(ours) == 32 and "x-upstream-request-id" not in anthropic.headers
    assert anthropic.headers["request-id"].startswith("req_")


async def test_a_websocket_upgrade_is_refused_with_403_and_one_info_line(
    redis: aioredis.Redis,
    redis_url: str,
    key_prefix: str,
    keys: Keys,
    demo: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = worker_settings(redis_url, key_prefix)
    caplog.set_level(logging.DEBUG)
    async with running_worker(settings, demo) as (url, app):
        ws_url = url.replace("http://", "ws://") + "/v1/realtime?api_key=sk-secret"
        auth = {"authorization": "Bearer sk-secret"}
        for _ in range(2):
            caplog.clear()
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(ws_url, additional_headers=auth, open_timeout=5):
                    pass
            response = refused.value.response
            assert response.status_code == 403
            assert orjson.loads(response.body)["error"] == "websocket_not_supported"
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
            assert lines == ["refused a WebSocket upgrade to '/v1/realtime': the worker proxies"
                             " HTTP only"]  # fmt: skip
            # Neither the query string nor a header, at any level (the client's own log aside).
            worker_side = [r for r in caplog.records if not r.name.startswith("websockets.")]
            assert not [r for r in worker_side if "sk-secret" in r.getMessage()]
        # Not proxied, not recorded.
        assert app.publisher is not None and app.publisher.active == {}
        assert await redis.xlen(keys.completed) == 0


async def test_a_stream_cut_by_the_shutdown_grace_ends_as_error(
    redis: aioredis.Redis, redis_url: str, key_prefix: str, keys: Keys, demo: str
) -> None:
    """`error` covers what the worker breaks off itself: here the graceful shutdown (1 s in
    tests) runs out while a stream is still going. The client sees its stream cut, never a
    clean end; the entry keeps the status that was sent."""
    settings = worker_settings(redis_url, key_prefix)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-request-id": "cut-1", "x-demo-chunks": "1000", "x-demo-chunk-delay-ms": "200"}
    async with contextlib.AsyncExitStack() as worker, httpx.AsyncClient() as client:
        url, _ = await worker.enter_async_context(running_worker(settings, demo))
        async with client.stream("POST", f"{url}/v1/messages", json=body, headers=headers) as r:
            chunks = r.aiter_raw()
            async with asyncio.timeout(5):
                while b"content_block_delta" not in await anext(chunks):
                    pass
            # The worker shuts down with the stream in flight (its client stays).
            shutdown = asyncio.create_task(worker.aclose())
            with pytest.raises(httpx.RemoteProtocolError):
                async with asyncio.timeout(10):
                    async for _ in chunks:
                        pass
            await asyncio.wait_for(shutdown, 10)
    (entry,) = await _completed(redis, keys)
    assert (entry["request_id"], entry["status"], entry["outcome"]) == ("cut-1", 200, "error")
    assert entry["ttft_ms"] is not None
