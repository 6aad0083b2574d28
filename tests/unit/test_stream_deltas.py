"""Deltas in-process: shared bytes, one merged catch-up for a laggard, the ring, the row table."""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from vdm_hub.services.stream.fanout import Broadcaster, Client
from vdm_hub.services.stream.feeds import delta_feed
from vdm_hub.services.stream.hub import Hub, WorkerView
from vdm_hub.services.stream.ring import Change, ChangeRing
from vdm_hub.services.stream.table import RowTable, row_key
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys


def _row(rid: str, wid: str = "w", start: float | None = None) -> schema.Row:
    return schema.Row(
        request_id=rid, worker_id=wid, method="GET", path="/", model="m", provider=None,
        is_streaming=False, start_time=time.time() if start is None else start,
        phase="upstream", bytes_out=0, input_tokens=None, output_tokens=None,
    )  # fmt: skip


class Fleet:
    """A hub whose state the test edits directly, the way a batch would."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.hub = Hub(redis, Keys("t"))
        self.view = self.hub.workers["w"] = WorkerView("w", "e", 1, None)

    def start(self, *rids: str) -> None:
        for rid in rids:
            self.view.rows[rid] = _row(rid)
            self.view.changed.add(rid)
        self.hub.version += 1

    def end(self, *rids: str) -> None:
        for rid in rids:
            del self.view.rows[rid]
            self.view.changed.add(rid)
        self.hub.version += 1

    def progress(self, rid: str, **fields: Any) -> None:
        self.view.rows[rid].update(fields)  # type: ignore[typeddict-item]
        self.view.changed.add(rid)
        self.hub.version += 1


def _bc(hub: Hub, counts_every: float = 0.0) -> Broadcaster:
    bc = Broadcaster(hub, interval=30.0, heartbeat=30.0, throttle=0.0, max_clients=10)
    bc.worker_counts_every = counts_every
    return bc


def frames(chunk: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in chunk.split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if line and b": " in line)
        if b"event" in lines:
            out.append((lines[b"event"].decode(), orjson.loads(lines[b"data"])))
    return out


def k(rid: str, wid: str = "w") -> str:
    return row_key(wid, rid)


def apply(rows: dict[str, Any], delta: dict[str, Any]) -> None:
    for key in delta["remove"]:
        rows.pop(key, None)
    for row in delta["upsert"]:
        rows[row["key"]] = row


def truth(fleet: Fleet) -> set[str]:
    return {k(rid) for rid in fleet.view.rows}


async def test_current_clients_share_one_delta_object(fake_redis: aioredis.Redis) -> None:
    fleet = Fleet(fake_redis)
    bc = _bc(fleet.hub)
    feeds = [delta_feed(bc, Client(), None) for _ in range(3)]
    for feed in feeds:
        await anext(feed)
    fleet.start("a")
    bc.encode_update()
    chunks = [await anext(feed) for feed in feeds]
    assert chunks[0] is chunks[1] is chunks[2] is bc.delta_chunk
    built = bc.snapshots
    for n in range(5):
        fleet.start(f"more-{n}")
        bc.encode_update()
        assert all(chunk is bc.delta_chunk for chunk in [await anext(f) for f in feeds])
    assert bc.snapshots == built  # only delta clients: no snapshot was ever built again
    ((kind, data),) = frames(chunks[0])
    assert kind == "delta" and [r["request_id"] for r in data["upsert"]] == ["a"]


async def test_a_laggard_gets_one_merged_delta_equal_to_the_truth(
    fake_redis: aioredis.Redis,
) -> None:
    fleet = Fleet(fake_redis)
    fleet.start("keep", "gone", *(f"still-{i}" for i in range(20)))
    bc = _bc(fleet.hub)
    slow = [delta_feed(bc, Client(), None) for _ in range(2)]
    firsts = [frames(await anext(feed)) for feed in slow]
    (kind, snap), *_ = firsts[0]
    assert kind == "update"
    rows = {r["key"]: r for r in snap["active_requests"]}
    held = snap["version"]
    # Four publishes the slow clients do not read.
    fleet.end("gone")
    bc.encode_update()
    fleet.start("flash", "back")
    bc.encode_update()
    fleet.end("flash", "back")
    fleet.progress("keep", bytes_out=99)
    bc.encode_update()
    fleet.start("back")
    bc.encode_update()
    chunks = [await anext(feed) for feed in slow]
    assert chunks[0] is chunks[1]  # memoised per from-version: laggards share the bytes
    ((kind, delta),) = frames(chunks[0])
    assert kind == "delta"
    assert delta["base"] == held and delta["version"] == bc.version
    assert sorted(delta["remove"]) == [k("flash"), k("gone")]  # upserted then removed: a remove
    assert sorted(r["request_id"] for r in delta["upsert"]) == ["back", "keep"]
    apply(rows, delta)
    assert set(rows) == truth(fleet) and rows[k("keep")]["bytes_out"] == 99
    assert "workers" in delta  # the active count moved in between


async def test_catch_up_is_a_snapshot_when_that_is_smaller_or_out_of_the_ring(
    fake_redis: aioredis.Redis,
) -> None:
    fleet = Fleet(fake_redis)
    fleet.start("a", "b")
    bc = _bc(fleet.hub)
    held = bc.version
    fleet.start(*(f"n{i}" for i in range(5)))
    bc.encode_update()
    fleet.end("a", "b")
    bc.encode_update()
    # Since `held`: five upserts and two removes, more than the five-row snapshot.
    assert bc.catch_up(held) is bc.update_frame
    fleet.start("a", "b")
    bc.encode_update()
    held = bc.version
    fleet.end("a")
    bc.encode_update()
    ((kind, delta),) = frames(bc.catch_up(held))
    assert (kind, delta["remove"], delta["base"]) == ("delta", [k("a")], held)
    assert frames(bc.catch_up(bc.version))[0][1]["upsert"] == []  # current: an empty delta
    assert bc.catch_up(bc.offset - 1) is bc.update_frame  # never one of ours


def test_ring_merges_spans_and_keeps_its_bounds() -> None:
    ring = ChangeRing(max_versions=3, max_ids=5)
    ring.add(Change(2, 1, frozenset({"a"}), False))
    ring.add(Change(3, 2, frozenset({"b"}), True))
    ring.add(Change(4, 3, frozenset({"a", "c"}), False))
    span = ring.since(1)
    assert span is not None and span.touched == {"a", "b", "c"} and span.workers
    span = ring.since(3)
    assert span is not None and span.touched == {"a", "c"} and not span.workers
    assert ring.since(4) == ring.since(ring.newest or 0)
    ring.add(Change(5, 4, frozenset({"d"}), False))  # a fourth version: the first goes
    assert ring.since(1) is None and ring.since(2) is not None
    ring.add(Change(6, 5, frozenset({"e", "f", "g"}), False))  # over 5 ids: more go
    assert ring.ids <= 5 and ring.since(6) is not None and ring.since(3) is None


def test_table_diffs_a_resync_and_keeps_newest_first(fake_redis: aioredis.Redis) -> None:
    fleet = Fleet(fake_redis)
    fleet.view.rows.update({"old": _row("old", start=1.0), "new": _row("new", start=3.0)})
    fleet.view.changed.update({"old", "new"})
    table = RowTable()
    table.sync(fleet.hub)
    assert table.take() == {k("old"), k("new")}
    fleet.view.rows["mid"] = _row("mid", start=2.0)
    fleet.view.changed.add("mid")
    table.sync(fleet.hub)
    assert table.take() == {k("mid")}
    rows = orjson.loads(table.rows_json(time.time()))
    assert [r["request_id"] for r in rows] == ["new", "mid", "old"]
    assert all(r["duration_ms"] >= 0 for r in rows)
    # A resync: a new view object with the same rows but one, and one row gone.
    resynced = {rid: dict(row) for rid, row in fleet.view.rows.items() if rid != "old"}
    resynced["mid"]["bytes_out"] = 5
    fleet.hub.workers["w"] = WorkerView("w", "e2", 1, None, rows=resynced)  # type: ignore[arg-type]
    table.sync(fleet.hub)
    assert table.take() == {k("old"), k("mid")}  # "new" was found as it was
    del fleet.hub.workers["w"]  # reaped
    table.sync(fleet.hub)
    assert table.take() == {k("new"), k("mid")} and len(table) == 0 and table.bytes == 0


async def test_worker_counts_alone_are_held_back_briefly_membership_is_not(
    fake_redis: aioredis.Redis,
) -> None:
    fleet = Fleet(fake_redis)
    bc = _bc(fleet.hub)
    fleet.start("a")
    bc.encode_update()
    ((_, delta),) = frames(bc.delta_frame)
    assert "workers" in delta  # the last list went out long ago: at once
    bc.worker_counts_every = 3600.0  # from now on, the last list went out "just now"
    fleet.start("b")
    bc.encode_update()
    ((_, delta),) = frames(bc.delta_frame)
    assert "workers" not in delta and bc.workers_due is not None
    assert b'"active":2' in bc.snapshot()  # snapshots are never behind
    fleet.hub.workers["w2"] = WorkerView("w2", "e", 1, None)  # membership: at once
    fleet.hub.version += 1
    bc.encode_update()
    ((_, delta),) = frames(bc.delta_frame)
    assert [(w["worker_id"], w["active"]) for w in delta["workers"]] == [("w", 2), ("w2", 0)]
    fleet.end("a")
    bc.encode_update()
    assert "workers" not in frames(bc.delta_frame)[0][1]
    bc.worker_counts_every = 0.0  # the window is over: the held-back count goes out
    bc.encode_update()
    ((_, delta),) = frames(bc.delta_frame)
    assert [w["active"] for w in delta["workers"]] == [1, 0] and bc.workers_due is None


async def test_counts_back_to_what_was_sent_leave_nothing_due(fake_redis: aioredis.Redis) -> None:
    fleet = Fleet(fake_redis)
    bc = _bc(fleet.hub)
    fleet.start("a")
    bc.encode_update()  # the list (active 1) goes out
    bc.worker_counts_every = 3600.0
    fleet.start("b")
    bc.encode_update()
    assert bc.workers_due is not None  # active 2, held back
    fleet.end("b")
    bc.encode_update()  # active 1 again: what the clients hold
    assert "workers" not in frames(bc.delta_frame)[0][1]
    assert bc.workers_due is None  # else the publishing loop would wake at once, forever


def test_a_large_frame_is_written_in_pieces_that_join_to_the_same_bytes() -> None:
    from vdm_hub.services.stream.sse import PIECE_BYTES, pieces

    small = b"x" * PIECE_BYTES
    assert pieces(small) == [small]
    large = bytes(range(256)) * (PIECE_BYTES // 64)  # four pieces' worth
    parts = pieces(large)
    assert len(parts) == 4
    assert all(len(p) <= PIECE_BYTES for p in parts)
    assert b"".join(parts) == large


async def test_one_request_id_on_two_workers_is_two_rows_and_ends_one_at_a_time(
    fake_redis: aioredis.Redis,
) -> None:
    # A client's retry that lands on another worker carries the same X-Request-Id (issue 20).
    fleet = Fleet(fake_redis)
    other = fleet.hub.workers["w2"] = WorkerView("w2", "e", 1, None)
    bc = _bc(fleet.hub)
    fleet.start("dup")
    other.rows["dup"] = _row("dup", "w2")
    other.changed.add("dup")
    fleet.hub.version += 1
    bc.encode_update()
    ((_, delta),) = frames(bc.delta_frame)
    shown = {(r["worker_id"], r["request_id"], r["key"]) for r in delta["upsert"]}
    assert shown == {("w", "dup", k("dup")), ("w2", "dup", k("dup", "w2"))}
    snap = orjson.loads(bc.snapshot())
    assert sorted(r["key"] for r in snap["active_requests"]) == [k("dup"), k("dup", "w2")]
    fleet.end("dup")  # the first worker's request ends: only its row goes
    bc.encode_update()
    ((_, delta),) = frames(bc.delta_frame)
    assert (delta["remove"], delta["upsert"]) == ([k("dup")], [])
    snap = orjson.loads(bc.snapshot())
    assert [(r["worker_id"], r["key"]) for r in snap["active_requests"]] == [("w2", k("dup", "w2"))]
    # The other worker's progress still reaches its row, and the in-flight count agrees.
    other.rows["dup"]["bytes_out"] = 7
    other.changed.add("dup")
    fleet.hub.version += 1
    bc.encode_update()
    ((_, delta),) = frames(bc.delta_frame)
    assert [(r["key"], r["bytes_out"]) for r in delta["upsert"]] == [(k("dup", "w2"), 7)]
    assert sum(sum(m.values()) for m in fleet.hub.in_flight().values()) == len(bc.table) == 1


def test_row_keys_never_collide_whatever_the_ids_hold() -> None:
    pairs = [("a", "b/c"), ("a/b", "c"), ("a%2Fb", "c"), ("a%", "2Fb/c"), ("a", "b"), ("", "a/b")]
    assert len({row_key(w, r) for w, r in pairs}) == len(pairs)
    assert row_key("worker-1", "req-9") == "worker-1/req-9"  # plain ids stay readable


def test_the_key_is_the_services_own_never_one_a_worker_wrote(
    fake_redis: aioredis.Redis,
) -> None:
    fleet = Fleet(fake_redis)
    fleet.view.rows["a"] = schema.decode_row(orjson.dumps({**_row("a"), "key": "forged"}))
    fleet.view.changed.add("a")
    table = RowTable()
    table.sync(fleet.hub)
    raw = table.rows_json(time.time())
    assert raw.count(b'"key":') == 1 and b"forged" not in raw
    assert orjson.loads(raw)[0]["key"] == k("a")
