"""The atomic operations of wire protocol v1 (Lua scripts) and the consistent reads beside them.

Writers change state only through these scripts, so that every state change and its pub/sub
notice are one atomic step carrying (epoch, seq) — invariant 1 of the protocol. Readers load a
worker's state with :func:`read_worker_state`, a MULTI/EXEC transaction, so the rows they get
and the seq marker they get belong together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from shared import schema
from shared.keys import Keys


def _lua(name: str) -> str:
    return resources.files("shared").joinpath("lua", f"{name}.lua").read_text()


def now_ms() -> int:
    return int(time.time() * 1000)


class NotRegistered(RuntimeError):
    """The worker's epoch is no longer the registered one (reaped or superseded)."""


@dataclass
class WorkerState:
    """One worker's state as read from Redis. Bad rows are skipped and counted in ``malformed``."""

    worker_id: str
    record: schema.WorkerRecord | None
    epoch: str | None
    seq: int
    deadline_ms: float | None
    rows: dict[str, schema.Row] = field(default_factory=dict)
    malformed: int = 0


class WireScripts:
    """The protocol's Lua scripts, registered on one client (EVALSHA with NOSCRIPT fallback)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._register = redis.register_script(_lua("register"))
        self._apply = redis.register_script(_lua("apply"))
        self._heartbeat = redis.register_script(_lua("heartbeat"))
        self._remove = redis.register_script(_lua("remove"))

    @property
    def apply_sha(self) -> str:
        """SHA1 of ``apply.lua``, for a caller that sends the EVALSHA itself (the publisher)."""
        return str(self._apply.sha)

    async def register(
        self,
        record: schema.WorkerRecord,
        deadline_ms: int,
        rows: Sequence[tuple[str, bytes]],
    ) -> None:
        wid, epoch = record["worker_id"], record["epoch"]
        events = schema.encode([{"type": schema.EventType.WORKER_UP, "worker": record}])
        args: list[Any] = [
            wid,
            epoch,
            schema.encode(record),
            deadline_ms,
            schema.envelope_prefix(wid, epoch),
            events,
            len(rows),
        ]
        for request_id, row in rows:
            args += (request_id, row)
        k = self.keys
        await self._register(keys=[k.workers, k.alive, k.seq, k.active(wid), k.events], args=args)

    async def apply(
        self,
        worker_id: str,
        epoch: str,
        prefix: bytes,
        events_json: bytes,
        sets: Sequence[tuple[str, bytes]],
        deletes: Sequence[str],
        completed: Sequence[schema.CompletedEntry],
        completed_maxlen: int,
    ) -> int:
        """Apply one batch; returns its seq. Raises :class:`NotRegistered` on epoch mismatch."""
        args: list[Any] = [worker_id, epoch, prefix, events_json, completed_maxlen, len(sets)]
        for request_id, row in sets:
            args += (request_id, row)
        args.append(len(deletes))
        args += deletes
        args.append(len(completed))
        for entry in completed:
            args += schema.completed_values(entry)
        k = self.keys
        seq = int(
            await self._apply(keys=[k.seq, k.active(worker_id), k.completed, k.events], args=args)
        )
        if seq < 0:
            raise NotRegistered(worker_id)
        return seq

    async def heartbeat(self, worker_id: str, epoch: str, deadline_ms: int) -> bool:
        ok = await self._heartbeat(
            keys=[self.keys.seq, self.keys.alive], args=[worker_id, epoch, deadline_ms]
        )
        return bool(ok)

    async def remove(
        self, worker_id: str, *, reason: str, now_ms: int | None = None, epoch: str = ""
    ) -> int:
        """Remove a worker: a reaper passes ``now_ms``, the worker itself its ``epoch``.

        Returns 0 when there was nothing to remove (another reaper won, or a heartbeat came in
        time), else the seq of the published ``worker_down`` batch.
        """
        head = b'{"v":1,"worker_id":' + schema.encode(worker_id) + b',"epoch":'
        events = schema.encode(
            [{"type": schema.EventType.WORKER_DOWN, "worker_id": worker_id, "reason": reason}]
        )
        k = self.keys
        return int(
            await self._remove(
                keys=[k.alive, k.workers, k.seq, k.active(worker_id), k.events],
                args=[worker_id, head, "" if now_ms is None else now_ms, epoch, events],
            )
        )


async def read_worker_state(redis: aioredis.Redis, keys: Keys, worker_id: str) -> WorkerState:
    """Read one worker's rows, record, seq marker and deadline in one MULTI/EXEC."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hget(keys.seq, worker_id)
        pipe.hget(keys.workers, worker_id)
        pipe.zscore(keys.alive, worker_id)
        pipe.hgetall(keys.active(worker_id))
        marker_raw, record_raw, deadline, rows_raw = await pipe.execute()
    state = WorkerState(worker_id=worker_id, record=None, epoch=None, seq=0, deadline_ms=deadline)
    try:
        marker = schema.parse_seq(marker_raw)
    except schema.MalformedMessage:
        marker = None
        state.malformed += 1
    if marker is not None:
        state.epoch, state.seq = marker
    if record_raw is not None:
        try:
            state.record = schema.decode_worker_record(record_raw)
        except schema.MalformedMessage:
            state.malformed += 1
    for request_id, raw in rows_raw.items():
        try:
            row = schema.decode_row(raw)
        except schema.MalformedMessage:
            state.malformed += 1
            continue
        # A field name that is not UTF-8 cannot match the row's request_id: counted below.
        rid = request_id.decode(errors="replace") if isinstance(request_id, bytes) else request_id
        if row["request_id"] != rid or row["worker_id"] != worker_id:
            state.malformed += 1
            continue
        state.rows[rid] = row
    return state


async def list_worker_ids(redis: aioredis.Redis, keys: Keys) -> set[str]:
    """Every worker the hashes know of: registered records, heartbeats and seq markers."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hkeys(keys.workers)
        pipe.zrange(keys.alive, 0, -1)
        pipe.hkeys(keys.seq)
        a, b, c = await pipe.execute()
    out: set[str] = set()
    for raw in (*a, *b, *c):
        wid = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        if 0 < len(wid) <= schema.MAX_ID_CHARS:
            out.add(wid)
    return out


async def expired_worker_ids(redis: aioredis.Redis, keys: Keys, now: int) -> list[str]:
    raw: list[Any] = list(await redis.zrangebyscore(keys.alive, "-inf", now))
    return [r.decode(errors="replace") if isinstance(r, bytes) else str(r) for r in raw]
