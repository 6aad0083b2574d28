"""Publishes a worker's request events into Redis, off the request path.

The middleware calls :meth:`Publisher.start`/``progress``/``end``: each is a few dict
operations and never awaits. A background task flushes what has accumulated as one batch —
one Lua call, one round trip — as soon as the previous flush returns: one call is in flight at
a time, so an idle worker sends a lone event at once and a busy one sends bigger batches (what
gathered during the previous round trip), with no fixed delay anywhere. A batch is capped by
its encoded size as well as by its event count, so it always fits what readers accept.

The publisher's own ``active`` dict is the worker's truth. That makes failures cheap to heal:
whenever Redis may have missed something — it was away, a batch failed, the queue overflowed,
the worker was reaped, a heartbeat lost its connection — the next successful flush
re-registers with a new epoch and rewrites the whole active set in one atomic step (protocol
invariant 4), instead of replaying events. One incident gives one re-registration: a failure
reported for an epoch that has been replaced already is ignored. Finished requests are the
exception to "superseded by the rewrite": they are kept and sent again, unless the batch that
carried them turns out to have been applied (its reply was lost), so none is counted twice.
Proxying never waits for any of this.

The publisher also owns the worker's cancel listener (:mod:`services.proxy.cancel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from vdm_hub.services.proxy.backlog import CompletedBacklog
from vdm_hub.services.proxy.cancel import CancelListener, InFlight
from vdm_hub.services.proxy.forward import public_url
from vdm_hub.services.proxy.resp import CommandHead, RawRedis
from vdm_hub.services.proxy.workerid import WorkerIdPlan
from vdm_hub.shared import __version__, schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.redis_client import DEFAULT_REDIS_URL, build_client
from vdm_hub.shared.schema import (
    EndEvent,
    EventType,
    Outcome,
    ProgressEvent,
    RequestEvent,
    Row,
    StartEvent,
)
from vdm_hub.shared.settings import Settings, redacted_url
from vdm_hub.shared.store import NotRegistered, WireScripts, apply_batch_args

log = logging.getLogger("vdm.publisher")

MAX_PENDING_EVENTS = 10_000  # beyond this, events are dropped (counted) and a rewrite follows
MAX_BATCH_EVENTS = 1_000
# Room left in a batch for its envelope: the worker id and epoch (each at most 128
# characters, six bytes apiece when JSON escapes them), the seq and the punctuation.
ENVELOPE_ROOM = 2 * 6 * schema.MAX_ID_CHARS + 128
MAX_BATCH_BYTES = schema.MAX_MESSAGE_BYTES - ENVELOPE_ROOM
MAX_BATCH_COMPLETED = 500
PUBLISH_TIMEOUT = 3.0  # seconds a flush may wait for Redis's reply
UNREACHABLE_EVERY = 60.0  # seconds between two warnings that Redis cannot be reached
RETRY_MIN, RETRY_MAX = 0.1, 2.0
# Module globals: an enum member lookup costs ~110 ns on Python 3.11, a global ~20 ns, and
# these are read a few times per request.
START, PROGRESS, END = EventType.START, EventType.PROGRESS, EventType.END
SUPERSEDED = ""  # the type of a pending event left out of its batch


def where(settings: Settings) -> str:
    """Which Redis the settings name, for a log line (never a password)."""
    if settings.redis_mode == "sentinel":
        sentinels = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        return f"sentinel master {settings.redis_sentinel_master!r} via {sentinels}"
    url = redacted_url(settings.redis_url or DEFAULT_REDIS_URL)
    return f"{url} (cluster)" if settings.redis_mode == "cluster" else url


@dataclass
class _Unsure:
    """A batch that failed without a reply: it may or may not have been applied."""

    epoch: str
    seq: int  # the seq it gets if it was applied
    done: list[schema.CompletedEntry]


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
        # Planned again by start_background(), in the process that serves (after any fork).
        self._plan = WorkerIdPlan.here(settings.worker_id)
        self.worker_id = self._plan.first()
        self.instance = os.urandom(8).hex()
        self.keys = Keys(settings.key_prefix)
        self.started_at = time.time()
        self._own_redis = redis is None
        # No client-side retry: an apply is not idempotent, and any failure makes the next
        # flush rewrite the whole state anyway. The timeout is not a latency bound (flushes are
        # off the request path): at 1 s, a Redis or a machine busy for a second dropped the
        # pending events and forced a re-registration, and a short request could start and
        # end unseen (a loaded CI run); liveness has its own, shorter heartbeat timeout.
        self.redis = redis or build_client(settings, socket_timeout=PUBLISH_TIMEOUT, retries=0)
        self.scripts = WireScripts(self.redis, self.keys)
        # The per-batch Lua call goes over a raw connection when it can (see resp.py), its
        # fixed part packed once per (worker id, epoch).
        self._raw = RawRedis.like(self.redis)
        self._apply_head: tuple[str, str, CommandHead] | None = None
        self._apply_tail: list[Any] = []  # the fixed ARGV after the events JSON
        self.upstream = public_url(upstream or settings.upstream_url)
        self.epoch = ""
        self._seq = 0  # of the last batch applied in this epoch
        self._unsure: _Unsure | None = None
        self.active: dict[str, Row] = {}
        # Requests in flight (unique ids, cancel lookup) and the channel that cancels them,
        # unless VDM_WORKER_CANCEL=false (the record says so, and no cancel is offered).
        self.cancellable = settings.cancel
        self.in_flight = InFlight()
        self.cancels = CancelListener(self.redis, self.keys.cancel(self.worker_id), self.in_flight)
        # The batch being gathered: notice events, rows to write, rows to delete, finished.
        self._events: list[RequestEvent] = []
        self._starts: dict[str, StartEvent] = {}  # request_id -> its pending start event
        self._progress: dict[str, ProgressEvent] = {}  # request_id -> its pending progress
        # Finished requests not written yet, kept across an outage up to a bound in bytes.
        self._completed = CompletedBacklog(settings.completed_backlog_bytes)
        self._needs_register = True
        self._closing = False
        self._wakeup = asyncio.Event()
        self._registered = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected = False
        self._down_since: float | None = None  # monotonic time of the outage's first failure
        self._warned_at: float | None = None
        self._dropped_reported_at = float("-inf")
        # Counters (exposed on /_vdm/status; the stream service counts its own side).
        self.events_dropped = 0
        self.batches_sent = 0
        self.events_sent = 0
        self.flush_failures = 0
        self.heartbeat_failures = 0
        self.registrations = 0

    # ------------------------------------------------------------------ recorder API

    def start(self, row: Row) -> None:
        rid = row["request_id"]
        # On Redis's clock (measured at each heartbeat), which every reader can trust: a host
        # clock 90 s behind would otherwise show every duration 90 s long.
        offset = self.scripts.clock.offset
        if offset:
            row["start_time"] += offset
        self.active[rid] = row
        if self._admit():
            event: StartEvent = {"type": START, "row": row}
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
            pending.update(fields)  # type: ignore[typeddict-item]
        elif self._admit():
            event: ProgressEvent = {
                "type": PROGRESS,
                "request_id": request_id,
                **fields,  # type: ignore[typeddict-item]
            }
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
        ttft_ms: float | None = None,
        ttfb_ms: float | None = None,
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
            "ttft_ms": ttft_ms,
            "ttfb_ms": ttfb_ms,
            "labels": row.get("labels"),
        }
        self._completed.append(entry)
        pending = self._progress.pop(request_id, None)
        if pending is not None:
            # Not sent yet, and the end removes the row in the same batch: leave it out (a
            # non-streaming answer's first byte and its end come together). Marked, since
            # taking it out of the pending list would cost a scan.
            pending["type"] = SUPERSEDED
        if self._admit():
            done: EndEvent = {
                "type": END,
                "request_id": request_id,
                "status": status,
                "outcome": outcome.value,
                "duration_ms": round(duration_ms, 3),
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "bytes_out": bytes_out,
            }
            self._events.append(done)
        self._wakeup.set()

    def discard(self, request_id: str, status: int) -> None:
        """Take a request out of the view with no finished entry: it turned out not to be one
        to show (the app's own event stream). Readers get an ``end``, unless its ``start``
        has not gone out yet, in which case neither does."""
        if self.active.pop(request_id, None) is None:
            return
        pending = self._progress.pop(request_id, None)
        if pending is not None:
            pending["type"] = SUPERSEDED
        start = self._starts.pop(request_id, None)
        if start is not None:
            start["type"] = SUPERSEDED
            return
        if self._admit():
            done: EndEvent = {
                "type": END,
                "request_id": request_id,
                "status": status,
                "outcome": Outcome.OK.value,
                "duration_ms": 0.0,
                "input_tokens": None,
                "output_tokens": None,
                "bytes_out": 0,
            }
            self._events.append(done)
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
        self.start_tasks()

    def start_tasks(self) -> None:
        """:meth:`start_background` for a caller that cannot await (it needs a running loop)."""
        self._loop = asyncio.get_running_loop()
        self._plan = WorkerIdPlan.here(self.settings.worker_id)
        self.instance = os.urandom(8).hex()  # not the pre-fork parent's
        self._adopt_id(self._plan.first())
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="vdm-flush"),
            asyncio.create_task(self._heartbeat_loop(), name="vdm-heartbeat"),
        ]
        if self.cancellable:
            self._tasks.append(asyncio.create_task(self.cancels.run(), name="vdm-cancel"))
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
            log.warning(
                "shutdown: could not flush and deregister (%d finished requests not written): %r",
                len(self._completed),
                exc,
            )
        self._report_dropped()
        if self._raw is not None:
            self._raw.close()
        if self._own_redis:
            await self.redis.aclose()

    def close_after_loop(self, grace: float = 2.0) -> None:
        """Best effort at interpreter exit, for a publisher nothing closed (a server that sent
        no lifespan): its loop has ended, and with it its tasks and connections, so pending
        events are flushed and the worker deregistered over a fresh client on a loop of its
        own. Does nothing while that loop still runs (in another thread)."""
        if self._loop is not None and self._loop.is_running():
            return
        if self._raw is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed
                self._raw.close()
            self._raw = None
        self._tasks = []
        self._wakeup = asyncio.Event()
        self.redis = build_client(self.settings, socket_timeout=PUBLISH_TIMEOUT, retries=0)
        self._own_redis = True
        self.scripts = WireScripts(self.redis, self.keys)
        try:
            asyncio.run(self.close(grace))
        except Exception as exc:
            log.warning("at exit: could not flush and deregister: %r", exc)

    def _adopt_id(self, worker_id: str) -> None:
        """Publish under ``worker_id`` from now on (the rows in flight move with it)."""
        if worker_id == self.worker_id:
            return
        self.worker_id = worker_id
        for row in self.active.values():
            row["worker_id"] = worker_id
        self.cancels.retarget(self.keys.cancel(worker_id))
        self._needs_register = True

    def _has_pending(self) -> bool:
        return bool(
            self._events or self._completed or self._needs_register or self._unsure is not None
        )

    # ------------------------------------------------------------------ flushing

    def record(self) -> schema.WorkerRecord:
        return schema.WorkerRecord(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.started_at,
            upstream=self.upstream,
            version=__version__,
            epoch=self.epoch,
            heartbeat_interval=self.settings.worker_heartbeat_interval,
            ttl=self.settings.worker_ttl,
            events_dropped=self.events_dropped,
            instance=self.instance,
            cancellable=self.cancellable,
            completed_dropped=self._completed.dropped,
        )

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
        previous, self.epoch = self.epoch, epoch
        try:
            rows = await self._claim()
        except BaseException:
            self.epoch = previous
            self._needs_register = True
            raise
        self._needs_register = False
        self._seq = 1
        self.registrations += 1
        self._registered.set()
        if self.registrations == 1:
            # The one line that says where this process publishes, and as whom.
            log.info(
                "publishing requests to %s (key prefix %r) as worker %s",
                where(self.settings),
                self.settings.key_prefix,
                self.worker_id,
            )
        else:
            log.info(
                "registered worker %s again (epoch %s, %d requests in flight)",
                self.worker_id,
                epoch,
                len(rows),
            )

    async def _claim(self) -> list[tuple[str, bytes]]:
        """Register under the first id of the plan no other live process holds; the rows
        written. The first registration of a fixed id takes it over (it may be this very
        process's predecessor, crashed and not reaped yet); a later one, or one of an
        ``{index}`` template, only claims a free id: a process whose id was taken over while
        it lived moves on, and says so (workerid.py)."""
        claim = self._plan.indexed or self.registrations > 0
        refused: list[tuple[str, bytes]] = []  # (id, its holder's record)
        while True:
            rows = [(rid, schema.encode_row(row)) for rid, row in list(self.active.items())]
            holder = await self.scripts.register(
                self.record(), rows, ttl_ms=self._ttl_ms(), claim=claim
            )
            if holder is None:
                break
            refused.append((self.worker_id, holder))
            tried = {wid for wid, _ in refused}
            free = next((c for c in self._plan.candidates() if c not in tried), None)
            if free is None:
                raise RedisError(f"every id of VDM_WORKER_ID={self._plan.template!r} is taken")
            self._adopt_id(free)
        if refused:
            self._report_taken(*refused[0])
        return rows

    def _report_taken(self, worker_id: str, holder: bytes) -> None:
        """One line for an id this process could not have: a warning when two live processes
        were given one id (an ``{index}`` taken meanwhile is routine)."""
        try:
            record = schema.decode_worker_record(holder)
            other = f"host {record['host']}, pid {record['pid']}"
        except schema.MalformedMessage:
            other = "a process that left no readable record"
        if self._plan.indexed:
            log.info("worker id %s is held by %s; taking %s", worker_id, other, self.worker_id)
            return
        log.warning(
            "worker id %s is also in use by another live process (%s); this process (host %s, "
            "pid %d) publishes as %s from now on. Give each process its own VDM_WORKER_ID, or "
            "put {pid} or {index} in it",
            worker_id,
            other,
            self._plan.host,
            self._plan.pid,
            self.worker_id,
        )

    def _replan(self, epoch: str, why: str, level: int = logging.WARNING) -> None:
        """Plan a rewrite because a call made under ``epoch`` failed; one per incident: a
        failure reported for an epoch already replaced (or a rewrite already planned) is not
        another incident."""
        if epoch != self.epoch or self._needs_register:
            return
        log.log(level, "%s; rewriting this worker's state", why)
        self._needs_register = True
        self._wakeup.set()

    async def _settle_unsure(self) -> None:
        """Did the batch whose reply was lost apply? Its seq marker says; the finished requests
        it carried are sent again only if it did not (so none is counted twice)."""
        unsure = self._unsure
        if unsure is None:
            return
        raw = await self.redis.hget(self.keys.seq, self.worker_id)
        self._unsure = None
        try:
            marker = schema.parse_seq(raw)
        except schema.MalformedMessage:
            marker = None
        if marker == (unsure.epoch, unsure.seq):
            log.info("the batch whose reply was lost had been applied; not sending it again")
            self.batches_sent += 1
            return
        self._completed.put_back(unsure.done)

    def _take_batch(self) -> tuple[bytes, int, list[tuple[str, bytes]], list[str], list[Any]]:
        """The next batch: (events JSON, event count, rows to set, rows to delete, finished)."""
        n = min(len(self._events), MAX_BATCH_EVENTS)
        events = [event for event in self._events[:n] if event["type"] != SUPERSEDED]
        events_json = schema.encode(events)
        # Readers reject a message over MAX_MESSAGE_BYTES: halve until it fits (events are
        # at most a few KB each, so this ends long before one event is left).
        while len(events_json) > MAX_BATCH_BYTES and n > 1:
            n //= 2
            events = [event for event in self._events[:n] if event["type"] != SUPERSEDED]
            events_json = schema.encode(events)
        del self._events[:n]
        # The state change is exactly what this batch's events describe, so a reader that
        # resyncs at this seq and then applies the next batch never sees a row come back.
        rows: dict[str, Row] = {}
        deletes: list[str] = []
        for event in events:
            kind = event["type"]
            if kind == START:
                rid = cast(StartEvent, event)["row"]["request_id"]
                self._starts.pop(rid, None)
            else:
                rid = cast(EndEvent | ProgressEvent, event)["request_id"]
                if kind == END:
                    if rows.pop(rid, None) is None:
                        deletes.append(rid)
                    continue
                self._progress.pop(rid, None)
            row = self.active.get(rid)
            if row is not None:
                rows[rid] = row
        sets = [(rid, schema.encode_row(row)) for rid, row in rows.items()]
        done = self._completed.take(MAX_BATCH_COMPLETED)
        return events_json, len(events), sets, deletes, done

    async def _flush_once(self) -> None:
        if self._unsure is not None:
            await self._settle_unsure()
        if self._needs_register:
            await self._register()
        if not (self._events or self._completed):
            return
        events_json, count, sets, deletes, done = self._take_batch()
        epoch = self.epoch
        try:
            seq = await self._apply(events_json, sets, deletes, done)
        except NotRegistered:
            self._completed.put_back(done)
            self._replan(
                epoch,
                f"worker {self.worker_id} is no longer registered (reaped or superseded)",
                logging.INFO,  # the registration that follows says which, when it matters
            )
            return
        except BaseException:
            # Unknown whether it applied: rewrite everything; whether its finished requests
            # went in is settled before they are sent again.
            self._unsure = _Unsure(epoch, self._seq + 1, done)
            self._needs_register = True
            raise
        self._seq = seq if seq > 0 else self._seq + 1
        self.batches_sent += 1
        self.events_sent += count

    async def _apply(
        self,
        events_json: bytes,
        sets: list[tuple[str, bytes]],
        deletes: list[str],
        done: list[schema.CompletedEntry],
    ) -> int:
        """``WireScripts.apply``, packed by hand over the raw connection when there is one;
        returns the batch's seq."""
        if self._raw is not None:
            try:
                seq = await self._raw.call(self._packed_apply(events_json, sets, deletes, done))
            except NoScriptError:  # not loaded yet (or Redis restarted): redis-py loads it
                pass
            else:
                if not isinstance(seq, int) or seq < 0:
                    raise NotRegistered(self.worker_id)
                return seq
        prefix = schema.envelope_prefix(self.worker_id, self.epoch)
        maxlen = self.settings.completed_maxlen
        return await self.scripts.apply(
            self.worker_id, self.epoch, prefix, events_json, sets, deletes, done, maxlen,
            self._ttl_ms(),
        )  # fmt: skip

    def _packed_apply(
        self,
        events_json: bytes,
        sets: list[tuple[str, bytes]],
        deletes: list[str],
        done: list[schema.CompletedEntry],
    ) -> bytes:
        """EVALSHA with exactly the KEYS and ARGV that ``WireScripts.apply`` sends, packed."""
        wid, epoch = self.worker_id, self.epoch
        if self._apply_head is None or self._apply_head[:2] != (wid, epoch):
            prefix = schema.envelope_prefix(wid, epoch)
            keys, fixed, tail = self.scripts.apply_fixed(
                wid, epoch, prefix, self.settings.completed_maxlen, self._ttl_ms()
            )
            head = CommandHead([b"EVALSHA", self.scripts.apply_sha, len(keys), *keys, *fixed])
            self._apply_head = (wid, epoch, head)
            self._apply_tail = tail
        return self._apply_head[2].pack(
            [events_json, *self._apply_tail, *apply_batch_args(sets, deletes, done)]
        )

    async def _flush_loop(self) -> None:
        delay = RETRY_MIN
        while not self._closing:
            await self._wakeup.wait()
            if self._closing:
                return
            self._wakeup.clear()
            try:
                # No delay between flushes: what arrived during one round trip is the next
                # batch, so batches grow with the load and a lone event goes out at once.
                while self._has_pending():
                    # One pass of the event loop first (no time): the requests woken together
                    # with this task add their events to this batch, not to the next call.
                    await asyncio.sleep(0)
                    await self._flush_once()
                    if self._down_since is not None:
                        took = time.monotonic() - self._down_since
                        log.info("Redis is back after %.1f s", took)
                        self._down_since = None
                        self._report_dropped()
                    elif self._completed.unreported:
                        self._report_dropped(UNREACHABLE_EVERY)
                    self.connected = True
                    delay = RETRY_MIN
            except Exception as exc:
                # Redis errors are expected; anything else is a bug, but it must not end the
                # flush task (publishing would stop for good while proxying went on).
                self.flush_failures += 1
                if not isinstance(exc, RedisError | OSError | TimeoutError):
                    log.exception("unexpected error while flushing; rewriting state")
                else:
                    self._warn_unreachable(exc)
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

    def _warn_unreachable(self, exc: BaseException) -> None:
        """While Redis cannot be reached, say so at most once a minute (from the start on)."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if self._warned_at is None or now - self._warned_at >= UNREACHABLE_EVERY:
            self._warned_at = now
            log.warning(
                "Redis at %s cannot be reached (%s): requests are served but not published "
                "until it is back (%d finished requests kept meanwhile)",
                where(self.settings),
                exc or type(exc).__name__,
                len(self._completed) + (len(self._unsure.done) if self._unsure else 0),
            )

    def _report_dropped(self, every: float = 0.0) -> None:
        """Say how many finished requests the backlog's bound cost: once per outage (at its
        end, or at shutdown), at most once a minute when Redis was reachable but too slow."""
        now = time.monotonic()
        if self._completed.unreported and now - self._dropped_reported_at >= every:
            log.warning(
                "%d finished requests were dropped, the oldest first, to keep at most "
                "VDM_COMPLETED_BACKLOG_BYTES=%d bytes of them while Redis could not take them",
                self._completed.unreported,
                self._completed.limit,
            )
            self._completed.unreported = 0
            self._dropped_reported_at = now

    def _heartbeat_timeout(self) -> float:
        """A heartbeat's own bound: a fifth of the TTL (0.5-2 s), so a few retries fit in it."""
        return max(0.5, min(2.0, self.settings.worker_ttl / 5))

    async def _heartbeat_once(self) -> bool:
        """One heartbeat; False when it failed (and should be retried soon)."""
        epoch = self.epoch
        try:
            async with asyncio.timeout(self._heartbeat_timeout()):
                alive = await self.scripts.heartbeat(self.worker_id, epoch, ttl_ms=self._ttl_ms())
        except (RedisConnectionError, ConnectionError) as exc:
            # The connection broke: Redis may have restarted, maybe from an old snapshot that
            # still holds this epoch with rows long gone. Same rule as a failed flush.
            self.heartbeat_failures += 1
            self._replan(epoch, f"heartbeat lost its connection to Redis ({exc})", logging.INFO)
            return False
        except (RedisError, OSError, TimeoutError) as exc:
            self.heartbeat_failures += 1
            log.debug("heartbeat failed (%s); retrying", exc or type(exc).__name__)
            return False
        if not alive:
            self._replan(epoch, "heartbeat refused (reaped or superseded)", logging.INFO)
        return True

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.worker_heartbeat_interval
        wait = interval
        while not self._closing:
            await asyncio.sleep(wait)
            if self._needs_register or not self.epoch:
                wait = interval  # the registration itself sets the deadline
                continue
            try:
                ok = await self._heartbeat_once()
            except Exception:
                # A bug must not end the loop: without heartbeats a live worker gets reaped.
                log.exception("unexpected error in the heartbeat; retrying")
                ok = False
            # A failed heartbeat is retried soon (doubling), not a whole interval later.
            wait = interval if ok else min(interval, RETRY_MIN if wait >= interval else wait * 2)

    @property
    def pending_events(self) -> int:
        """Events queued for the next flush (a source that must not overflow the queue reads it)."""
        return len(self._events)

    def status(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "epoch": self.epoch,
            "connected": self.connected,
            "in_flight": len(self.active),
            "events_dropped": self.events_dropped,
            "completed_kept": len(self._completed),
            "completed_kept_bytes": self._completed.bytes,
            "completed_dropped": self._completed.dropped,
            "events_sent": self.events_sent,
            "batches_sent": self.batches_sent,
            "flush_failures": self.flush_failures,
            "heartbeat_failures": self.heartbeat_failures,
            "registrations": self.registrations,
            "cancels": {
                "applied": self.cancels.cancelled,
                "unknown": self.cancels.unknown,
                "malformed": self.cancels.malformed,
            },
        }
