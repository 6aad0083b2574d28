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
            # The dashboard's origin and a Referer fallback pass.
            for origin in ({"origin": DASHBOARD}, {"referer": f"{DASHBOARD}/dashboard/"}):
                r = await c.post(cancel_path("r1"), headers={**cookie, **origin})
                assert r.status_code == 202, (origin, r.text)
            # A bearer token is not sent by browsers on their own: no origin check.
            r = await c.post(
                cancel_path("r1"), headers={**bearer, "origin": "https://evil.example"}
            )
            assert r.status_code == 202
            caps = await c.get("/metrics/capabilities", headers=bearer)
            assert caps.status_code == 200 and caps.json()["cancel_enabled"] is True
            await wait_until(lambda: len(received) == 3, 5, "three cancel messages")
            assert [m["by"] for m in received] == ["session"] * 2 + ["bearer"]
    assert TOKEN not in caplog.text
    assert "cancel refused (cross-origin" in caplog.text


async def test_a_dns_rebinding_page_cannot_cancel(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    """Issue 20, case 7: a page of evil.example, whose name now resolves to the stream
    service, sends Host and Origin both evil.example:PORT; with no token configured there is
    no cookie to check, so only the origin stands between it and the actuator."""
    settings = settings_for(
        redis_url, key_prefix, VDM_CANCEL_ENABLED="true", VDM_CORS_ORIGINS=DASHBOARD
    )
    async with running_stream(settings) as (url, app), httpx.AsyncClient(base_url=url) as c:
        await _stream_with_row(redis, keys, url, app)
        evil = f"evil.example:{url.rsplit(':', 1)[1]}"
        async with listening(redis, keys.cancel("w1")) as received:
            r = await c.post(cancel_path("r1"), headers={"host": evil, "origin": f"http://{evil}"})
            assert r.status_code == 403 and r.json()["error"] == "cross_origin"
            # The dashboard itself still can.
            r = await c.post(cancel_path("r1"), headers={"origin": DASHBOARD})
            assert r.status_code == 202
            await wait_until(lambda: len(received) == 1, 5, "the dashboard's cancel only")


@pytest.mark.parametrize(
    "setting",
    [
        {"VDM_STREAM_PUBLIC_URL": "https://hub.example"},  # both behind one origin
        {"VDM_CORS_ORIGINS": "https://hub.example"},  # the dashboard's origin, listed
    ],
)
async def test_behind_a_proxy_that_rewrites_host_the_dashboard_can_cancel(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str, setting: dict[str, str]
) -> None:
    """nginx's default passes Host as the upstream's name (proxy_set_header Host $proxy_host):
    the service sees Host stream:8090 while the dashboard's page is https://hub.example."""
    settings = settings_for(
        redis_url, key_prefix, VDM_CANCEL_ENABLED="true", VDM_AUTH_TOKEN=TOKEN, **setting
    )
    cookie = f"{auth.SESSION_COOKIE}={auth.mint_session(TOKEN)}"
    proxied = {"host": "stream:8090", "origin": "https://hub.example", "cookie": cookie}
    async with running_stream(settings) as (url, app), httpx.AsyncClient(base_url=url) as c:
        await _stream_with_row(redis, keys, url, app)
        async with listening(redis, keys.cancel("w1")) as received:
            r = await c.post(cancel_path("r1"), headers=proxied)
            assert r.status_code == 202, r.text
            await wait_until(lambda: len(received) == 1, 5, "the cancel message")
            assert received[0]["by"] == "session"


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


async def test_one_id_on_two_workers_is_cancelled_only_where_worker_id_says(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    # A client's retry that landed on another worker: one X-Request-Id, two requests (issue 20).
    settings = settings_for(redis_url, key_prefix, VDM_CANCEL_ENABLED="true")
    w1, w2 = FakeWorker(redis, keys, "w1"), FakeWorker(redis, keys, "w2")
    for worker in (w1, w2):
        await worker.register()
        await worker.start("dup")
    await w1.start("solo")
    async with running_stream(settings) as (url, app), httpx.AsyncClient(base_url=url) as c:
        await wait_ready(url)
        hub = app.state.hub

        def both_held() -> bool:
            return all(w in hub.workers and "dup" in hub.workers[w].rows for w in ("w1", "w2"))

        await wait_until(both_held, 10, "both rows in the hub")
        async with (
            listening(redis, keys.cancel("w1")) as to_w1,
            listening(redis, keys.cancel("w2")) as to_w2,
        ):
            r = await c.post(cancel_path("dup"))
            assert r.status_code == 409, r.text
            body = r.json()
            assert body["error"] == "ambiguous_request" and body["worker_ids"] == ["w1", "w2"]
            assert "worker_id" in body["suggestion"] and body["message"]

            r = await c.post(cancel_path("dup"), params={"worker_id": "w2"})
            assert r.status_code == 202, r.text
            assert r.json() == {"request_id": "dup", "worker_id": "w2", "status": "requested"}
            await wait_until(lambda: to_w2, 5, "the cancel on w2's channel")

            r = await c.post(cancel_path("dup"), params={"worker_id": "w3"})
            assert (r.status_code, r.json()["error"]) == (404, "unknown_request")
            assert "w3" in r.json()["message"]
            r = await c.post(cancel_path("solo"), params={"worker_id": "w2"})
            assert (r.status_code, r.json()["error"]) == (404, "unknown_request")
            r = await c.post(cancel_path("dup"), params={"worker_id": ""})
            assert (r.status_code, r.json()["error"]) == (400, "bad_worker_id")

            # An id that one worker holds works without the parameter, as before.
            r = await c.post(cancel_path("solo"))
            assert r.status_code == 202 and r.json()["worker_id"] == "w1"
            await wait_until(lambda: to_w1, 5, "the cancel on w1's channel")
            assert to_w1 == [{"request_id": "solo", "by": "anonymous"}]
            assert to_w2 == [{"request_id": "dup", "by": "anonymous"}]


async def test_a_worker_that_cannot_stop_its_requests_answers_409_not_cancellable(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    settings = settings_for(redis_url, key_prefix, VDM_CANCEL_ENABLED="true")
    fixed = FakeWorker(redis, keys, "fixed", cancellable=False)
    await fixed.register()
    await fixed.start("r1")
    async with running_stream(settings) as (url, app), httpx.AsyncClient(base_url=url) as c:
        await wait_ready(url)
        hub = app.state.hub
        await wait_until(lambda: "fixed" in hub.workers, 10, "the worker in the hub")
        async with listening(redis, keys.cancel("fixed")) as received:
            for params in ({}, {"worker_id": "fixed"}):
                r = await c.post(cancel_path("r1"), params=params)
                assert r.status_code == 409, r.text
                body = r.json()
                assert (body["error"], body["worker_id"]) == ("not_cancellable", "fixed")
                assert body["message"] and body["suggestion"]
            snapshot = (await c.get("/metrics/active-requests")).json()
            assert [w["cancellable"] for w in snapshot["workers"]] == [False]
        assert received == []  # nothing was sent to a worker that would not act on it
