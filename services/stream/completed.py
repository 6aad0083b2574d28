"""``GET /metrics/completed``: find a recent finished request in the ``P:completed`` stream.

The stream keeps the last ``VDM_COMPLETED_MAXLEN`` finished requests (10,000 by default); the
summary shows only the last 50. This endpoint searches all of them, newest first, with
filters: ``request_id`` (a prefix), ``worker_id``, ``model``, ``outcome``, ``status`` (exact),
``since``/``until`` (epoch seconds, inclusive, of the time the entry was recorded: its stream
id, Redis's clock, i.e. when the request finished), ``limit`` (1-500, default 50) and
``before`` (the cursor of a previous answer).

Bounded work per call: entries are read with XREVRANGE in pages of ``PAGE`` and at most
``SCAN_BUDGET`` are examined, whatever the filters. An answer is
``{"entries": [entry…], "next": cursor | null, "scanned": n}``: ``next`` is set whenever the
search stopped before the end of the range, because ``limit`` entries were found or because
the budget ran out (then ``entries`` may hold fewer than ``limit``, even none); passing it as
``before`` continues exactly there. ``null`` means the range holds nothing more. Time bounds
narrow the range itself (stream ids are times), so they cost nothing to apply.

Entries are decoded like everywhere else (``schema.decode_completed``); a malformed one is
skipped here and not counted again: the completed-stream reader (``stats.py``) counts every
entry it cannot decode once, in ``vdm_messages_malformed_total``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.responses import JSONResponse

log = logging.getLogger("vdm.stream.completed")

PATH = "/metrics/completed"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
PAGE = 250  # entries per XREVRANGE
SCAN_BUDGET = 5_000  # entries examined per call at most
SEARCH_TIMEOUT = 5.0  # seconds; Redis that slow gets a 503, not a hanging request
MAX_SEQ = (1 << 64) - 1  # the largest sequence part of a stream id
_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_OUTCOMES = frozenset(o.value for o in schema.Outcome)


class BadQuery(ValueError):
    """A query parameter that cannot be used; the message names it and says what fits."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


StreamId = tuple[int, int]


def parse_stream_id(text: str) -> StreamId | None:
    match = _STREAM_ID.fullmatch(text)
    if match is None:
        return None
    ms, seq = int(match.group(1)), int(match.group(2))
    return (ms, seq) if ms <= MAX_SEQ and seq <= MAX_SEQ else None


def _format(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def _just_before(stream_id: StreamId) -> StreamId | None:
    """The largest id below ``stream_id`` (exclusive ranges without Redis 6.2's ``(`` form)."""
    ms, seq = stream_id
    if seq > 0:
        return ms, seq - 1
    return (ms - 1, MAX_SEQ) if ms > 0 else None


@dataclass(frozen=True)
class CompletedQuery:
    request_id: str | None = None  # a prefix
    worker_id: str | None = None
    model: str | None = None
    outcome: str | None = None
    status: int | None = None
    since: float | None = None
    until: float | None = None
    limit: int = DEFAULT_LIMIT
    before: StreamId | None = None

    def matches(self, entry: schema.CompletedEntry) -> bool:
        return (
            (self.request_id is None or entry["request_id"].startswith(self.request_id))
            and (self.worker_id is None or entry["worker_id"] == self.worker_id)
            and (self.model is None or entry["model"] == self.model)
            and (self.outcome is None or entry["outcome"] == self.outcome)
            and (self.status is None or entry["status"] == self.status)
        )

    def newest(self) -> StreamId | None:
        """The newest id the range may hold (None: the stream's end, ``+``)."""
        bounds: list[StreamId] = []
        below = None if self.before is None else _just_before(self.before)
        if below is not None:
            bounds.append(below)
        if self.until is not None:
            bounds.append((math.floor(self.until * 1000), MAX_SEQ))
        return min(bounds) if bounds else None

    def oldest(self) -> str:
        return "-" if self.since is None else str(math.ceil(self.since * 1000))


def _text(params: Any, name: str, limit: int) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if len(value) > limit:
        raise BadQuery(name, f"{name}: at most {limit} characters")
    return str(value)


def _epoch(params: Any, name: str) -> float | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadQuery(name, f"{name}={raw[:40]!r}: expected epoch seconds (a number)") from None
    if not math.isfinite(value) or not 0 <= value < 1e11:
        raise BadQuery(name, f"{name}={raw[:40]!r}: expected epoch seconds (a number)")
    return value


def _whole(params: Any, name: str, low: int, high: int) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise BadQuery(name, f"{name}={raw[:40]!r}: expected a whole number from {low} to {high}")
    return int(raw)


def parse_query(params: Any) -> CompletedQuery:
    """The search a query string asks for (``params``: a mapping of str to str)."""
    outcome = _text(params, "outcome", 32)
    if outcome is not None and outcome not in _OUTCOMES:
        raise BadQuery("outcome", f"outcome: one of {', '.join(sorted(_OUTCOMES))}")
    before_raw = _text(params, "before", 41)
    before = None if before_raw is None else parse_stream_id(before_raw)
    if before_raw is not None and before is None:
        raise BadQuery("before", "before: the 'next' cursor of an earlier answer")
    since, until = _epoch(params, "since"), _epoch(params, "until")
    if since is not None and until is not None and since > until:
        raise BadQuery("since", "since: must not be later than until")
    limit = _whole(params, "limit", 1, MAX_LIMIT)
    return CompletedQuery(
        request_id=_text(params, "request_id", schema.MAX_ID_CHARS),
        worker_id=_text(params, "worker_id", schema.MAX_ID_CHARS),
        model=_text(params, "model", schema.MAX_MODEL_CHARS),
        outcome=outcome,
        status=_whole(params, "status", 0, 999),
        since=since,
        until=until,
        limit=DEFAULT_LIMIT if limit is None else limit,
        before=before,
    )


def _decoded(entry_id: Any, fields: Any) -> schema.CompletedEntry | None:
    try:
        return schema.decode_completed(entry_id, fields)
    except schema.MalformedMessage:
        return None  # counted once by the completed-stream reader (see the module docstring)


def _id_of(entry_id: Any) -> StreamId:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    parsed = parse_stream_id(text)
    if parsed is None:  # Redis only hands out well-formed ids
        raise RedisError(f"unexpected stream id {text[:48]!r}")
    return parsed


async def search(
    redis: aioredis.Redis, keys: Keys, query: CompletedQuery, *, budget: int = SCAN_BUDGET
) -> dict[str, Any]:
    """Newest first, at most ``query.limit`` matches and ``budget`` entries examined."""
    found: list[schema.CompletedEntry] = []
    if query.before == (0, 0):
        return _answer(found, None, 0)  # nothing is older than the first possible id
    newest = query.newest()
    oldest = query.oldest()
    scanned = 0
    while True:
        count = min(PAGE, budget - scanned)
        top = "+" if newest is None else _format(newest)
        page: Any = await redis.xrevrange(keys.completed, max=top, min=oldest, count=count)
        for position, (raw_id, fields) in enumerate(page):
            scanned += 1
            entry_id = _id_of(raw_id)
            entry = _decoded(raw_id, fields)
            if entry is not None and query.matches(entry):
                found.append(entry)
                if len(found) == query.limit:
                    last_of_range = len(page) < count and position == len(page) - 1
                    return _answer(found, None if last_of_range else entry_id, scanned)
            newest = _just_before(entry_id)
        if len(page) < count or newest is None:
            return _answer(found, None, scanned)  # the range holds nothing more
        if scanned >= budget:
            return _answer(found, _id_of(page[-1][0]), scanned)


def _answer(
    entries: list[schema.CompletedEntry], next_id: StreamId | None, scanned: int
) -> dict[str, Any]:
    return {
        "entries": entries,
        "next": None if next_id is None else _format(next_id),
        "scanned": scanned,
    }


# What the OpenAPI schema says about the query (the route reads the raw query string itself,
# so a bad value is a 400 with a message naming it, not FastAPI's 422).
_OUTCOME_SCHEMA = {"type": "string", "enum": sorted(_OUTCOMES)}
_PARAMETERS: list[dict[str, Any]] = [
    {"name": name, "in": "query", "required": False, "description": text, "schema": schema_}
    for name, text, schema_ in [
        ("request_id", "a prefix of the request id", {"type": "string", "maxLength": 128}),
        ("worker_id", "the worker, exactly", {"type": "string", "maxLength": 128}),
        ("model", "the model as the client sent it, exactly", {"type": "string"}),
        ("outcome", "ok, error, upstream_error, client_closed or cancelled", _OUTCOME_SCHEMA),
        ("status", "the HTTP status (0: none was sent)", {"type": "integer", "maximum": 999}),
        ("since", "finished at or after (epoch seconds)", {"type": "number", "minimum": 0}),
        ("until", "finished at or before (epoch seconds)", {"type": "number", "minimum": 0}),
        ("limit", f"entries per answer, 1-{MAX_LIMIT} [{DEFAULT_LIMIT}]", {"type": "integer"}),
        ("before", "the `next` cursor of an earlier answer", {"type": "string"}),
    ]
]


def completed_router(redis: aioredis.Redis, keys: Keys) -> APIRouter:
    router = APIRouter()

    @router.get(PATH, openapi_extra={"parameters": _PARAMETERS})
    async def completed(request: Request) -> Response:
        try:
            query = parse_query(request.query_params)
        except BadQuery as exc:
            body = {"error": "bad_parameter", "parameter": exc.parameter, "message": str(exc)}
            return JSONResponse(body, 400)
        try:
            async with asyncio.timeout(SEARCH_TIMEOUT):
                return JSONResponse(await search(redis, keys, query))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("completed search failed: Redis unavailable (%s)", type(exc).__name__)
            body = {
                "error": "redis_unavailable",
                "message": "Redis did not answer the search; retry when /readyz answers 200.",
            }
            return JSONResponse(body, 503)

    return router
