"""The cancel action and capabilities of the stream service: a real Uvicorn server on real
Redis, with a subscriber standing in for the owning worker's cancel listener."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.stream_support import FakeWorker, running_stream, settings_for, wait_ready, wait_until
from vdm_hub.shared import auth
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOKEN = "cancel-test-token-8d1e5b7c2a"
DASHBOARD = "http://localhost:8050"


def cancel_path(request_id: str) -> str:
    return f"/metrics/active-requests/{request_id}/cancel"


@contextlib.asynccontextmanager
async def listening(redis: aioredis.Redis, channel: str) -> AsyncIterator[list[dict[str, Any]]]:
    """What a worker's cancel listener does: subscribe (acknowledged), collect messages."""
    received: list[dict[str, Any]] = []
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(channel)
        async with asyncio.timeout(5):
            while (await pubsub.get_message(timeout=1.0) or {}).get("type") != "subscribe":
                pass

        async def read() -> None:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    received.append(orjson.loads(msg["data"]))

        task = asyncio.create_task(read())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _stream_with_row(
    redis: aioredis.Redis, keys: Keys, url: str, app: Any, rid: str = "r1"
) -> FakeWorker:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start(rid)
    await wait_ready(url)
    hub = app.state.hub
    await wait_until(lambda: "w1" in hub.workers and rid in hub.workers["w1"].rows, 10, "row seen")
    return worker


async def test_cancel_is_refused_unless_enabled_and_capabilities_say_so(
    redis_url: str, key_prefix: str
) -> None:
    settings = settings_for(redis_url, key_prefix, VDM_STUCK_AFTER="42", VDM_STALL_AFTER="7")
    async with running_stream(settings) as (url, _app), httpx.AsyncClient(base_url=url) as c:
        r = await c.post(cancel_path("r1"))
        assert r.status_code == 403
        body = r.json()
        assert body["error"] == "cancel_disabled" and body["message"]
        assert "VDM_CANCEL_ENABLED" in body["suggestion"]
        caps = (await c.get("/metrics/capabilities")).json()
        assert caps == {
            "cancel_enabled": False,
            "stuck_after_s": 42.0,
            "stall_after_s": 7.0,
            "delta": True,
        }


async def test_cancel_reaches_the_owning_worker_and_answers_404_400_503_honestly(
    redis: aioredis.Redis,
    keys: Keys,
    redis_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="vdm.stream.cancel")
    settings = settings_for(redis_url, key_prefix, VDM_CANCEL_ENABLED="true")
    async with running_stream(settings) as (url, app), httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/metrics/capabilities")).json()["cancel_enabled"] is True
        await _stream_with_row(redis, keys, url, app)

        # Nobody listens on the worker's channel (gone, or a worker without cancel support).
        r = await c.post(cancel_path("r1"))
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "worker_unreachable" and r.json()["worker_id"] == "w1"

        async with listening(redis, keys.cancel("w1")) as received:
            r = await c.post(cancel_path("r1"))
            assert r.status_code == 202, r.text
            assert r.json() == {"request_id": "r1", "worker_id": "w1", "status": "requested"}
            await wait_until(lambda: received, 5, "the cancel message")
            assert received == [{"request_id": "r1", "by": "anonymous"}]

            # Without a token, a page on another origin cannot drive it through a browser.
            r = await c.post(cancel_path("r1"), headers={"origin": "https://evil.example"})
            assert r.status_code == 403 and r.json()["error"] == "cross_origin"
            assert len(received) == 1

        r = await c.post(cancel_path("nope"))
        assert r.status_code == 404 and r.json()["error"] == "unknown_request"
        for garbage in ("a%20b", "x" * 129, "%00", "tab%09"):
            r = await c.post(cancel_path(garbage))
            assert r.status_code == 400, garbage
            assert r.json()["error"] == "bad_request_id" and r.json()["message"]
        assert (await c.get(cancel_path("r1"))).status_code == 405
    assert "cancel requested: request 'r1' on worker w1 by anonymous" in caplog.text
    assert "no worker listening" in caplog.text


async def test_cancel_needs_the_token_and_a_same_origin_page_for_cookies(
    redis: aioredis.Redis,
    keys: Keys,
    redis_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="vdm.stream.cancel")
    settings = settings_for(
        redis_url,
        key_prefix,
        VDM_CANCEL_ENABLED="true",
        VDM_AUTH_TOKEN=TOKEN,
        VDM_CORS_ORIGINS=DASHBOARD,
    )
    cookie = {"cookie": f"{auth.SESSION_COOKIE}={auth.mint_session(TOKEN)}"}
    bearer = {"authorization": f"Bearer {TOKEN}"}
    async with running_stream(settings) as (url, app), httpx.AsyncClient(base_url=url) as c:
        await _stream_with_row(redis, keys, url, app)
        assert (await c.post(cancel_path("r1"))).status_code == 401
        assert (await c.get("/metrics/capabilities")).status_code == 401
        wrong = {"authorization": "Bearer not-the-token"}
        assert (await c.post(cancel_path("r1"), headers=wrong)).status_code == 401

        # The browser's preflight for the dashboard's POST is answered by CORS.
        pre = await c.options(
            cancel_path("r1"),
            headers={"origin": DASHBOARD, "access-control-request-method": "POST"},
        )
        assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]

        async with listening(redis, keys.cancel("w1")) as received:
            # A cookie from a page of another site (CSRF), or with no origin at all: refused.
            for origin in ({"origin": "https://evil.example"}, {}, {"origin": "null"}):
                r = await c.post(cancel_path("r1"), headers={**cookie, **origin})
                assert r.status_code == 403, origin
                assert r.json()["error"] == "cross_origin"
            r = await c.post(
                cancel_path("r1"), headers={**cookie, "referer": "https://evil.example/x"}
            )
            assert r.status_code == 403
            # The dashboard's origin, the service's own origin, and a Referer fallback pass.
            for origin in (
                {"origin": DASHBOARD},
                {"origin": url},
                {"referer": f"{DASHBOARD}/dashboard/"},
            ):
                r = await c.post(cancel_path("r1"), headers={**cookie, **origin})
                assert r.status_code == 202, (origin, r.text)
            # A bearer token is not sent by browsers on their own: no origin check.
            r = await c.post(
                cancel_path("r1"), headers={**bearer, "origin": "https://evil.example"}
            )
            assert r.status_code == 202
            caps = await c.get("/metrics/capabilities", headers=bearer)
            assert caps.status_code == 200 and caps.json()["cancel_enabled"] is True
            await wait_until(lambda: len(received) == 4, 5, "four cancel messages")
            assert [m["by"] for m in received] == ["session"] * 3 + ["bearer"]
    assert TOKEN not in caplog.text
    assert "cancel refused (cross-origin" in caplog.text


async def test_cancel_with_redis_hung_answers_503_within_a_bound(key_prefix: str) -> None:
    with EmbeddedRedis() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            keys = Keys(key_prefix)
            settings = settings_for(server.url, key_prefix, VDM_CANCEL_ENABLED="true")
            async with running_stream(settings) as (url, app):
                await _stream_with_row(client, keys, url, app)
                server.pause()  # SIGSTOP: connections stay open, nothing answers
                try:
                    async with httpx.AsyncClient(base_url=url, timeout=15) as c:
                        started = time.monotonic()
                        r = await c.post(cancel_path("r1"))
                        took = time.monotonic() - started
                    assert r.status_code == 503, r.text
                    assert r.json()["error"] == "redis_unavailable" and r.json()["message"]
                    assert took < 10, took
                finally:
                    server.resume()
        finally:
            await client.aclose()
