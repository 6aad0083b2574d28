"""Every line of the SSE contract (README, "The stream service") on a real server and Redis."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.stream_support import (
    FakeWorker,
    SSEReader,
    request_ids,
    running_stream,
    settings_for,
    wait_ready,
    wait_until,
)
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.integration

STREAM = "/metrics/active-requests/stream"


async def test_first_update_at_once_with_headers_id_and_retry(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start("r1")
    # A long interval: the first update must not wait for it.
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_INTERVAL="30")
    async with running_stream(settings) as (url, _app):
        await wait_ready(url)
        started = time.monotonic()
        async with SSEReader(url + STREAM) as reader:
            first = reader.events[0][1]
            assert reader.events[0][0] - started < 2.0
            assert reader.response is not None
            headers = reader.response.headers
            assert headers["content-type"].startswith("text/event-stream")
            assert headers["cache-control"] == "no-cache"
            assert headers["x-accel-buffering"] == "no"
            assert first.event == "update"
            assert first.retry == 2000
            data = orjson.loads(first.data)
            assert first.id == str(data["version"])
            assert data["disabled"] is False
            assert request_ids(data) == {"r1"}
            (row,) = data["active_requests"]
            assert row["worker_id"] == "w1" and row["duration_ms"] >= 0
            assert set(row) >= {
                "request_id", "worker_id", "method", "path", "model", "provider",
                "is_streaming", "start_time", "duration_ms", "phase", "bytes_out",
                "input_tokens", "output_tokens", "key",
            }  # fmt: skip
            (w,) = data["workers"]
            assert set(w) == {
                "worker_id", "host", "pid", "started_at", "last_seen", "status", "active",
                "cancellable",
            }  # fmt: skip
            assert (w["worker_id"], w["host"], w["pid"], w["status"], w["active"]) == (
                "w1", "fakehost", 4242, "up", 1
            )  # fmt: skip
            assert w["cancellable"] is True  # a record without the field: an older worker


async def test_change_goes_out_immediately_not_at_the_interval(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_INTERVAL="30")
    async with running_stream(settings) as (url, _app), SSEReader(url + STREAM) as reader:
        await reader.wait_update(lambda d: len(d["workers"]) == 1)
        before = reader.updates()[-1]["version"]
        await worker.start("r1", "r2")
        update = await reader.wait_update(lambda d: request_ids(d) == {"r1", "r2"}, timeout=3)
        assert update["version"] > before
        # rows newest first
        starts = [r["start_time"] for r in update["active_requests"]]
        assert starts == sorted(starts, reverse=True)
        await worker.end("r1")
        await reader.wait_update(lambda d: request_ids(d) == {"r2"}, timeout=3)


async def test_periodic_update_and_heartbeat_without_changes(
    redis_url: str, key_prefix: str
) -> None:
    settings = settings_for(redis_url, key_prefix)  # interval 0.3 s, heartbeat 0.2 s
    async with running_stream(settings) as (url, _app), httpx.AsyncClient(timeout=10) as client:
        await wait_ready(url)
        lines: list[str] = []
        async with asyncio.timeout(10), client.stream("GET", url + STREAM) as response:
            async for line in response.aiter_lines():
                lines.append(line)
                if lines.count("event: update") >= 3 and lines.count(": heartbeat") >= 2:
                    break
        ids = [line for line in lines if line.startswith("id: ")]
        # Nothing changed: the same version goes out again, at least every interval.
        assert len(ids) >= 3 and len(set(ids)) == 1
        assert lines.count("event: stats") >= 1


async def test_disabled_metrics_send_one_disabled_event_and_end(
    redis_url: str, key_prefix: str
) -> None:
    settings = settings_for(redis_url, key_prefix, LOG_REQUEST_METRICS="false")
    async with running_stream(settings) as (url, _app), SSEReader(url + STREAM) as reader:
        await wait_until(lambda: reader.ended, 5, "stream end")
        assert [e.event for _, e in reader.events] == ["disabled"]
        body = orjson.loads(reader.events[0][1].data)
        assert body["disabled"] is True and "LOG_REQUEST_METRICS" in body["suggestion"]
        assert body["message"]
        async with httpx.AsyncClient(base_url=url) as client:
            snap = (await client.get("/metrics/active-requests")).json()
            assert snap["disabled"] is True


async def test_sse_disabled_answers_503_naming_the_variable(
    redis_url: str, key_prefix: str
) -> None:
    settings = settings_for(redis_url, key_prefix, VDM_ACTIVE_REQUESTS_SSE_ENABLED="false")
    async with running_stream(settings) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        response = await client.get(STREAM)
        assert response.status_code == 503
        body = response.json()
        assert body["error"] == "sse_disabled"
        assert "VDM_ACTIVE_REQUESTS_SSE_ENABLED" in body["suggestion"] + body["message"]
        # the polling fallback still works
        assert (await client.get("/metrics/active-requests")).status_code == 200


async def test_client_cap_answers_503_with_retry_after(redis_url: str, key_prefix: str) -> None:
    settings = settings_for(redis_url, key_prefix, VDM_MAX_SSE_CLIENTS="2")
    async with (
        running_stream(settings) as (url, app),
        SSEReader(url + STREAM),
        SSEReader(url + STREAM),
        httpx.AsyncClient(base_url=url) as client,
    ):
        assert app.state.broadcaster.clients == 2
        response = await client.get(STREAM)
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
        assert "VDM_MAX_SSE_CLIENTS" in response.json()["message"]


async def test_json_snapshot_summary_and_prometheus(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w1")
    await worker.register()
    await worker.start("a", "b", model="gpt-x")
    await worker.start("c", model="claude")
    await worker.end("b", outcome="error", duration_ms=300)
    settings = settings_for(redis_url, key_prefix)
    async with running_stream(settings) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/healthz")).status_code == 200
        await wait_ready(url)
        snap = (await client.get("/metrics/active-requests")).json()
        assert request_ids(snap) == {"a", "c"} and snap["disabled"] is False
        assert set(snap) == {
            "disabled", "active_requests", "workers", "timestamp", "version",
            "sync", "sync_since", "sync_reason",
        }  # fmt: skip
        # Ready means in sync: the view is vouched for since the moment it got there.
        assert snap["sync"] == "ok" and snap["sync_reason"] is None
        assert 0 < snap["sync_since"] <= snap["timestamp"]

        # rebuilt from P:completed on start, so the entry written before start counts
        summary = (await client.get("/metrics/summary")).json()
        # The fleet (its one worker) is younger than the 60 s window: rates are over its age.
        assert 0 < summary["window_s"] < 60
        seconds = summary["window_s"]
        assert summary["fleet"]["requests_per_s"] == pytest.approx(1 / seconds, rel=0.01)
        assert summary["fleet"]["completed"] == 1
        assert summary["fleet"]["error_rate"] == 1.0
        assert summary["fleet"]["p50_ms"] == 300.0
        assert summary["fleet"]["in_flight"] == 2
        assert summary["by_model"]["gpt-x"]["in_flight"] == 1
        assert summary["by_worker"]["w1"]["completed"] == 1
        assert [e["request_id"] for e in summary["recent"]] == ["b"]

        await worker.end("a", duration_ms=50)

        async def counted() -> bool:
            text = (await client.get("/metrics")).text
            return 'vdm_requests_total{model="gpt-x",outcome="ok",worker="w1"} 1.0' in text

        await wait_until(counted, 5, "live completed entry on /metrics")
        text = (await client.get("/metrics")).text
        for name in (
            'vdm_requests_in_flight{model="claude",worker="w1"} 1.0',
            "vdm_request_duration_seconds_bucket",
            'vdm_workers{status="up"} 1.0',
            "vdm_sse_clients 0.0",
            "vdm_hub_lag_seconds",
            "vdm_messages_malformed_total 0.0",
            "vdm_worker_events_dropped_total",
        ):
            assert name in text, name


async def test_cors_allows_the_configured_origin_only(redis_url: str, key_prefix: str) -> None:
    settings = settings_for(redis_url, key_prefix, VDM_CORS_ORIGINS="http://dash.example:8050")
    async with running_stream(settings) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        good = await client.get("/metrics/summary", headers={"Origin": "http://dash.example:8050"})
        assert good.headers["access-control-allow-origin"] == "http://dash.example:8050"
        bad = await client.get("/metrics/summary", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in bad.headers
