"""Whether the hub can vouch for its view: ``sync`` is ``ok`` or ``stale``, since when, and why.

A view that stopped following Redis looks exactly like a quiet fleet: the same rows (or none),
durations still ticking. So every ``update``, ``delta`` and JSON snapshot says whether the hub
could confirm its state against Redis, and the page shows ``stale`` as its own state.

Several parts of the hub watch Redis, each from its side (the ``P:events`` reader: reachable,
answering its pings, subscribed and resynced; the reaper's probe: Redis accepts writes, so
workers can heartbeat and publish). Each reports its own problem; ``sync`` is ``ok`` only when
none has one. ``sync_since`` is when ``sync`` last changed; for ``stale`` that is the last moment
the state was confirmed (the last reply heard, the last probe that passed), which is also the
moment past which durations must not tick.

Reasons are fixed phrases chosen from the kind of failure, never an exception's text: they go
to every browser, and the log has the details.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

import orjson
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoPermissionError,
    ReadOnlyError,
    RedisClusterException,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

STARTING = "not yet in sync with Redis"
UNREACHABLE = "Redis unreachable"
NOT_ANSWERING = "Redis not answering"
CREDENTIALS = "Redis refused our credentials"
LOADING = "Redis is loading its data"
OUT_OF_MEMORY = "Redis out of memory: writes refused"
SAVE_FAILED = "Redis refuses writes: its last save failed (MISCONF)"
READ_ONLY = "Redis is a read-only replica"
WRITES_REFUSED = "Redis refuses writes"
REDIS_ERROR = "Redis error"
READER_CRASHED = "the hub's reader failed (restarting)"


class Sync(StrEnum):
    OK = "ok"
    STALE = "stale"


def refusal_reason(message: str) -> str:
    """The reason for a write Redis refused, from its error reply."""
    head = message.lstrip("-").split(" ", 1)[0].upper()
    return {
        "OOM": OUT_OF_MEMORY,
        "MISCONF": SAVE_FAILED,
        "READONLY": READ_ONLY,
        "NOAUTH": CREDENTIALS,
        "WRONGPASS": CREDENTIALS,
        "NOPERM": CREDENTIALS,
        "LOADING": LOADING,
    }.get(head, WRITES_REFUSED)


def failure_reason(exc: BaseException) -> str:
    """The reason for a failed call to Redis (subclasses first: most are ConnectionErrors)."""
    if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError):
        return CREDENTIALS
    if isinstance(exc, BusyLoadingError):
        return LOADING
    if isinstance(exc, ReadOnlyError):
        return READ_ONLY
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return NOT_ANSWERING
    text = str(exc)
    # redis-py raises a bare ResponseError for some refusals (an ACL user without a password,
    # MISCONF); and the client turns READONLY into a ConnectionError (a failover).
    for word in ("NOAUTH", "WRONGPASS", "NOPERM", "MISCONF", "OOM", "READONLY", "LOADING"):
        if word in text:
            return refusal_reason(word)
    if isinstance(exc, RedisConnectionError | RedisClusterException | OSError):
        return UNREACHABLE
    return REDIS_ERROR


class SyncState:
    """The hub's ``sync``, from the problems its parts report; ``on_change`` on every change
    of what clients are told (``sync``, or the reason while stale)."""

    def __init__(
        self,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.on_change = on_change or (lambda: None)
        self._clock = clock
        self.problems: dict[str, str] = {"reader": STARTING}
        self.state = Sync.STALE
        self.since = clock()
        self.reason: str | None = STARTING
        self.stale_episodes = 0  # times it went stale after having been ok
        self._json = self._encode()

    @property
    def ok(self) -> bool:
        return self.state is Sync.OK

    def fail(self, source: str, reason: str, confirmed_at: float | None = None) -> None:
        """``source`` cannot confirm the state; ``confirmed_at`` is when it last could."""
        if self.problems.get(source) == reason:
            return
        self.problems[source] = reason
        now = self._clock()
        at = now if confirmed_at is None else min(now, max(confirmed_at, self.since))
        self._settle(at)

    def clear(self, source: str) -> None:
        if self.problems.pop(source, None) is not None:
            self._settle(self._clock())

    def _settle(self, at: float) -> None:
        state = Sync.STALE if self.problems else Sync.OK
        # The oldest problem explains it best (the others often follow from it).
        reason = next(iter(self.problems.values()), None)
        if state == self.state and reason == self.reason:
            return
        if state != self.state:
            if state is Sync.STALE:
                self.stale_episodes += 1
            self.state, self.since = state, at
        self.reason = reason
        self._json = self._encode()
        self.on_change()

    def _encode(self) -> bytes:
        fields = {"sync": self.state.value, "sync_since": round(self.since, 3)}
        return orjson.dumps({**fields, "sync_reason": self.reason})

    @property
    def fields_json(self) -> bytes:
        """``"sync":…,"sync_since":…,"sync_reason":…`` for a payload: no braces, encoded once
        per change."""
        return self._json[1:-1]

    def shown_time(self, now: float) -> float:
        """The time durations are computed at: ``now``, or while stale the last moment the
        state was confirmed (a frozen view must not show requests growing older)."""
        return now if self.state is Sync.OK else min(now, self.since)
