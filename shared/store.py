"""The atomic operations of wire protocol v1 (Lua scripts) and the consistent reads beside them.

Writers change state only through these scripts, so that every state change and its pub/sub
notice are one atomic step carrying (epoch, seq) — invariant 1 of the protocol. Readers load a
worker's state with :func:`read_worker_state`, one read-only script, so the rows they get and
the seq marker they get belong together. Not MULTI/EXEC: Redis refuses every command queued in
a transaction at maxmemory, which froze the stream service's view exactly when workers could
not write either (``read.lua`` says more).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from vdm_hub.shared import schema
from vdm_hub.shared.clock_offset import ClockOffset
from vdm_hub.shared.keys import Keys

# The member the write probe names: never a worker id (ids have no whitespace).
PROBE_MEMBER = " write-probe"


def _lua(name: str) -> str:
    return resources.files("vdm_hub.shared").joinpath("lua", f"{name}.lua").read_text()


def _unflagged(script: str) -> str:
    """``script`` without its ``#!lua flags=…`` line, for a server that predates script flags."""
    return script.split("\n", 1)[1] if script.startswith("#!") else script


def _flags_unsupported(exc: ResponseError) -> bool:
    """Redis < 7.0 (and fakeredis) compile the shebang line as Lua, and fail on its ``#``."""
    return "near '#'" in str(exc)


log = logging.getLogger("vdm.store")


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
    """The protocol's Lua scripts, registered on one client (EVALSHA with NOSCRIPT fallback).

    Liveness is judged on Redis's clock: callers pass a TTL, the scripts add it to ``TIME``,
    so a worker or stream service whose clock is off can neither reap a live worker nor keep
    a dead one. Every key a script touches is in its KEYS (Redis Cluster routes by them; with
    a hash-tagged prefix they are all in one slot).
    """

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._register = redis.register_script(_lua("register"))
        self._apply = redis.register_script(_lua("apply"))
        self._heartbeat = redis.register_script(_lua("heartbeat"))
        self._remove = redis.register_script(_lua("remove"))
        self._clock = redis.register_script(_lua("clock"))
        self._probe = redis.register_script(_lua("probe"))
        self._read = redis.register_script(_lua("read"))
        self._apply_sha = str(self._apply.sha)
        # Redis's clock relative to ours, from every call that returns Redis's TIME.
        self.clock = ClockOffset()

    @property
    def apply_sha(self) -> str:
        """SHA1 of ``apply.lua``, for a caller that sends the EVALSHA itself (the publisher)."""
        return self._apply_sha

    async def _run(self, name: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except ResponseError as exc:
            # A script error stops what the script does (reaping, publishing) for everyone it
            # concerns: never silent. NOSCRIPT is redis-py's to handle, not an error here.
            if not isinstance(exc, NoScriptError):
                log.error("Redis script %s failed: %s", name, exc)
            raise

    async def register(
        self,
        record: schema.WorkerRecord,
        rows: Sequence[tuple[str, bytes]],
        *,
        ttl_ms: int,
        claim: bool = False,
    ) -> bytes | None:
        """Register ``record``'s worker with ``rows`` in flight; None when done.

        ``claim``: only if no live process of another instance (``record["instance"]``) holds
        the id; when one does, nothing is written and its record is returned (``b""`` when it
        left none). Without ``claim`` the id is taken over, whoever held it.
        """
        wid, epoch = record["worker_id"], record["epoch"]
        events = schema.encode([{"type": schema.EventType.WORKER_UP, "worker": record}])
        args: list[Any] = [
            wid,
            epoch,
            schema.encode(record),
            ttl_ms,
            schema.envelope_prefix(wid, epoch),
            events,
            record.get("instance", "") if claim else "",
            len(rows),
        ]
        for request_id, row in rows:
            args += (request_id, row)
        k = self.keys
        keys = [k.workers, k.alive, k.seq, k.active(wid), k.events]
        sent = time.time()
        result = await self._run("register", self._register, keys, args)
        if isinstance(result, int):  # registered: Redis's clock in epoch ms
            self._observe(sent, result)
            return None
        return result if isinstance(result, bytes) else str(result).encode()

    def _observe(self, sent: float, now_ms: int) -> None:
        """Measure our offset to Redis's clock from a script's answer (epoch ms, 0: refused)."""
        if now_ms > 0:
            self.clock.observe(sent, time.time(), now_ms)

    async def _timed(self, name: str, script: Any, keys: list[str], args: list[Any]) -> int:
        """Run a script that returns Redis's clock (epoch ms, 0 for "refused"), measuring our
        offset to that clock on the way."""
        sent = time.time()
        now_ms = int(await self._run(name, script, keys, args))
        self._observe(sent, now_ms)
        return now_ms

    def apply_fixed(
        self, worker_id: str, epoch: str, prefix: bytes, completed_maxlen: int, ttl_ms: int
    ) -> tuple[list[str], list[Any], list[Any]]:
        """What every batch of one (worker, epoch) passes to ``apply.lua``: its KEYS, and its
        ARGV before and after the events JSON (the publisher packs these once per epoch)."""
        k = self.keys
        keys = [k.seq, k.active(worker_id), k.completed, k.events, k.alive]
        return keys, [worker_id, epoch, prefix], [completed_maxlen, ttl_ms]

    def apply_keys_args(
        self,
        worker_id: str,
        epoch: str,
        prefix: bytes,
        events_json: bytes,
        sets: Sequence[tuple[str, bytes]],
        deletes: Sequence[str],
        completed: Sequence[schema.CompletedEntry],
        completed_maxlen: int,
        ttl_ms: int,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ``apply.lua`` (one layout for redis-py and the raw fast path)."""
        keys, head, tail = self.apply_fixed(worker_id, epoch, prefix, completed_maxlen, ttl_ms)
        return keys, [*head, events_json, *tail, *apply_batch_args(sets, deletes, completed)]

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
        ttl_ms: int,
    ) -> int:
        """Apply one batch; returns its seq. Raises :class:`NotRegistered` on epoch mismatch.

        The parameters are ``apply_keys_args``' (the publisher's raw fast path calls that one
        directly), spelled out rather than packed so both calls stay type-checked.
        """
        keys, args = self.apply_keys_args(
            worker_id,
            epoch,
            prefix,
            events_json,
            sets,
            deletes,
            completed,
            completed_maxlen,
            ttl_ms,
        )
        seq = int(await self._run("apply", self._apply, keys, args))
        if seq < 0:
            raise NotRegistered(worker_id)
        return seq

    async def heartbeat(self, worker_id: str, epoch: str, *, ttl_ms: int) -> bool:
        """True when the deadline moved; False when the epoch is no longer registered."""
        keys = [self.keys.seq, self.keys.alive]
        return await self._timed("heartbeat", self._heartbeat, keys, [worker_id, epoch, ttl_ms]) > 0

    async def remove(
        self, worker_id: str, *, reason: str, expired_only: bool = False, epoch: str = ""
    ) -> int:
        """Remove a worker: a reaper passes ``expired_only``, the worker itself its ``epoch``.

        Returns 0 when there was nothing to remove (another reaper won, or a heartbeat came in
        time on Redis's clock), else the seq of the published ``worker_down`` batch.
        """
        head = b'{"v":1,"worker_id":' + schema.encode(worker_id) + b',"epoch":'
        events = schema.encode(
            [{"type": schema.EventType.WORKER_DOWN, "worker_id": worker_id, "reason": reason}]
        )
        k = self.keys
        keys = [k.alive, k.workers, k.seq, k.active(worker_id), k.events]
        args = [worker_id, head, "expired" if expired_only else "", epoch, events]
        return int(await self._run("remove", self._remove, keys, args))

    async def redis_time_ms(self) -> int:
        """Redis's clock (epoch ms), from the node that holds the deadlines."""
        return int(await self._run("clock", self._clock, [self.keys.alive], []))

    async def probe(self) -> tuple[int, str | None]:
        """Redis's clock (epoch ms) and, when Redis refuses writes now, its refusal."""
        now, refusal = await self._run("probe", self._probe, [self.keys.alive], [PROBE_MEMBER])
        if isinstance(refusal, bytes):
            refusal = refusal.decode(errors="replace")
        return int(now), (str(refusal) or None)

    async def read_worker_state(self, worker_id: str) -> WorkerState:
        """One worker's rows, record, seq marker and deadline, read atomically (``read.lua``)."""
        k = self.keys
        keys = [k.seq, k.workers, k.alive, k.active(worker_id)]
        try:
            reply = await self._read(keys=keys, args=[worker_id])
        except ResponseError as exc:
            if not _flags_unsupported(exc):
                raise
            # A server without script flags (Redis < 7.0): the same read, unflagged. It still
            # runs at maxmemory there (only a script's first write is checked); it waits during
            # CLIENT PAUSE WRITE, as every script without flags does.
            log.info("this Redis has no script flags; reading state with an unflagged script")
            self._read = self.redis.register_script(_unflagged(_lua("read")))
            reply = await self._read(keys=keys, args=[worker_id])
        marker_raw, record_raw, deadline, flat = reply
        rows_raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return _decode_state(worker_id, marker_raw, record_raw, deadline, rows_raw)


def apply_batch_args(
    sets: Sequence[tuple[str, bytes]],
    deletes: Sequence[str],
    completed: Sequence[schema.CompletedEntry],
) -> list[Any]:
    """The ARGV of ``apply.lua`` that changes with each batch, after the fixed part."""
    args: list[Any] = [len(sets)]
    for request_id, row in sets:
        args += (request_id, row)
    args.append(len(deletes))
    args += deletes
    args.append(len(completed))
    args += [schema.completed_argument(entry) for entry in completed]
    return args


async def read_worker_state(redis: aioredis.Redis, keys: Keys, worker_id: str) -> WorkerState:
    """Read one worker's state atomically (see :meth:`WireScripts.read_worker_state`)."""
    return await WireScripts(redis, keys).read_worker_state(worker_id)


def _decode_state(
    worker_id: str,
    marker_raw: Any,
    record_raw: Any,
    deadline: Any,
    rows_raw: dict[Any, Any],
) -> WorkerState:
    """A :class:`WorkerState` from the raw reply; anything malformed is skipped and counted."""
    try:
        deadline_ms = float(deadline) if deadline is not None else None
    except (TypeError, ValueError):
        deadline_ms = None
    state = WorkerState(
        worker_id=worker_id, record=None, epoch=None, seq=0, deadline_ms=deadline_ms
    )
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
    """Every worker the hashes know of: registered records, heartbeats and seq markers.

    Three plain reads in one round trip, not a transaction (refused at maxmemory): each worker
    is then read atomically, and one that registers in between is announced on ``P:events``,
    to which the reader subscribed first."""
    async with redis.pipeline(transaction=False) as pipe:
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
