"""Rolling statistics: percentiles, grouping by worker and model, error rate, series, recent."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from vdm_hub.services.stream import stats as stats_module
from vdm_hub.services.stream.stats import OTHER, RollingStats, percentile
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


def _fields(entry: schema.CompletedEntry) -> dict[bytes, bytes]:
    """As the reader gets it from redis-py."""
    values = schema.completed_values(entry)
    return {k.encode(): v.encode() for k, v in zip(schema.COMPLETED_FIELDS, values, strict=True)}


def _add(stats: RollingStats, now: float, *entries: schema.CompletedEntry) -> None:
    stats.ingest([(f"{i}-0".encode(), _fields(e)) for i, e in enumerate(entries)], now)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.5) is None


async def test_summary_groups_by_worker_and_model(fake_redis: aioredis.Redis) -> None:
    flight = {"fleet": 2, "by_worker": {"w1": 2}, "by_model": {"m1": 2}}
    stats = RollingStats(fake_redis, Keys("u"), step=1.0, in_flight=lambda: flight, started=0.0)
    now = 10_000.0
    _add(
        stats,
        now,
        _entry("a", "w1", "m1", 100, "ok", now - 5),
        _entry("b", "w1", "m1", 200, "error", now - 4),
        _entry("c", "w2", None, 300, "client_closed", now - 3),
        _entry("old", "w2", "m1", 999, "ok", now - 120),  # outside the window
    )
    s = stats.tick(now)
    assert s["window_s"] == 60 and s["timestamp"] == now
    fleet = s["fleet"]
    assert fleet["completed"] == 3 and fleet["in_flight"] == 2
    # A client that went away is not an error: 1 error of 3 finished.
    assert fleet["error_rate"] == round(1 / 3, 4)
    assert (fleet["errors"], fleet["cancelled"], fleet["client_closed"]) == (1, 0, 1)
    assert (fleet["p50_ms"], fleet["p99_ms"]) == (200.0, 300.0)
    assert fleet["requests_per_s"] == round(3 / 60, 4)
    assert s["by_worker"]["w1"]["completed"] == 2 and s["by_worker"]["w1"]["in_flight"] == 2
    assert s["by_worker"]["w2"]["error_rate"] == 0.0
    assert s["by_worker"]["w2"]["client_closed"] == 1
    assert s["by_model"]["unknown"]["completed"] == 1
    assert s["by_model"]["m1"]["p95_ms"] == 200.0
    assert [e["request_id"] for e in s["recent"]] == ["old", "c", "b", "a"]
    points = {p["t"]: p for p in s["series"]}
    assert points[now - 4]["requests_per_s"] == 1.0  # bucket [now-5, now-4)
    assert points[now - 3]["error_rate"] == 1.0
    assert points[now - 2]["error_rate"] == 0.0 and points[now - 2]["client_closed"] == 1
    assert set(s["series"][0]) == {
        "t", "in_flight", "requests_per_s", "error_rate", "errors", "cancelled",
        "client_closed", "p50_ms", "p95_ms", "p99_ms", "ttft_p50_ms", "ttft_p95_ms",
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


def test_a_busy_step_weighs_by_its_requests_not_by_its_reservoir(
    fake_redis: aioredis.Redis,
) -> None:
    # 10,000 requests of 100 ms in one step and 200 of 900 ms in the next: 2% are slow, so
    # p95 is 100 ms. Reservoirs merged as they are (2,048 + 200 values) would make it 900.
    stats = RollingStats(fake_redis, Keys("u3"), step=1.0)
    now = 10_000.0
    _add(stats, now, *(_entry(f"a{i}", "w1", "m", 100.0, "ok", now - 10.5) for i in range(10_000)))
    _add(stats, now, *(_entry(f"b{i}", "w1", "m", 900.0, "ok", now - 9.5) for i in range(200)))
    s = stats.summary(now, {"fleet": 0, "by_worker": {}, "by_model": {}})
    for group in (s["fleet"], s["by_worker"]["w1"], s["by_model"]["m"]):
        assert group["completed"] == 10_200
        assert (group["p50_ms"], group["p95_ms"], group["p99_ms"]) == (100.0, 100.0, 900.0)


def test_ingest_keeps_aggregates_per_step_and_group_not_per_request(
    fake_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stats_module, "MAX_WINDOW_GROUPS", 3)
    stats = RollingStats(fake_redis, Keys("u4"), step=1.0)
    now = 10_000.0
    _add(
        stats,
        now,
        *(_entry(f"r{i}", f"w{i % 2}", f"m{i % 4}", float(i % 100), "ok", now - 2.5)
          for i in range(5_000)),
    )  # fmt: skip
    (step,) = stats.steps.values()
    assert len(step.fleet.durations) == stats_module.STEP_SAMPLES
    # w0, w1 and m0 fill the bound: every later group counts under "other".
    assert sorted(step.workers) == ["w0", "w1"] and sorted(step.models) == ["m0", OTHER]
    assert all(len(a.durations) <= stats_module.GROUP_SAMPLES for a in step.models.values())
    s = stats.summary(now, {"fleet": 0, "by_worker": {}, "by_model": {}})
    assert sum(g["completed"] for g in s["by_model"].values()) == 5_000
    assert s["by_model"][OTHER]["completed"] == 3_750


def test_cancelled_and_client_closed_are_counted_but_never_errors(
    fake_redis: aioredis.Redis,
) -> None:
    stats = RollingStats(fake_redis, Keys("u"), step=1.0, started=0.0)
    now = 10_000.0
    for i, outcome in enumerate(["ok", "ok", "cancelled", "cancelled", "client_closed"]):
        _add(stats, now, _entry(f"r{i}", "w1", "m1", 100, outcome, now - 5))
    before = stats.summary(now)["fleet"]
    assert before["error_rate"] == 0.0
    assert (before["cancelled"], before["client_closed"], before["completed"]) == (2, 1, 5)
    _add(
        stats,
        now,
        _entry("e", "w1", "m1", 100, "upstream_error", now - 4),
        _entry("f", "w1", "m1", 100, "error", now - 4),
    )
    after = stats.summary(now)
    assert after["fleet"]["errors"] == 2 and after["fleet"]["error_rate"] == round(2 / 7, 4)
    assert after["by_model"]["m1"]["cancelled"] == 2
    point = {p["t"]: p for p in after["series"]}[now - 4]
    assert (point["cancelled"], point["client_closed"], point["errors"]) == (2, 1, 0)


async def test_rates_are_over_the_time_observed_while_younger_than_the_window(
    fake_redis: aioredis.Redis,
) -> None:
    now = 10_000.0
    workers_since: list[float | None] = [None]
    stats = RollingStats(
        fake_redis, Keys("u"), step=1.0, started=now - 30, fleet_since=lambda: workers_since[0]
    )
    # 3/s for the 30 s this service has been up
    _add(stats, now, *(_entry(f"r{i}", "w1", "m1", 10, "ok", now - 30 + i / 3) for i in range(90)))
    young = stats.summary(now)
    assert young["window_s"] == 30.0 and young["step_s"] == 1.0
    assert young["fleet"]["requests_per_s"] == 3.0
    assert young["by_worker"]["w1"]["requests_per_s"] == 3.0
    # A worker in view that started before this service: the fleet has been serving (and
    # finishing nothing) for longer, so the rate is over that time, up to the window.
    workers_since[0] = now - 45
    assert stats.summary(now)["window_s"] == 45.0
    workers_since[0] = now - 3600
    old = stats.summary(now)
    assert old["window_s"] == 60.0 and old["fleet"]["requests_per_s"] == 1.5
    # Once the service itself is older than the window, the window is full.
    workers_since[0] = None
    assert stats.summary(now + 40)["window_s"] == 60.0


async def test_a_rebuild_that_reads_older_entries_covers_their_time(
    fake_redis: aioredis.Redis,
) -> None:
    import time

    keys = Keys("u3")
    now = time.time()
    fields = dict(zip(schema.COMPLETED_FIELDS, schema.completed_values(
        _entry("r", "w", "m", 10.0, "ok", now - 50)), strict=True))  # fmt: skip
    await fake_redis.xadd(keys.completed, fields)  # type: ignore[arg-type]
    stats = RollingStats(fake_redis, keys, started=now)
    await stats.rebuild()
    assert 49.0 <= stats.summary(time.time())["window_s"] <= 51.0
