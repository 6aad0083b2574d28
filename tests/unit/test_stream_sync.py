"""The hub's ``sync`` state: problems by source, since-when, the reasons clients see, and what
the fan-out makes of it (every frame carries it; durations stop while stale)."""

from __future__ import annotations

import time

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.stream_support import FakeWorker, make_row
from vdm_hub.services.stream import sync
from vdm_hub.services.stream.fanout import Broadcaster
from vdm_hub.services.stream.hub import READER, Hub
from vdm_hub.services.stream.sync import SyncState
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_stale_until_every_source_is_clear_and_since_is_the_last_confirmed_moment() -> None:
    clock = Clock()
    changes: list[str] = []
    state = SyncState(on_change=lambda: changes.append(state.state), clock=clock)
    assert not state.ok and state.reason == sync.STARTING and state.since == 1000.0

    clock.now = 1001.0
    state.clear("reader")
    assert state.ok and state.since == 1001.0 and state.reason is None

    clock.now = 1010.0
    state.fail("reader", sync.NOT_ANSWERING, confirmed_at=1007.5)
    assert not state.ok and state.since == 1007.5  # the last reply heard, not the detection
    state.fail("writes", sync.NOT_ANSWERING, confirmed_at=1008.0)
    assert state.since == 1007.5 and state.reason == sync.NOT_ANSWERING
    state.fail("reader", sync.UNREACHABLE)  # the link is given up: a new reason, same since
    assert state.since == 1007.5 and state.reason == sync.UNREACHABLE

    clock.now = 1020.0
    state.clear("reader")
    assert not state.ok and state.reason == sync.NOT_ANSWERING  # the probe still fails
    state.clear("writes")
    assert state.ok and state.since == 1020.0
    assert changes == ["ok", "stale", "stale", "stale", "ok"]
    assert state.stale_episodes == 1


def test_a_repeated_report_is_no_change_and_since_never_goes_back() -> None:
    clock = Clock(2000.0)
    calls: list[int] = []
    state = SyncState(on_change=lambda: calls.append(1), clock=clock)
    state.clear("reader")
    state.fail("writes", sync.OUT_OF_MEMORY, confirmed_at=1500.0)  # before the ok moment
    assert state.since == 2000.0
    state.fail("writes", sync.OUT_OF_MEMORY)
    assert len(calls) == 2


def test_fields_and_the_shown_time() -> None:
    clock = Clock(3000.0)
    state = SyncState(clock=clock)
    assert orjson.loads(b"{" + state.fields_json + b"}") == {
        "sync": "stale",
        "sync_since": 3000.0,
        "sync_reason": sync.STARTING,
    }
    assert state.shown_time(3005.0) == 3000.0
    state.clear("reader")
    assert orjson.loads(b"{" + state.fields_json + b"}")["sync_reason"] is None
    assert state.shown_time(3005.0) == 3005.0


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (AuthenticationError("invalid username-password pair"), sync.CREDENTIALS),
        (ResponseError("NOAUTH Authentication required."), sync.CREDENTIALS),
        (BusyLoadingError("Redis is loading the dataset in memory"), sync.LOADING),
        (RedisTimeoutError("Timeout reading from socket"), sync.NOT_ANSWERING),
        (TimeoutError(), sync.NOT_ANSWERING),
        (RedisConnectionError("Error 111 connecting to 127.0.0.1:6379."), sync.UNREACHABLE),
        (RedisConnectionError("Redis answered READONLY (a failover?)"), sync.READ_ONLY),
        (ConnectionRefusedError(), sync.UNREACHABLE),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots"), sync.SAVE_FAILED),
        (ResponseError("ERR something else"), sync.REDIS_ERROR),
    ],
)
def test_failure_reasons_are_fixed_phrases(exc: BaseException, reason: str) -> None:
    assert sync.failure_reason(exc) == reason


def test_refusal_reasons() -> None:
    assert sync.refusal_reason("OOM command not allowed when used memory") == sync.OUT_OF_MEMORY
    assert sync.refusal_reason("-READONLY You can't write against a replica") == sync.READ_ONLY
    assert sync.refusal_reason("NOREPLICAS Not enough good replicas") == sync.WRITES_REFUSED


async def test_every_frame_carries_sync_and_stale_rows_stop_ageing(
    fake_redis: aioredis.Redis,
) -> None:
    keys = Keys("syncfan")
    worker = FakeWorker(fake_redis, keys, "w1")
    worker.rows["r1"] = make_row("w1", "r1", age=20.0)  # running for 20 s
    await worker.register()
    hub = Hub(fake_redis, keys)
    # The hub's sync on a clock of our own: in sync since 10 s ago, confirmed last 5 s ago.
    clock = Clock(time.time() - 10.0)
    hub.sync = SyncState(on_change=hub._sync_changed, clock=clock)
    bc = Broadcaster(hub, interval=1.0, heartbeat=30.0, throttle=0.0, max_clients=10)
    await hub.full_resync()
    hub.sync.clear(READER)
    bc.encode_update()
    snap = orjson.loads(bc.snapshot())
    assert snap["sync"] == "ok" and snap["sync_reason"] is None

    version = hub.version
    clock.now = time.time()
    hub.sync.fail(READER, sync.NOT_ANSWERING, confirmed_at=clock.now - 5.0)
    assert hub.version == version + 1  # a change of sync is a version: it goes out at once
    bc.encode_update()
    delta = orjson.loads(bc.delta_frame.split(b"data: ", 1)[1])
    assert delta["upsert"] == [] and delta["remove"] == []
    assert delta["sync"] == "stale" and delta["sync_reason"] == sync.NOT_ANSWERING
    assert delta["sync_since"] == pytest.approx(clock.now - 5.0, abs=0.001)
    row = orjson.loads(bc.snapshot())["active_requests"][0]
    # The row's age is taken at the last confirmed moment (5 s ago), not now.
    shown = hub.sync.since - row["start_time"]
    assert row["duration_ms"] == pytest.approx(shown * 1000, abs=5)
    assert row["duration_ms"] < (time.time() - row["start_time"]) * 1000 - 4000
