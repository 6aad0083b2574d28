"""The hub's reader rules on fakeredis: apply, duplicate, gap, new epoch, worker_down, garbage."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from vdm_hub.services.stream.hub import Hub
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.store import WireScripts


def _record(epoch: str) -> schema.WorkerRecord:
    return schema.WorkerRecord(
        worker_id="w", host="h", pid=1, started_at=time.time(), upstream="", version="",
        epoch=epoch, heartbeat_interval=2.0, ttl=10.0,
    )  # fmt: skip


def _row(rid: str) -> schema.Row:
    return schema.Row(
        request_id=rid, worker_id="w", method="GET", path="/", model=None, provider=None,
        is_streaming=False, start_time=time.time(), phase="upstream", bytes_out=0,
        input_tokens=None, output_tokens=None,
    )  # fmt: skip


def _batch(epoch: str, seq: int, *events: dict[str, object]) -> bytes:
    return schema.encode({"v": 1, "worker_id": "w", "epoch": epoch, "seq": seq, "events": events})


async def test_reader_rules(fake_redis: aioredis.Redis) -> None:
    keys = Keys("h")
    changes: list[int] = []
    hub = Hub(fake_redis, keys, on_change=lambda: changes.append(1))
    scripts = WireScripts(fake_redis, keys)
    await scripts.register(_record("e1"), [("r0", schema.encode_row(_row("r0")))], ttl_ms=10_000)

    # unknown worker -> resync from its hash
    await hub.handle_message(_batch("e1", 1, {"type": "worker_up", "worker": _record("e1")}))
    assert set(hub.workers["w"].rows) == {"r0"} and hub.workers["w"].seq == 1

    # seq == known + 1 -> apply (start, progress)
    await hub.handle_message(_batch("e1", 2, {"type": "start", "row": _row("r1")},
                                    {"type": "progress", "request_id": "r1", "phase": "streaming",
                                     "bytes_out": 7}))  # fmt: skip
    assert hub.workers["w"].rows["r1"]["phase"] == "streaming"
    assert hub.workers["w"].rows["r1"]["bytes_out"] == 7
    version = hub.version

    # duplicate -> nothing
    end = {"type": "end", "request_id": "r1", "status": 200, "outcome": "ok", "duration_ms": 1.0,
           "input_tokens": None, "output_tokens": None}  # fmt: skip
    await hub.handle_message(_batch("e1", 2, end))
    assert "r1" in hub.workers["w"].rows and hub.version == version

    # gap -> resync from the hash (which holds only r0: the hub's r1 was never written there)
    await hub.handle_message(_batch("e1", 9, {"type": "start", "row": _row("r9")}))
    assert set(hub.workers["w"].rows) == {"r0"}
    assert hub.counters.dropped_by_worker == {"w": 6}

    # new epoch -> resync
    await scripts.register(_record("e2"), [], ttl_ms=10_000)
    await hub.handle_message(_batch("e2", 1, {"type": "worker_up", "worker": _record("e2")}))
    assert hub.workers["w"].epoch == "e2" and not hub.workers["w"].rows

    # worker_down -> drop
    await hub.handle_message(_batch("e2", 2, {"type": "worker_down", "worker_id": "w",
                                              "reason": "shutdown"}))  # fmt: skip
    assert "w" not in hub.workers

    # garbage -> counted, harmless
    await hub.handle_message(b"{]")
    await hub.handle_message(_batch("e2", 3, {"type": "nope"}))
    assert hub.counters.malformed == 2
    assert len(changes) == hub.version


async def test_the_reaper_stops_even_when_a_library_loses_its_cancellation(
    fake_redis: aioredis.Redis,
) -> None:
    """Python 3.11's ``asyncio.wait_for`` can turn a cancellation into a normal return when it
    races the awaited call's completion. The loop then goes round again: it must still stop,
    since the task's cancel count still holds the request."""
    hub = Hub(fake_redis, Keys("lost"), on_change=lambda: None)
    hub.reap_every = 0.01
    inside = asyncio.Event()

    async def reap_once_that_swallows_a_cancel() -> None:
        inside.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise TimeoutError from None  # what the race looks like to the loop

    hub.reap_once = reap_once_that_swallows_a_cancel  # type: ignore[method-assign]
    task = asyncio.create_task(hub.reap_loop())
    await asyncio.wait_for(inside.wait(), 5)
    task.cancel()  # lands inside reap_once, which swallows it
    done, _ = await asyncio.wait([task], timeout=5)
    assert done == {task} and task.cancelled()
