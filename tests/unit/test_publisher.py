"""The publisher's batching and healing, against fakeredis (with Lua)."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from vdm_hub.services.proxy import publisher as publisher_module
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.schema import Outcome, Phase
from vdm_hub.shared.settings import Settings
from vdm_hub.shared.store import read_worker_state


def _settings() -> Settings:
    return Settings.from_env({"VDM_WORKER_ID": "w1", "VDM_KEY_PREFIX": "u"})


def _row(rid: str) -> schema.Row:
    return schema.Row(
        request_id=rid,
        worker_id="w1",
        method="POST",
        path="/v1/messages",
        model=None,
        provider="anthropic",
        is_streaming=False,
        start_time=time.time(),
        phase="upstream",
        bytes_out=0,
        input_tokens=None,
        output_tokens=None,
    )


async def _drain(pub: Publisher) -> None:
    async with asyncio.timeout(5):
        while pub._has_pending():
            await pub._flush_once()


async def test_progress_before_flush_is_folded_into_the_start_event(
    fake_redis: aioredis.Redis,
) -> None:
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)  # registers
    pub.start(_row("r1"))
    pub.progress("r1", {"model": "m1", "is_streaming": True})
    assert len(pub._events) == 1
    await _drain(pub)
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert state.rows["r1"]["model"] == "m1" and state.rows["r1"]["is_streaming"] is True
    assert state.seq == 2

    pub.progress("r1", {"phase": Phase.STREAMING})
    pub.progress("r1", {"bytes_out": 10})
    assert len(pub._events) == 1  # one progress event carrying both changes
    assert pub._events[0] == {
        "type": "progress",
        "request_id": "r1",
        "phase": "streaming",
        "bytes_out": 10,
    }


async def test_start_and_end_in_one_batch_leave_no_row_and_one_completed_entry(
    fake_redis: aioredis.Redis,
) -> None:
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    pub.start(_row("r2"))
    pub.end(
        "r2",
        status=200,
        outcome=Outcome.OK,
        duration_ms=1.5,
        bytes_out=3,
        input_tokens=1,
        output_tokens=2,
    )
    await _drain(pub)
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert state.rows == {}
    assert await fake_redis.xlen("u:completed") == 1


async def test_queue_overflow_drops_counts_and_rewrites_the_active_set(
    fake_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "MAX_PENDING_EVENTS", 5)
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    first_epoch = pub.epoch
    for i in range(8):
        pub.start(_row(f"r{i}"))
    assert pub.events_dropped == 3
    await _drain(pub)
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert pub.epoch != first_epoch, "a rewrite takes a new epoch"
    assert set(state.rows) == {f"r{i}" for i in range(8)}


async def test_reaped_worker_reregisters_with_its_active_set(fake_redis: aioredis.Redis) -> None:
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    pub.start(_row("keep"))
    await _drain(pub)
    await pub.scripts.remove("w1", reason="reaped")  # unconditional, as if expired
    assert not await fake_redis.hexists("u:workers", "w1")
    pub.start(_row("new"))
    await _drain(pub)  # apply refused -> re-register
    await _drain(pub)
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert set(state.rows) == {"keep", "new"}
    assert state.record is not None and state.record["epoch"] == pub.epoch


async def test_close_deregisters_and_publishes_worker_down(fake_redis: aioredis.Redis) -> None:
    pub = Publisher(_settings(), fake_redis)
    await pub.start_background()
    async with asyncio.timeout(5):
        await pub.wait_registered()
    async with fake_redis.pubsub() as pubsub:
        await pubsub.subscribe("u:events")
        await pub.close()
        async with asyncio.timeout(5):
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if msg is not None:
                    batch = schema.decode_batch(msg["data"])
                    if batch.events[0].type == "worker_down":
                        break
    assert await fake_redis.keys("u:*") == []


def _end(pub: Publisher, rid: str) -> None:
    pub.end(
        rid,
        status=200,
        outcome=Outcome.OK,
        duration_ms=1.0,
        bytes_out=2,
        input_tokens=None,
        output_tokens=None,
    )


async def test_every_batch_fits_the_readers_size_limit(fake_redis: aioredis.Redis) -> None:
    # 1,000 starts with the longest paths a row may carry: ~2 MB of events, which one batch
    # capped only by event count (1,000) would publish and every reader would reject.
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    long_path = "/" + "\x01" * 255  # JSON escapes each to 6 bytes: ~1.5 KB per path
    for i in range(1000):
        row = _row(f"r{i}")
        row["path"] = long_path
        pub.start(row)
    events = 0
    async with fake_redis.pubsub() as pubsub:
        await pubsub.subscribe("u:events")
        await pubsub.get_message(timeout=1)  # the subscription's acknowledgement
        await _drain(pub)
        async with asyncio.timeout(10):
            while events < 1000:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if msg is None:
                    continue
                assert len(msg["data"]) <= schema.MAX_MESSAGE_BYTES
                events += len(schema.decode_batch(msg["data"]).events)
    assert events == 1000 and pub.events_sent == 1000
    assert len((await read_worker_state(fake_redis, Keys("u"), "w1")).rows) == 1000


async def test_a_batch_applied_but_whose_reply_was_lost_is_not_counted_twice(
    fake_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply of a batch carrying a finished request times out after Redis applied it:
    the worker rewrites its state (new epoch), and the finished request must be in the
    completed stream once, not twice (the stream service counts every entry)."""
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    pub.start(_row("done-once"))
    await _drain(pub)
    real_apply = pub._apply
    lose_reply = True

    async def applied_then_timed_out(*args: object) -> int:
        nonlocal lose_reply
        seq = await real_apply(*args)  # type: ignore[arg-type]
        if lose_reply:
            lose_reply = False
            raise RedisTimeoutError("Timeout reading from socket")
        return seq

    monkeypatch.setattr(pub, "_apply", applied_then_timed_out)
    first_epoch = pub.epoch
    _end(pub, "done-once")
    with pytest.raises(RedisTimeoutError):
        await pub._flush_once()
    await _drain(pub)
    assert pub.epoch != first_epoch, "an unknown outcome rewrites the state"
    entries = await fake_redis.xrange("u:completed")
    assert [fields[b"request_id"] for _, fields in entries] == [b"done-once"]
    assert (await read_worker_state(fake_redis, Keys("u"), "w1")).rows == {}


async def test_a_batch_that_failed_before_applying_sends_its_finished_requests_again(
    fake_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    pub.start(_row("r1"))
    await _drain(pub)
    real_apply = pub._apply
    fail = True

    async def lost_on_the_way(*args: object) -> int:
        nonlocal fail
        if fail:
            fail = False
            raise RedisConnectionError("Connection reset by peer")
        return await real_apply(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pub, "_apply", lost_on_the_way)
    _end(pub, "r1")
    with pytest.raises(RedisConnectionError):
        await pub._flush_once()
    await _drain(pub)
    entries = await fake_redis.xrange("u:completed")
    assert [fields[b"request_id"] for _, fields in entries] == [b"r1"]


async def test_a_heartbeat_that_loses_its_connection_rewrites_the_state() -> None:
    """redis-py path (no raw connection: TLS, unix sockets): a Redis that comes back from an
    old snapshot still holds this epoch, with a row long gone; only a rewrite removes it."""
    import fakeredis

    server = fakeredis.FakeServer()
    redis = fakeredis.FakeAsyncRedis(server=server)
    try:
        pub = Publisher(_settings(), redis)
        assert pub._raw is None
        await _drain(pub)
        first_epoch = pub.epoch
        ghost = _row("ghost")
        await redis.hset("u:active:w1", "ghost", schema.encode_row(ghost))
        server.connected = False
        assert await pub._heartbeat_once() is False
        assert pub.heartbeat_failures == 1
        server.connected = True
        await _drain(pub)
        assert pub.epoch != first_epoch
        assert (await read_worker_state(redis, Keys("u"), "w1")).rows == {}
    finally:
        await redis.aclose()


async def test_one_incident_gives_one_reregistration(fake_redis: aioredis.Redis) -> None:
    """Reaped: the heartbeat is refused and the next batch is refused too. Whatever order the
    two answers come in, the worker registers once."""
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    pub.start(_row("r1"))
    await _drain(pub)
    await pub.scripts.remove("w1", reason="reaped")  # unconditional, as if expired
    before = pub.registrations
    pub.start(_row("r2"))
    await asyncio.gather(pub._heartbeat_once(), _drain(pub))
    await _drain(pub)
    assert not pub._needs_register
    assert pub.registrations == before + 1
    # A refusal that arrives late, for the epoch already replaced, is not a new incident.
    pub._replan("an-old-epoch", "heartbeat refused")
    assert not pub._needs_register
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert set(state.rows) == {"r1", "r2"}


async def test_flushes_follow_each_other_without_a_delay_and_an_end_is_not_held_back(
    fake_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one batch is in flight, the request's progress and then its end arrive: the end
    goes in the very next batch (without the progress it supersedes), sent as soon as the
    first returns (no sleep in between)."""
    pub = Publisher(_settings(), fake_redis)
    real_apply = pub._apply
    release = asyncio.Event()
    in_flight = asyncio.Event()
    batches: list[list[str]] = []

    async def gated(events_json: bytes, *rest: object) -> int:
        batches.append([e["type"] for e in orjson.loads(events_json)])
        if len(batches) == 1:
            in_flight.set()
            await release.wait()
        return await real_apply(events_json, *rest)  # type: ignore[arg-type]

    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay: float, *args: object) -> None:
        task = asyncio.current_task()
        if task is not None and task.get_name() == "vdm-flush":
            sleeps.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(pub, "_apply", gated)
    await _drain(pub)  # registers
    monkeypatch.setattr(publisher_module.asyncio, "sleep", recorded_sleep)
    await pub.start_background()
    try:
        pub.start(_row("r1"))
        async with asyncio.timeout(5):
            await in_flight.wait()
        pub.progress("r1", {"phase": Phase.STREAMING, "bytes_out": 5})
        _end(pub, "r1")
        release.set()
        async with asyncio.timeout(5):
            while pub.batches_sent < 2:
                await real_sleep(0.01)
    finally:
        await pub.close()
    assert batches[:2] == [["start"], ["end"]]
    assert [s for s in sleeps if s > 0] == [], "no flush waited for a window"


async def test_the_completed_entry_carries_ttft_ms(fake_redis: aioredis.Redis) -> None:
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    pub.start(_row("r1"))
    pub.end(
        "r1",
        status=200,
        outcome=Outcome.OK,
        duration_ms=9.0,
        bytes_out=2,
        input_tokens=None,
        output_tokens=None,
        ttft_ms=4.25,
    )
    await _drain(pub)
    ((entry_id, fields),) = await fake_redis.xrange("u:completed")
    assert schema.decode_completed(entry_id, fields)["ttft_ms"] == 4.25


async def test_an_end_right_after_a_progress_removes_a_row_sent_earlier(
    fake_redis: aioredis.Redis,
) -> None:
    """A non-streaming answer: its first byte (progress) and its end land in one batch, after
    the start went out in an earlier one. The row must go from Redis, and the progress the
    end supersedes is not sent."""
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    pub.start(_row("r3"))
    await _drain(pub)
    pub.progress("r3", {"phase": Phase.STREAMING, "bytes_out": 2, "ttft_ms": 1.0})
    _end(pub, "r3")
    sent_before = pub.events_sent
    await _drain(pub)
    state = await read_worker_state(fake_redis, Keys("u"), "w1")
    assert state.rows == {}
    assert pub.events_sent - sent_before == 1  # the end alone
