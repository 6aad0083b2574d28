"""``HEAD`` of every health endpoint answers like ``GET``, without a body (load balancers and
uptime checkers probe with HEAD; the stream service answered 405)."""

from __future__ import annotations

import httpx
import pytest

from tests.stream_support import running_stream, settings_for, wait_ready
from tests.worker_harness import running_worker, worker_settings
from vdm_hub.dashboard.app import create_app as create_dashboard
from vdm_hub.shared.embedded_redis import free_port
from vdm_hub.shared.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def _same_as_get(client: httpx.AsyncClient, url: str) -> None:
    got, head = await client.get(url), await client.head(url)
    assert head.status_code == got.status_code == 200, (url, head.status_code)
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == str(len(got.content))


async def test_stream_service_health_endpoints_answer_head(redis_url: str, key_prefix: str) -> None:
    async with running_stream(settings_for(redis_url, key_prefix)) as (url, _app):
        await wait_ready(url)
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            await _same_as_get(client, "/healthz")
            await _same_as_get(client, "/readyz")


async def test_worker_health_endpoint_answers_head(redis_url: str, key_prefix: str) -> None:
    settings = worker_settings(redis_url, key_prefix)
    upstream = f"http://127.0.0.1:{free_port()}"  # never called: /_vdm/ is not proxied
    async with (
        running_worker(settings, upstream) as (url, _app),
        httpx.AsyncClient(base_url=url, timeout=5) as client,
    ):
        await _same_as_get(client, "/_vdm/healthz")


def test_dashboard_health_endpoint_answers_head() -> None:
    client = create_dashboard(Settings.from_env({})).server.test_client()
    got, head = client.get("/healthz"), client.head("/healthz")
    assert head.status_code == got.status_code == 200
    assert head.data == b"" and head.headers["content-length"] == str(len(got.data))
