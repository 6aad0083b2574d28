"""The worker's side of cancel: which requests are in flight, and the channel that stops one.

:class:`InFlight` holds every request the middleware is tracking, by request id, so ids are
unique per worker (a client's ``X-Request-Id`` already in flight gets a fresh id) and a cancel
finds its request. What it holds per request is the request's ``scope["vdm"]`` dict: an app
that can stop a request puts an ``abort`` callable there (the reverse proxy does); a cancel
sets ``cancelled`` (who asked) and calls it. A request without one is left alone (and the
cancel logged as not possible): recording `cancelled` for it would be a lie.

:class:`CancelListener` subscribes to the worker's cancel channel (``Keys.cancel``), on which a
stream service publishes ``{"request_id": "...", "by": "..."}``. It is supervised: a lost
connection is retried with backoff, anything unexpected is logged and retried, and a message
that is not such an object is skipped and counted. Every cancel is logged, known or not.
"""

from __future__ import annotations

import asyncio
import logging
import os
from enum import StrEnum
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from vdm_hub.shared.redis_client import subscribed
from vdm_hub.shared.schema import MAX_ID_CHARS

log = logging.getLogger("vdm.cancel")

MAX_CANCEL_BYTES = 4096
MAX_BY_CHARS = 128
RETRY_MIN, RETRY_MAX = 0.1, 2.0


class CancelResult(StrEnum):
    ABORTED = "aborted"
    UNKNOWN = "unknown"  # not in flight here (finished already, or another worker's)
    NOT_ABORTABLE = "not_abortable"  # in flight, but its app offers no way to stop it


class InFlight:
    """Request id -> that request's ``scope["vdm"]`` dict, for every request in flight."""

    __slots__ = ("_requests",)

    def __init__(self) -> None:
        self._requests: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def claim(self, wanted: str | None, vdm: dict[str, Any]) -> str:
        """Register a request under ``wanted`` when that id is free, else under a fresh one."""
        request_id = wanted
        if request_id is None or request_id in self._requests:
            request_id = os.urandom(16).hex()  # like uuid4().hex, ~4x cheaper
        self._requests[request_id] = vdm
        return request_id

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def cancel(self, request_id: str, by: str) -> CancelResult:
        """Stop ``request_id`` if it is in flight here and its app can stop it."""
        vdm = self._requests.get(request_id)
        if vdm is None:
            return CancelResult.UNKNOWN
        abort = vdm.get("abort")
        if abort is None:
            # Marking it cancelled would record an outcome that did not happen.
            return CancelResult.NOT_ABORTABLE
        vdm["cancelled"] = by
        abort()
        return CancelResult.ABORTED


def parse_cancel(raw: Any) -> tuple[str, str] | None:
    """(request_id, by) from a cancel message, or None when it is not a valid one."""
    if not isinstance(raw, bytes | str) or len(raw) > MAX_CANCEL_BYTES:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    request_id, by = obj.get("request_id"), obj.get("by", "")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS:
        return None
    if not isinstance(by, str):
        return None
    return request_id, by[:MAX_BY_CHARS]


class CancelListener:
    """Applies cancel messages from ``channel`` to ``in_flight``; run :meth:`run` as a task."""

    def __init__(self, redis: aioredis.Redis, channel: str, in_flight: InFlight) -> None:
        self.redis = redis
        self.channel = channel
        self.in_flight = in_flight
        self.subscribed = asyncio.Event()
        # Counters (on /_vdm/status).
        self.cancelled = 0
        self.unknown = 0
        self.malformed = 0

    def retarget(self, channel: str) -> None:
        """Listen on ``channel`` instead (the worker's id changed): the loop resubscribes
        within a second."""
        self.channel = channel

    def handle(self, raw: Any) -> None:
        parsed = parse_cancel(raw)
        if parsed is None:
            self.malformed += 1
            # The first one is worth a look; after that the count (on /_vdm/status) says it.
            level = logging.WARNING if self.malformed == 1 else logging.DEBUG
            log.log(level, "skipped a malformed cancel message on %s", self.channel)
            return
        request_id, by = parsed
        result = self.in_flight.cancel(request_id, by)
        # %r: both come from Redis; repr keeps a crafted value from forging log lines.
        if result is CancelResult.ABORTED:
            self.cancelled += 1
            log.info("cancel of request %r asked by %r: aborting it", request_id, by)
        elif result is CancelResult.UNKNOWN:
            self.unknown += 1
            log.info("cancel of request %r asked by %r: not in flight here", request_id, by)
        else:
            self.unknown += 1
            log.warning("cancel of request %r asked by %r: its app cannot stop it", request_id, by)

    async def run(self) -> None:
        """Subscribe and apply messages until cancelled; reconnect with backoff meanwhile."""
        delay = RETRY_MIN
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    channel = self.channel
                    await pubsub.subscribe(channel)
                    await subscribed(pubsub)
                    self.subscribed.set()
                    if delay > RETRY_MIN:
                        log.info("listening for cancels on %s again", channel)
                    delay = RETRY_MIN
                    while channel == self.channel:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None and msg.get("type") == "message":
                            self.handle(msg.get("data"))
                    self.subscribed.clear()  # and subscribe to the new channel
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                if isinstance(exc, RedisError | OSError | TimeoutError):
                    # The publisher warns (once a minute) while Redis cannot be reached.
                    if delay == RETRY_MIN:
                        log.info("cancel channel lost (%s); reconnecting", exc)
                else:
                    log.exception("unexpected error in the cancel listener; restarting it")
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
