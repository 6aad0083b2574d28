"""Workers whose clocks are off. Liveness is judged on Redis's clock, so a worker 30 s behind is
neither reaped nor shown stale, and one 30 s ahead, once killed, goes within its TTL (a
deadline of its own clock would have kept it 30 s longer). And what a worker stamps itself is
on Redis's clock too (it measures its offset at each heartbeat), so a worker 90 s behind shows
true durations and counts in the summary's 60 s window.

The offset is injected in the worker process itself: ``time.time`` is shifted before the
worker starts, so everything that reads the wall clock there (its rows' start times, any
deadline it would compute) sees the skewed time, as on a host whose clock is wrong.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest

from tests.procs import Proc, vdm_hub
from vdm_hub.shared.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.system

HEARTBEAT_S = 0.5
TTL_S = 2.0
OFFSET_S = 30.0
FAR_BEHIND_S = 90.0  # more than the summary's 60 s window


def skewed_worker(offset: float, upstream: str, env: dict[str, str]) -> Proc:
    code = (
        "import sys, time\n"
        "_real = time.time\n"
        f"time.time = lambda: _real() + {offset!r}\n"
        "from vdm_hub.services.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [sys.executable, "-c", code, "worker", "--upstream", upstream, "--port", "0"]
    return Proc(args, env=env, name=f"worker {offset:+g}s")


@pytest.fixture
def upstream_url() -> Iterator[str]:
    proc = vdm_hub("demo-upstream", "--port", "0")
    try:
        yield proc.wait_ready(30)
    finally:
        proc.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
        yield c


def _env(redis: EmbeddedRedis, key_prefix: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis.url,
        "VDM_KEY_PREFIX": key_prefix,
        "VDM_WORKER_HEARTBEAT_INTERVAL": str(HEARTBEAT_S),
        "VDM_WORKER_TTL": str(TTL_S),
        "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "0.5",
    }


async def _workers(client: httpx.AsyncClient, stream_url: str) -> dict[str, str]:
    snap = orjson.loads((await client.get(f"{stream_url}/metrics/active-requests")).content)
    return {w["worker_id"]: w["status"] for w in snap["workers"]}


@pytest.mark.timeout(90)
async def test_workers_30s_off_are_neither_reaped_nor_stale_and_a_dead_one_still_goes(
    upstream_url: str, key_prefix: str, client: httpx.AsyncClient
) -> None:
    with EmbeddedRedis() as redis:
        env = _env(redis, key_prefix)
        stream = vdm_hub("stream", "--port", "0", env=env)
        behind = skewed_worker(-OFFSET_S, upstream_url, {**env, "VDM_WORKER_ID": "behind"})
        ahead = skewed_worker(+OFFSET_S, upstream_url, {**env, "VDM_WORKER_ID": "ahead"})
        try:
            stream_url = await asyncio.to_thread(stream.wait_ready, 30)
            behind_url = await asyncio.to_thread(behind.wait_ready, 30)
            await asyncio.to_thread(ahead.wait_ready, 30)
            deadline = time.monotonic() + 15
            while await _workers(client, stream_url) != {"behind": "up", "ahead": "up"}:
                assert time.monotonic() < deadline, await _workers(client, stream_url)
                await asyncio.sleep(0.05)

            # A request held on the worker that is behind: its row stays in the view.
            held = asyncio.create_task(
                client.post(
                    f"{behind_url}/v1/chat/completions",
                    json={"model": "m", "messages": []},
                    headers={"x-request-id": "held", "x-demo-delay-ms": "6000"},
                    timeout=20,
                )
            )
            # Three TTLs: a worker judged on its own clock (behind by 15 TTLs) would have been
            # reaped at once, and shown stale before that.
            watch_until = time.monotonic() + 3 * TTL_S
            saw_row = False
            while time.monotonic() < watch_until:
                seen = await _workers(client, stream_url)
                assert seen == {"behind": "up", "ahead": "up"}, seen
                snap = orjson.loads(
                    (await client.get(f"{stream_url}/metrics/active-requests")).content
                )
                saw_row |= any(r["request_id"] == "held" for r in snap["active_requests"])
                await asyncio.sleep(0.1)
            assert saw_row, "the held request's row never showed"
            assert (await held).status_code == 200

            # The worker that is ahead dies: it goes within its TTL on Redis's clock.
            ahead.kill()
            killed_at = time.monotonic()
            while "ahead" in await _workers(client, stream_url):
                assert time.monotonic() - killed_at < TTL_S + 5, "the dead worker was kept"
                await asyncio.sleep(0.05)
            gone = time.monotonic() - killed_at
            print(f"[clock] worker 30 s ahead reaped {gone:.2f}s after SIGKILL (TTL {TTL_S}s)")
            assert await _workers(client, stream_url) == {"behind": "up"}
            assert "reaped" not in behind.output
        finally:
            for proc in (ahead, behind, stream):
                proc.stop(timeout=5)


@pytest.mark.timeout(90)
async def test_a_worker_90s_behind_shows_true_durations_and_counts_in_the_summary(
    upstream_url: str, key_prefix: str, client: httpx.AsyncClient
) -> None:
    with EmbeddedRedis() as redis:
        env = _env(redis, key_prefix)
        stream = vdm_hub("stream", "--port", "0", env=env)
        behind = skewed_worker(-FAR_BEHIND_S, upstream_url, {**env, "VDM_WORKER_ID": "far"})
        try:
            stream_url = await asyncio.to_thread(stream.wait_ready, 30)
            behind_url = await asyncio.to_thread(behind.wait_ready, 30)
            deadline = time.monotonic() + 15
            while await _workers(client, stream_url) != {"far": "up"}:  # registered
                assert time.monotonic() < deadline, await _workers(client, stream_url)
                await asyncio.sleep(0.05)

            async def chat(rid: str, delay_ms: int) -> httpx.Response:
                return await client.post(
                    f"{behind_url}/v1/chat/completions",
                    json={"model": "m", "messages": []},
                    headers={"x-request-id": rid, "x-demo-delay-ms": str(delay_ms)},
                    timeout=20,
                )

            held = asyncio.create_task(chat("held", 4000))
            sent = time.monotonic()
            duration = None
            while duration is None:
                snap = orjson.loads(
                    (await client.get(f"{stream_url}/metrics/active-requests")).content
                )
                rows = [r for r in snap["active_requests"] if r["request_id"] == "held"]
                duration = rows[0]["duration_ms"] if rows else None
                assert time.monotonic() - sent < 4, "the held request's row never showed"
                await asyncio.sleep(0.05)
            # Before: ~90,000 ms, the worker's clock error shown as the request's age.
            assert duration < (time.monotonic() - sent) * 1000 + 1000, duration
            assert (await held).status_code == 200

            quick = [await chat(f"quick-{i}", 100) for i in range(5)]
            assert [r.status_code for r in quick] == [200] * 5
            seen = 0
            deadline = time.monotonic() + 10
            while seen < 6:
                summary = orjson.loads((await client.get(f"{stream_url}/metrics/summary")).content)
                # Before: 0 (every entry ended "90 s ago", outside the 60 s window).
                seen = summary["by_worker"].get("far", {}).get("completed", 0)
                assert time.monotonic() < deadline, summary["by_worker"]
                await asyncio.sleep(0.1)
            assert summary["fleet"]["completed"] == 6
            print(f"[clock] worker {FAR_BEHIND_S:g} s behind: held row showed {duration:.0f} ms")
        finally:
            for proc in (behind, stream):
                proc.stop(timeout=5)
