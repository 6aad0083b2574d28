"""Access control and CORS of the stream service: a real Uvicorn server on real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from tests.stream_support import (
    FakeWorker,
    SSEReader,
    request_ids,
    running_stream,
    settings_for,
    wait_ready,
)
from vdm_hub.shared import auth
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.integration

TOKEN = "integration-token-4f7c2a9e1b"
ORIGIN = "http://localhost:8050"
STREAM = "/metrics/active-requests/stream"
GUARDED = ["/metrics", "/metrics/active-requests", "/metrics/summary", STREAM]


@pytest.fixture
async def stream_url(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> AsyncIterator[str]:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start("r1")
    settings = settings_for(
        redis_url,
        key_prefix,
        VDM_AUTH_TOKEN=TOKEN,
        VDM_CORS_ORIGINS=f"{ORIGIN},https://ops.example",
    )
    async with running_stream(settings) as (url, _app):
        await wait_ready(url)  # /readyz answers without credentials: health probes need it
        yield url


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_every_data_endpoint_needs_the_token(stream_url: str) -> None:
    async with httpx.AsyncClient(base_url=stream_url, timeout=5) as client:
        for path in GUARDED:
            for headers in ({}, bearer("wrong-token"), {"authorization": f"Basic {TOKEN}"}):
                r = await client.get(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"] == "unauthorized"
                assert r.json()["message"]
                assert r.headers["www-authenticate"].startswith('Bearer realm="vdm-hub"')
        for path in GUARDED[:-1]:
            r = await client.get(path, headers=bearer())
            assert r.status_code == 200, path
        assert "vdm_sse_clients" in (await client.get("/metrics", headers=bearer())).text
        snapshot = (await client.get("/metrics/active-requests", headers=bearer())).json()
        assert request_ids(snapshot) == {"r1"}
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


async def test_sse_stream_opens_with_bearer(stream_url: str) -> None:
    client = httpx.AsyncClient(headers=bearer(), timeout=httpx.Timeout(10, read=30))
    async with client, SSEReader(stream_url + STREAM, client) as reader:
        update = await reader.wait_update(lambda d: True)
        assert request_ids(update) == {"r1"}


async def test_sse_stream_opens_with_the_session_cookie_and_cors_credentials(
    stream_url: str,
) -> None:
    # What the dashboard's EventSource({withCredentials: true}) sends from another origin.
    client = httpx.AsyncClient(
        headers={"origin": ORIGIN, "cookie": f"vdm_session={auth.mint_session(TOKEN)}"},
        timeout=httpx.Timeout(10, read=30),
    )
    async with client, SSEReader(stream_url + STREAM, client) as reader:
        update = await reader.wait_update(lambda d: True)
        assert request_ids(update) == {"r1"}
        assert reader.response is not None
        assert reader.response.status_code == 200
        assert reader.response.headers["access-control-allow-origin"] == ORIGIN
        assert reader.response.headers["access-control-allow-credentials"] == "true"


async def test_sse_stream_refuses_bad_sessions_with_401_readable_cross_origin(
    stream_url: str,
) -> None:
    expired = auth.mint_session(TOKEN, lifetime=5, now=1_000)  # expired long ago
    async with httpx.AsyncClient(base_url=stream_url, timeout=5) as client:
        for value in (expired, auth.mint_session("not-the-token-at-all"), TOKEN):
            headers = {"origin": ORIGIN, "cookie": f"vdm_session={value}"}
            r = await client.get(STREAM, headers=headers)
            assert r.status_code == 401
            assert "log in" in r.json()["message"]
            # The browser may read the 401 (the client can tell "log in" from "down").
            assert r.headers["access-control-allow-origin"] == ORIGIN


async def test_cors_only_for_listed_origins_and_never_a_wildcard(stream_url: str) -> None:
    async with httpx.AsyncClient(base_url=stream_url, timeout=5) as client:
        for origin in (ORIGIN, "https://ops.example"):
            r = await client.get("/metrics/active-requests", headers={"origin": origin, **bearer()})
            assert r.headers["access-control-allow-origin"] == origin
            assert r.headers["access-control-allow-credentials"] == "true"
            assert "origin" in r.headers["vary"].lower()
        for origin in ("http://evil.example", "http://localhost:8051", "null"):
            r = await client.get("/metrics/active-requests", headers={"origin": origin, **bearer()})
            assert r.status_code == 200  # CORS does not hide data from scripts, only from pages
            assert "access-control-allow-origin" not in r.headers
            r = await client.options(
                STREAM, headers={"origin": origin, "access-control-request-method": "GET"}
            )
            assert r.status_code == 400
            assert "access-control-allow-origin" not in r.headers


async def test_cors_preflight_is_answered_without_credentials(stream_url: str) -> None:
    async with httpx.AsyncClient(base_url=stream_url, timeout=5) as client:
        r = await client.options(
            STREAM,
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "GET",
                "access-control-request-headers": "authorization, last-event-id",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert r.headers["access-control-allow-credentials"] == "true"
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "last-event-id" in allowed


async def test_without_a_token_the_endpoints_stay_open(redis_url: str, key_prefix: str) -> None:
    settings = settings_for(redis_url, key_prefix, VDM_CORS_ORIGINS="*")
    async with running_stream(settings) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/metrics/active-requests", headers={"origin": ORIGIN})
        assert r.status_code == 200
        # '*' is only allowed without a token, and then never with credentials.
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers


async def test_an_any_host_entry_allows_that_port_under_any_name(
    redis_url: str, key_prefix: str
) -> None:
    """``http://*:8050`` (what ``vdm-hub up --host 0.0.0.0`` lists): a dashboard on port 8050
    however the browser names the machine; on the fast SSE path too."""
    settings = settings_for(redis_url, key_prefix, VDM_CORS_ORIGINS="http://*:8050")
    async with running_stream(settings) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        for origin in ("http://remote.test:8050", "http://10.1.2.3:8050", "http://[fd00::1]:8050"):
            r = await client.get("/metrics/active-requests", headers={"origin": origin})
            assert r.headers["access-control-allow-origin"] == origin
            async with client.stream("GET", STREAM, headers={"origin": origin}) as s:
                assert s.headers["access-control-allow-origin"] == origin
        for origin in ("http://remote.test:8051", "https://remote.test:8050", "http://x:80500"):
            r = await client.get("/metrics/active-requests", headers={"origin": origin})
            assert "access-control-allow-origin" not in r.headers, origin
