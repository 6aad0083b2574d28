"""A background loop of the stream service that crashes on a bug is logged, makes /readyz say
not ready, and is restarted: the view keeps following Redis afterwards."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.stream_support import FakeWorker, running_stream, settings_for, wait_ready, wait_until
from vdm_hub.shared.keys import Keys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_a_crashed_hub_reader_is_reported_and_restarted(
    redis: aioredis.Redis,
    keys: Keys,
    redis_url: str,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    async with running_stream(settings_for(redis_url, key_prefix)) as (url, app):
        await wait_ready(url)
        hub, supervisor = app.state.hub, app.state.supervisor
        supervisor.settle = 0.5  # applies to the restarted run
        real = hub.handle_message
        seen: list[str] = []

        async def broken_once(data: Any) -> None:
            if not seen:
                seen.append("crash")
                raise ValueError("injected bug in the reader")
            await real(data)

        hub.handle_message = broken_once
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            await worker.start("r1")  # the batch that hits the bug

            async def reported() -> bool:
                r = await client.get("/readyz")
                return r.status_code == 503 and "Hub.run" in r.json()["reason"]

            await wait_until(reported, 10, "/readyz to report the crashed reader")
            # Restarted: resynced from Redis (r1 is there) and ready again.
            await wait_until(
                lambda: "w1" in hub.workers and "r1" in hub.workers["w1"].rows, 15, "resync"
            )
            await wait_ready(url, timeout=15)
            await worker.start("r2")  # and it applies new batches again
            await wait_until(lambda: "r2" in hub.workers["w1"].rows, 10, "r2 applied")
        assert supervisor.jobs[0].restarts == 1
    assert "background task Hub.run crashed" in caplog.text
    assert "injected bug in the reader" in caplog.text
