"""``GET /metrics/completed`` on a real Redis: filters, newest first, the cursor, the scan
budget, bad parameters, and access control like every data endpoint."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.stream_support import FakeWorker, running_stream, settings_for
from vdm_hub.services.stream.completed import CompletedQuery, parse_query, search
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0  # epoch s of the first entry written below


def _fields(rid: str, worker: str, model: str, outcome: str, status: int) -> dict[str, str]:
    entry = schema.CompletedEntry(
        request_id=rid, worker_id=worker, model=model, method="POST", path="/v1/x",
        status=status, outcome=outcome, start_time=T0, duration_ms=250.0,
        input_tokens=3, output_tokens=7, bytes_out=99, ttft_ms=40.0,
    )  # fmt: skip
    return dict(zip(schema.COMPLETED_FIELDS, schema.completed_values(entry), strict=True))


async def _fill(redis: aioredis.Redis, keys: Keys, n: int) -> list[str]:
    """``n`` entries one second apart from T0 (stream ids are those times); returns their ids.
    Every 10th is an upstream error on w2, every 7th cancelled, the rest ok on w1."""
    ids = []
    for i in range(n):
        outcome, worker, status = "ok", "w1", 200
        if i % 10 == 0:
            outcome, worker, status = "upstream_error", "w2", 502
        elif i % 7 == 0:
            outcome, status = "cancelled", 499
        fields = _fields(f"req-{i:04d}", worker, f"m{i % 3}", outcome, status)
        entry_id = f"{int((T0 + i) * 1000)}-0"
        await redis.xadd(keys.completed, fields, id=entry_id)  # type: ignore[arg-type]
        ids.append(entry_id)
    return ids


def _rids(answer: dict[str, Any]) -> list[str]:
    return [e["request_id"] for e in answer["entries"]]


async def test_filters_combine_and_entries_come_newest_first(
    redis: aioredis.Redis, keys: Keys
) -> None:
    await _fill(redis, keys, 40)
    everything = await search(redis, keys, CompletedQuery(limit=500))
    assert _rids(everything) == [f"req-{i:04d}" for i in reversed(range(40))]
    assert everything["next"] is None and everything["scanned"] == 40
    entry = everything["entries"][0]
    assert entry["ttft_ms"] == 40.0 and entry["id"] == f"{int((T0 + 39) * 1000)}-0"

    prefix = await search(redis, keys, parse_query({"request_id": "req-001"}))
    assert _rids(prefix) == [f"req-001{i}" for i in reversed(range(10))]
    failed = await search(redis, keys, parse_query({"outcome": "upstream_error"}))
    assert _rids(failed) == ["req-0030", "req-0020", "req-0010", "req-0000"]
    assert {e["worker_id"] for e in failed["entries"]} == {"w2"}
    w1_502 = await search(redis, keys, parse_query({"worker_id": "w1", "status": "502"}))
    assert w1_502["entries"] == []
    combined = parse_query({"model": "m1", "outcome": "cancelled", "worker_id": "w1"})
    assert _rids(await search(redis, keys, combined)) == ["req-0028", "req-0007"]
    # since/until (inclusive) are the times the entries were recorded.
    window = parse_query({"since": str(T0 + 5), "until": str(T0 + 8.5)})
    assert _rids(await search(redis, keys, window)) == [f"req-000{i}" for i in (8, 7, 6, 5)]


async def test_the_cursor_continues_exactly_where_the_last_answer_stopped(
    redis: aioredis.Redis, keys: Keys
) -> None:
    await _fill(redis, keys, 25)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": "10", **({"before": cursor} if cursor else {})}
        answer = await search(redis, keys, parse_query(params))
        seen += _rids(answer)
        pages += 1
        cursor = answer["next"]
        if cursor is None:
            break
    assert seen == [f"req-{i:04d}" for i in reversed(range(25))]
    assert pages == 3  # 10 + 10 + 5: the last page knows the range ended


async def test_the_scan_budget_bounds_the_work_and_hands_back_a_cursor(
    redis: aioredis.Redis, keys: Keys
) -> None:
    ids = await _fill(redis, keys, 60)
    # Only 6 of the 60 match; a budget of 25 entries finds the newest ones it reaches...
    query = parse_query({"outcome": "upstream_error"})
    first = await search(redis, keys, query, budget=25)
    assert first["scanned"] == 25
    assert _rids(first) == ["req-0050", "req-0040"]
    assert first["next"] == ids[60 - 25]  # the oldest entry it examined
    # ...and the cursor resumes below it, with a fresh budget.
    after_first = parse_query({"outcome": "upstream_error", "before": first["next"]})
    second = await search(redis, keys, after_first, budget=25)
    assert _rids(second) == ["req-0030", "req-0020", "req-0010"]
    after_second = parse_query({"outcome": "upstream_error", "before": second["next"]})
    third = await search(redis, keys, after_second, budget=25)
    assert _rids(third) == ["req-0000"] and third["next"] is None


async def test_malformed_entries_are_skipped(redis: aioredis.Redis, keys: Keys) -> None:
    await _fill(redis, keys, 3)
    await redis.xadd(keys.completed, {"request_id": "broken"}, id=f"{int((T0 + 9) * 1000)}-0")
    answer = await search(redis, keys, CompletedQuery())
    assert _rids(answer) == ["req-0002", "req-0001", "req-0000"]
    assert answer["scanned"] == 4


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "-1"}, "status"),
        ({"outcome": "failed"}, "outcome"),
        ({"since": "yesterday"}, "since"),
        ({"until": "nan"}, "until"),
        ({"since": "20", "until": "10"}, "since"),
        ({"before": "17000-x"}, "before"),
        ({"request_id": "r" * 129}, "request_id"),
    ],
)
async def test_bad_parameters_get_a_400_that_names_them(
    redis_url: str, key_prefix: str, params: dict[str, str], name: str
) -> None:
    settings = settings_for(redis_url, key_prefix)
    async with running_stream(settings) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/metrics/completed", params=params)
        assert response.status_code == 400
        body = response.json()
        assert body["error"] == "bad_parameter" and body["parameter"] == name
        assert name in body["message"]


async def test_the_endpoint_finds_a_request_a_worker_finished(
    redis: aioredis.Redis, keys: Keys, redis_url: str, key_prefix: str
) -> None:
    worker = FakeWorker(redis, keys, "w-find")
    await worker.register()
    await worker.start("find-me-1", "other-2", model="gpt-x")
    await worker.end("find-me-1", outcome="error", duration_ms=300)
    await worker.end("other-2")
    token = "t" * 32
    settings = settings_for(redis_url, key_prefix, VDM_AUTH_TOKEN=token)
    async with running_stream(settings) as (url, _app), httpx.AsyncClient(base_url=url) as client:
        # Same access control as every data endpoint.
        assert (await client.get("/metrics/completed")).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        response = await client.get(
            "/metrics/completed",
            params={"request_id": "find", "since": str(time.time() - 60)},
            headers=auth,
        )
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"entries", "next", "scanned"} and body["next"] is None
        (entry,) = body["entries"]
        assert entry["request_id"] == "find-me-1" and entry["worker_id"] == "w-find"
        assert (entry["outcome"], entry["status"], entry["model"]) == ("error", 500, "gpt-x")
