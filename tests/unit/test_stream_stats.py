"""Rolling statistics: percentiles, grouping by worker and model, error rate, series, recent."""

from __future__ import annotations

import redis.asyncio as aioredis

from vdm_hub.services.stream.stats import RollingStats, percentile
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys


def _entry(
    rid: str, worker: str, model: str | None, ms: float, outcome: str, end: float
) -> schema.CompletedEntry:
    return schema.CompletedEntry(
        request_id=rid, worker_id=worker, model=model, method="POST", path="/v1/x",
        status=200, outcome=outcome, start_time=end - ms / 1000, duration_ms=ms,
        input_tokens=None, output_tokens=None, bytes_out=0,
    )  # fmt: skip


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.5) is None


async def test_summary_groups_by_worker_and_model(fake_redis: aioredis.Redis) -> None:
    flight = {"fleet": 2, "by_worker": {"w1": 2}, "by_model": {"m1": 2}}
    stats = RollingStats(fake_redis, Keys("u"), step=1.0, in_flight=lambda: flight)
    now = 10_000.0
    stats.add(_entry("a", "w1", "m1", 100, "ok", now - 5), now)
    stats.add(_entry("b", "w1", "m1", 200, "error", now - 4), now)
    stats.add(_entry("c", "w2", None, 300, "client_closed", now - 3), now)
    stats.add(_entry("old", "w2", "m1", 999, "ok", now - 120), now)  # outside the window
    s = stats.tick(now)
    assert s["window_s"] == 60 and s["timestamp"] == now
    fleet = s["fleet"]
    assert fleet["completed"] == 3 and fleet["in_flight"] == 2
    assert fleet["error_rate"] == round(2 / 3, 4)
    assert (fleet["p50_ms"], fleet["p99_ms"]) == (200.0, 300.0)
    assert fleet["requests_per_s"] == round(3 / 60, 4)
    assert s["by_worker"]["w1"]["completed"] == 2 and s["by_worker"]["w1"]["in_flight"] == 2
    assert s["by_worker"]["w2"]["error_rate"] == 1.0
    assert s["by_model"]["unknown"]["completed"] == 1
    assert s["by_model"]["m1"]["p95_ms"] == 200.0
    assert [e["request_id"] for e in s["recent"]] == ["old", "c", "b", "a"]
    points = {p["t"]: p for p in s["series"]}
    assert points[now - 4]["requests_per_s"] == 1.0  # bucket [now-5, now-4)
    assert points[now - 3]["error_rate"] == 1.0
    assert set(s["series"][0]) == {
        "t", "in_flight", "requests_per_s", "error_rate", "p50_ms", "p95_ms", "p99_ms",
        "ttft_p50_ms", "ttft_p95_ms",
    }  # fmt: skip


async def test_rebuild_from_the_stream_and_bad_entries_are_counted(
    fake_redis: aioredis.Redis,
) -> None:
    keys = Keys("u2")
    bad: list[object] = []
    import time

    now = time.time()
    for i in range(3):
        fields = dict(zip(schema.COMPLETED_FIELDS, schema.completed_values(
            _entry(f"r{i}", "w", "m", 10.0 * (i + 1), "ok", now - 1)), strict=True))  # fmt: skip
        await fake_redis.xadd(keys.completed, fields)  # type: ignore[arg-type]
    await fake_redis.xadd(keys.completed, {"request_id": "x"})
    stats = RollingStats(fake_redis, keys, on_malformed=bad.append)
    await stats.rebuild()
    assert len(bad) == 1
    s = stats.summary(time.time())
    assert s["fleet"]["completed"] == 3 and s["fleet"]["p50_ms"] == 20.0
    assert [e["request_id"] for e in s["recent"]] == ["r2", "r1", "r0"]
