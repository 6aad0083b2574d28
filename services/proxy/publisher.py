"""Publishes a worker's request events into Redis, off the request path.

The middleware calls :meth:`Publisher.start`/``progress``/``end``: each is a few dict
operations and never awaits. A background task flushes what has accumulated as one batch —
one Lua call, one round trip — as soon as the previous flush returns, so batches grow with
load (every few ms under load) and a lone event goes out at once.

The publisher's own ``active`` dict is the worker's truth. That makes failures cheap to heal:
whenever Redis may have missed something — it was away, a batch failed, the queue overflowed,
the worker was reaped — the next successful flush re-registers with a new epoch and rewrites
the whole active set in one atomic step (protocol invariant 4), instead of replaying events.
Proxying never waits for any of this.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import deque
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

import shared
from services.proxy.resp import RawRedis, pack
from shared import schema
from shared.keys import Keys
from shared.redis_client import build_client
from shared.schema import Outcome, Row
from shared.settings import Settings
from shared.store import NotRegistered, WireScripts

log = logging.getLogger("vdm.publisher")

MAX_PENDING_EVENTS = 10_000  # beyond this, events are dropped (counted) and a rewrite follows
MAX_BATCH_EVENTS = 1_000
MAX_COMPLETED_BACKLOG = 2_000  # finished requests kept for the stream while Redis is away
RETRY_MIN, RETRY_MAX = 0.1, 2.0
# Leading-edge throttle of flushes: a lone event goes out at once, but then at most one Lua
# call per window. Each call costs the worker ~100-200 us of CPU (packing, the socket write and
# its reply, the task's wake-ups), and the worker proxies on the same core. Measured through
# /_vdm/status with bench/ load: at 16 connections a 2 ms window gave 0.43 calls per proxied
# request, 10 ms gives 0.14 (1 connection: 0.68 -> 0.12). A request that arrives while the
# worker is idle (the end-to-end benchmark's probes) still goes out at once; a busy worker's
# rows reach the dashboard at most 10 ms later, far below what a person can see.
FLUSH_INTERVAL = 0.010


def _public_upstream(url: str | None) -> str:
    """The upstream URL without credentials, query or fragment (it goes into Redis)."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Publisher:
    """Collects request events and flushes them to Redis in atomic batches."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis | None = None,
        *,
        upstream: str | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.keys = Keys(settings.key_prefix)
        self._own_redis = redis is None
        # No client-side retry: an apply is not idempotent, and any failure makes the next
        # flush rewrite the whole state anyway.
        self.redis = redis or build_client(settings, socket_timeout=1.0, retries=0)
        self.scripts = WireScripts(self.redis, self.keys)
        # The per-batch Lua call goes over a raw connection when it can (see resp.py).
        self._raw = RawRedis.like(self.redis)
        self.upstream = _public_upstream(upstream or settings.upstream_url)
        self.epoch = ""
        self.active: dict[str, Row] = {}
        # The batch being gathered: notice events, rows to write, rows to delete, finished.
        self._events: list[dict[str, Any]] = []
        self._starts: dict[str, dict[str, Any]] = {}  # request_id -> its pending start event
        self._progress: dict[str, dict[str, Any]] = {}  # request_id -> its pending progress
        self._completed: deque[schema.CompletedEntry] = deque(maxlen=MAX_COMPLETED_BACKLOG)
        self._needs_register = True
        self._closing = False
        self._last_flush = 0.0
        self._wakeup = asyncio.Event()
        self._registered = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = False
        # Counters (exposed on /_vdm/status; the stream service counts its own side).
        self.events_dropped = 0
        self.batches_sent = 0
        self.events_sent = 0
        self.flush_failures = 0

    # ------------------------------------------------------------------ recorder API

    def start(self, row: Row) -> None:
        rid = row["request_id"]
        self.active[rid] = row
        if self._admit():
            event = {"type": "start", "row": row}
            self._starts[rid] = event
            self._events.append(event)
            self._wakeup.set()

    def progress(self, request_id: str, fields: dict[str, Any]) -> None:
        row = self.active.get(request_id)
        if row is None:
            return
        row.update(fields)  # type: ignore[typeddict-item]
        if request_id in self._starts:
            return  # the pending start carries this same row object, now updated
        pending = self._progress.get(request_id)
        if pending is not None:
            pending.update(fields)
        elif self._admit():
            event = {"type": "progress", "request_id": request_id, **fields}
            self._progress[request_id] = event
            self._events.append(event)
            self._wakeup.set()

    def end(
        self,
        request_id: str,
        *,
        status: int,
        outcome: Outcome,
        duration_ms: float,
        bytes_out: int,
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> None:
        row = self.active.pop(request_id, None)
        if row is None:
            return
        # Dict literals, not TypedDict(...) calls: a class call with keywords costs ~1.5 us
        # more per request, on the request's own core.
        entry: schema.CompletedEntry = {
            "request_id": request_id,
            "worker_id": self.worker_id,
            "model": row["model"],
            "method": row["method"],
            "path": row["path"],
            "status": status,
            "outcome": outcome.value,
            "start_time": row["start_time"],
            "duration_ms": round(duration_ms, 3),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "bytes_out": bytes_out,
        }
        self._completed.append(entry)
        self._progress.pop(request_id, None)
        if self._admit():
            self._events.append(
                {
                    "type": "end",
                    "request_id": request_id,
                    "status": status,
                    "outcome": outcome.value,
                    "duration_ms": round(duration_ms, 3),
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "bytes_out": bytes_out,
                }
            )
        self._wakeup.set()

    def _admit(self) -> bool:
        """Should this event be queued? Not while a rewrite is due (it supersedes events);
        on overflow the event is dropped, counted, and a rewrite planned."""
        if not self._needs_register and len(self._events) < MAX_PENDING_EVENTS:
            return True
        if not self._needs_register:
            self._needs_register = True
            self._wakeup.set()
        if self.epoch:  # a notice readers will never get (before the first one, none is due)
            self.events_dropped += 1
        return False

    # ------------------------------------------------------------------ lifecycle

    async def start_background(self) -> None:
        """Start flushing and heartbeating; returns at once even if Redis is away."""
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="vdm-flush"),
            asyncio.create_task(self._heartbeat_loop(), name="vdm-heartbeat"),
        ]
        self._wakeup.set()

    async def wait_registered(self) -> None:
        """Until a registration has gone through (bound it with ``asyncio.timeout``)."""
        await self._registered.wait()

    async def close(self, grace: float = 3.0) -> None:
        """Stop the tasks, flush what is pending, deregister (publishing `worker_down`)."""
        # The loops also check ``_closing``: a cancellation that lands inside a Redis call
        # can be swallowed there (seen under benchmark load: the flush task went back to
        # waiting on ``_wakeup`` and ``close()`` hung for good). Waiting is bounded as well.
        self._closing = True
        self._wakeup.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=grace)
            for task in stuck:
                log.warning("shutdown: task %s ignored cancellation", task.get_name())
        try:
            async with asyncio.timeout(grace):
                while self._has_pending():
                    await self._flush_once()
                if self.epoch:
                    await self.scripts.remove(self.worker_id, reason="shutdown", epoch=self.epoch)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("shutdown: could not flush and deregister: %r", exc)
        if self._raw is not None:
            self._raw.close()
        if self._own_redis:
            await self.redis.aclose()

    def _has_pending(self) -> bool:
        return bool(self._events or self._completed or self._needs_register)

    # ------------------------------------------------------------------ flushing

    def record(self) -> schema.WorkerRecord:
        return schema.WorkerRecord(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self._started_at,
            upstream=self.upstream,
            version=shared.__version__,
            epoch=self.epoch,
            heartbeat_interval=self.settings.worker_heartbeat_interval,
            ttl=self.settings.worker_ttl,
            events_dropped=self.events_dropped,
        )

    _started_at = time.time()

    def _ttl_ms(self) -> int:
        # A TTL, not a deadline: Redis adds it to its own clock (this host's may be off).
        return int(self.settings.worker_ttl * 1000)

    async def _register(self) -> None:
        """New epoch; worker record, heartbeat and the whole active set in one atomic step."""
        # Everything pending is superseded by the rewrite, except finished requests.
        self._events.clear()
        self._starts.clear()
        self._progress.clear()
        self._needs_register = False
        epoch = uuid.uuid4().hex[:16]
        if self._raw is not None:
            # A (re-)registration follows a fault or a reap: the raw connection may be stale
            # (Redis restarted under it), so the next batch starts on a fresh one.
            self._raw.close()
        rows = [(rid, schema.encode_row(row)) for rid, row in list(self.active.items())]
        previous, self.epoch = self.epoch, epoch
        try:
            await self.scripts.register(self.record(), rows, ttl_ms=self._ttl_ms())
        except BaseException:
            self.epoch = previous
            self._needs_register = True
            raise
        self._registered.set()
        log.info(
            "registered worker %s (epoch %s, %d requests in flight)",
            self.worker_id,
            epoch,
            len(rows),
        )

    def _take_batch(self) -> tuple[bytes, list[tuple[str, bytes]], list[str], list[Any]]:
        events = self._events[:MAX_BATCH_EVENTS]
        del self._events[: len(events)]
        # The state change is exactly what this batch's events describe, so a reader that
        # resyncs at this seq and then applies the next batch never sees a row come back.
        rows: dict[str, Row] = {}
        deletes: list[str] = []
        for event in events:
            kind = event["type"]
            if kind == "end":
                rid = event["request_id"]
                if rows.pop(rid, None) is None:
                    deletes.append(rid)
                continue
            if kind == "start":
                rid = event["row"]["request_id"]
                self._starts.pop(rid, None)
            else:
                rid = event["request_id"]
                self._progress.pop(rid, None)
            row = self.active.get(rid)
            if row is not None:
                rows[rid] = row
        sets = [(rid, schema.encode_row(row)) for rid, row in rows.items()]
        done = [self._completed.popleft() for _ in range(min(len(self._completed), 500))]
        return schema.encode(events), sets, deletes, done

    async def _flush_once(self) -> None:
        if self._needs_register:
            await self._register()
        if not (self._events or self._completed):
            return
        events_json, sets, deletes, done = self._take_batch()
        try:
            await self._apply(events_json, sets, deletes, done)
        except NotRegistered:
            log.warning(
                "worker %s is no longer registered (reaped?); re-registering", self.worker_id
            )
            self._completed.extendleft(reversed(done))
            self._needs_register = True
            return
        except BaseException:
            # Unknown whether it applied: rewrite everything on reconnect; keep finished ones.
            self._completed.extendleft(reversed(done))
            self._needs_register = True
            raise
        self.batches_sent += 1
        self.events_sent += events_json.count(b'"type":')

    async def _apply(
        self,
        events_json: bytes,
        sets: list[tuple[str, bytes]],
        deletes: list[str],
        done: list[schema.CompletedEntry],
    ) -> None:
        """``WireScripts.apply``, packed by hand over the raw connection when there is one."""
        prefix = schema.envelope_prefix(self.worker_id, self.epoch)
        maxlen = self.settings.completed_maxlen
        ttl = self._ttl_ms()
        if self._raw is None:
            await self.scripts.apply(
                self.worker_id, self.epoch, prefix, events_json, sets, deletes, done, maxlen, ttl
            )
            return
        try:
            seq = await self._raw.call(
                pack(self._apply_command(prefix, events_json, sets, deletes, done))
            )
        except NoScriptError:  # not loaded yet (or Redis restarted): redis-py loads it
            await self.scripts.apply(
                self.worker_id, self.epoch, prefix, events_json, sets, deletes, done, maxlen, ttl
            )
            return
        if not isinstance(seq, int) or seq < 0:
            raise NotRegistered(self.worker_id)

    def _apply_command(
        self,
        prefix: bytes,
        events_json: bytes,
        sets: list[tuple[str, bytes]],
        deletes: list[str],
        done: list[schema.CompletedEntry],
    ) -> list[bytes | str | int]:
        """EVALSHA with exactly the KEYS and ARGV that ``WireScripts.apply`` sends."""
        keys, args = self.scripts.apply_keys_args(
            self.worker_id,
            self.epoch,
            prefix,
            events_json,
            sets,
            deletes,
            done,
            self.settings.completed_maxlen,
            self._ttl_ms(),
        )
        return [b"EVALSHA", self.scripts.apply_sha, len(keys), *keys, *args]

    async def _flush_loop(self) -> None:
        delay = RETRY_MIN
        while not self._closing:
            await self._wakeup.wait()
            if self._closing:
                return
            self._wakeup.clear()
            try:
                while self._has_pending():
                    rest = self._last_flush + FLUSH_INTERVAL - time.monotonic()
                    if rest > 0 and len(self._events) < MAX_BATCH_EVENTS:
                        await asyncio.sleep(rest)  # gather what else arrives meanwhile
                    self._last_flush = time.monotonic()
                    await self._flush_once()
                    if not self.connected:
                        log.info("connected to Redis")
                    self.connected = True
                    delay = RETRY_MIN
            except Exception as exc:
                # Redis errors are expected; anything else is a bug, but it must not end the
                # flush task (publishing would stop for good while proxying went on).
                self.flush_failures += 1
                if not isinstance(exc, RedisError | OSError | TimeoutError):
                    log.exception("unexpected error while flushing; rewriting state")
                elif self.connected:
                    log.warning("Redis unavailable, proxying goes on unrecorded: %s", exc)
                self.connected = False
                self._needs_register = True
                # Events gathered while Redis is away are superseded by the rewrite.
                dropped = len(self._events)
                self.events_dropped += dropped
                self._events.clear()
                self._starts.clear()
                self._progress.clear()
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                self._wakeup.set()

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.worker_heartbeat_interval
        while not self._closing:
            await asyncio.sleep(interval)
            if self._needs_register or not self.epoch:
                continue
            try:
                alive = await self.scripts.heartbeat(
                    self.worker_id, self.epoch, ttl_ms=self._ttl_ms()
                )
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("heartbeat failed: %s", exc)
                continue
            if not alive:
                log.warning("heartbeat refused (reaped or superseded); re-registering")
                self._needs_register = True
                self._wakeup.set()

    def status(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "epoch": self.epoch,
            "connected": self.connected,
            "in_flight": len(self.active),
            "events_dropped": self.events_dropped,
            "events_sent": self.events_sent,
            "batches_sent": self.batches_sent,
            "flush_failures": self.flush_failures,
        }
