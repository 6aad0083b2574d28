"""Wire schema v1: the one place that encodes and decodes what crosses Redis.

Writers (the worker) use the ``encode_*``/``make_*`` helpers; readers (the stream service, tests,
third-party tools) use the ``decode_*`` functions, which treat their input as untrusted: any
bytes in, either a valid value out or :class:`MalformedMessage`. Nothing else escapes.
See ``docs/protocol.md`` for the prose version of this module.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Final, NotRequired, TypedDict

import orjson

from vdm_hub.shared.keys import PROTOCOL_VERSION

# What a reader assumes for a worker record that does not say (and the workers' defaults).
DEFAULT_HEARTBEAT_INTERVAL_S: Final = 2.0
DEFAULT_WORKER_TTL_S: Final = 10.0
# The group of a request whose client sent no model (stats, metrics, in-flight counts).
UNKNOWN_MODEL: Final = "unknown"

# Size limits. A reader rejects anything larger; a writer clamps so it never produces it.
MAX_MESSAGE_BYTES: Final = 1 << 20  # one pub/sub batch
MAX_EVENTS_PER_BATCH: Final = 4096
MAX_ROW_BYTES: Final = 4096  # one JSON row in an active hash
MAX_RECORD_BYTES: Final = 4096  # one JSON worker record
MAX_ID_CHARS: Final = 128  # request_id, worker_id, epoch
MAX_PATH_CHARS: Final = 512
MAX_MODEL_CHARS: Final = 128
MAX_METHOD_CHARS: Final = 16
MAX_PROVIDER_CHARS: Final = 32
MAX_TEXT_CHARS: Final = 256  # host, upstream, version, reasons


class MalformedMessage(ValueError):
    """Input read from Redis that does not follow wire protocol v1; skip it and count it."""


class Phase(StrEnum):
    UPSTREAM = "upstream"  # waiting for the first response byte
    STREAMING = "streaming"  # response bytes are flowing to the client


class Outcome(StrEnum):
    OK = "ok"
    # The upstream answered with a status >= 400, or the worker itself broke the request off:
    # an exception in the app, or the shutdown grace ran out while it was in flight.
    ERROR = "error"
    CLIENT_CLOSED = "client_closed"  # the client went away before the response was complete
    UPSTREAM_ERROR = "upstream_error"  # the upstream could not be reached or broke off
    CANCELLED = "cancelled"  # an operator cancelled the request (the worker's cancel channel)


class EventType(StrEnum):
    START = "start"
    PROGRESS = "progress"
    END = "end"
    WORKER_UP = "worker_up"
    WORKER_DOWN = "worker_down"


class Row(TypedDict):
    """A request in flight, as stored in ``P:active:{worker_id}`` (no ``duration_ms``).

    ``ttft_ms``, ``chunks_out``, ``ttfb_ms`` and ``last_output_at`` came later within v1: a
    decoded row always has them (null when a writer did not send them), and the reference
    worker always writes them.
    """

    request_id: str
    worker_id: str
    method: str
    path: str
    model: str | None
    provider: str | None
    is_streaming: bool
    start_time: float
    phase: str
    bytes_out: int
    input_tokens: int | None
    output_tokens: int | None
    # Milliseconds from the start to the first generated output (time to first token): the
    # first SSE event that carries output, or the first body byte of any other response.
    ttft_ms: NotRequired[float | None]
    # SSE `data:` events forwarded so far; null for a response that is not an event stream.
    chunks_out: NotRequired[int | None]
    # Milliseconds from the start to the first response body byte; null until then.
    ttfb_ms: NotRequired[float | None]
    # Epoch seconds of the last output event (an SSE data event, or a body chunk of any other
    # response); refreshed with bytes_out and chunks_out.
    last_output_at: NotRequired[float | None]


class WorkerRecord(TypedDict):
    worker_id: str
    host: str
    pid: int
    started_at: float
    upstream: str
    version: str
    epoch: str
    heartbeat_interval: float
    ttl: float
    # Notices this worker could not publish (queue overflow, Redis away); see publisher.py.
    events_dropped: NotRequired[int]
    # False when the worker cannot stop its requests (it does not listen for cancels); a
    # record without it (older workers, which all listen) means true.
    cancellable: NotRequired[bool]


class StartEvent(TypedDict):
    """A request began; carries its whole row."""

    type: str  # EventType.START
    row: Row


class ProgressEvent(TypedDict):
    """Changed fields of a request in flight (any of :data:`PROGRESS_FIELDS`)."""

    type: str  # EventType.PROGRESS
    request_id: str


class EndEvent(TypedDict):
    """A request finished; the row goes (its completed entry is in the completed stream)."""

    type: str  # EventType.END
    request_id: str
    status: int
    outcome: str
    duration_ms: float
    input_tokens: int | None
    output_tokens: int | None
    bytes_out: int


# What a worker's batch carries about its requests (worker_up/down are the stream service's).
RequestEvent = StartEvent | ProgressEvent | EndEvent


class Batch(TypedDict):
    v: int
    worker_id: str
    epoch: str
    seq: int
    events: list[dict[str, Any]]


class CompletedEntry(TypedDict):
    request_id: str
    worker_id: str
    model: str | None
    method: str
    path: str
    status: int
    outcome: str
    start_time: float
    duration_ms: float
    input_tokens: int | None
    output_tokens: int | None
    bytes_out: int
    # Milliseconds from the start to the first generated output; null when none came.
    ttft_ms: NotRequired[float | None]
    # Milliseconds from the start to the first response body byte; null when none came.
    ttfb_ms: NotRequired[float | None]
    id: NotRequired[str]


ROW_FIELDS: Final = tuple(Row.__annotations__)
PROGRESS_FIELDS: Final = frozenset(
    {
        "phase",
        "bytes_out",
        "input_tokens",
        "output_tokens",
        "model",
        "is_streaming",
        "ttft_ms",
        "chunks_out",
        "ttfb_ms",
        "last_output_at",
    }
)
# Order of the fields of a completed entry as passed to the apply script (shared/lua/apply.lua).
# `ttft_ms` and `ttfb_ms` are read when an entry has them (see decode_completed); the script
# writes these.
COMPLETED_FIELDS: Final = (
    "request_id",
    "worker_id",
    "model",
    "method",
    "path",
    "status",
    "outcome",
    "start_time",
    "duration_ms",
    "input_tokens",
    "output_tokens",
    "bytes_out",
    "ttft_ms",
    "ttfb_ms",
)
# The progress fields that are a duration or a time (the other numbers are counts).
_TIME_FIELDS: Final = frozenset({"ttft_ms", "ttfb_ms", "last_output_at"})
_PHASES: Final = frozenset(p.value for p in Phase)
_OUTCOMES: Final = frozenset(o.value for o in Outcome)


# --------------------------------------------------------------------------- writing


def clamp(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def encode(value: Any) -> bytes:
    return orjson.dumps(value)


def encode_row(row: Row) -> bytes:
    return orjson.dumps(row)


def envelope_prefix(worker_id: str, epoch: str) -> bytes:
    """Everything of a batch before the sequence number; the Lua script appends the rest.

    The script picks ``seq`` itself, inside the same atomic step that changes the state, so a
    batch's number always matches the state it describes.
    """
    return (
        b'{"v":%d,"worker_id":' % PROTOCOL_VERSION
        + orjson.dumps(worker_id)
        + b',"epoch":'
        + orjson.dumps(epoch)
        + b',"seq":'
    )


def completed_values(entry: CompletedEntry) -> list[str]:
    """Stream field values in :data:`COMPLETED_FIELDS` order; ``None`` (or a field added
    later that this entry lacks) becomes ``""``."""
    out: list[str] = []
    for name in COMPLETED_FIELDS:
        value = entry.get(name)
        out.append("" if value is None else str(value))
    return out


# --------------------------------------------------------------------------- reading


def _load(raw: bytes | str, limit: int) -> Any:
    if len(raw) > limit:
        raise MalformedMessage(f"message of {len(raw)} bytes is over the {limit}-byte limit")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None


def _text(obj: dict[str, Any], name: str, limit: int, *, nullable: bool = False) -> str | None:
    value = obj.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, str) or len(value) > limit or (not nullable and not value):
        raise MalformedMessage(f"{name!r} must be a string of at most {limit} characters")
    return value


def _number(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MalformedMessage(f"{name!r} must be a finite number")
    return float(value)


def _nonnegative(obj: dict[str, Any], name: str) -> float | None:
    """A duration or a time that may be null (or absent: a field added later within v1)."""
    value = obj.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise MalformedMessage(f"{name!r} must be a non-negative number or null")
    return float(value)


def _count(obj: dict[str, Any], name: str, *, nullable: bool = False) -> int | None:
    value = obj.get(name)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 53:
        raise MalformedMessage(f"{name!r} must be a non-negative integer")
    return value


def _bool(obj: dict[str, Any], name: str) -> bool:
    value = obj.get(name)
    if not isinstance(value, bool):
        raise MalformedMessage(f"{name!r} must be true or false")
    return value


def _phase(obj: dict[str, Any]) -> str:
    value = obj.get("phase")
    # isinstance first: `[] in frozenset` raises TypeError (unhashable), which must not escape.
    if not isinstance(value, str) or value not in _PHASES:
        raise MalformedMessage(f"'phase' must be one of {sorted(_PHASES)}")
    return str(value)


_ROW_KEYS: Final = frozenset(Row.__annotations__)


def _fast_row(obj: dict[str, Any]) -> Row | None:
    """The row when every field is well-formed, checked in one pass of exact type checks (the
    hub validates every start event it ingests: tens of thousands a second); None sends
    anything unusual (ints where floats are expected, bad values) down the field-by-field
    path below, which decides and names what is wrong."""
    get = obj.get
    rid, wid, method, path = get("request_id"), get("worker_id"), get("method"), get("path")
    model, provider, streaming = get("model"), get("provider"), get("is_streaming")
    start, phase, sent = get("start_time"), get("phase"), get("bytes_out")
    tokens_in, tokens_out = get("input_tokens"), get("output_tokens")
    ttft, chunks = get("ttft_ms"), get("chunks_out")
    ttfb, last_output = get("ttfb_ms"), get("last_output_at")
    if (
        type(rid) is str
        and 0 < len(rid) <= MAX_ID_CHARS
        and type(wid) is str
        and 0 < len(wid) <= MAX_ID_CHARS
        and type(method) is str
        and 0 < len(method) <= MAX_METHOD_CHARS
        and type(path) is str
        and 0 < len(path) <= MAX_PATH_CHARS
        and (model is None or (type(model) is str and len(model) <= MAX_MODEL_CHARS))
        and (provider is None or (type(provider) is str and len(provider) <= MAX_PROVIDER_CHARS))
        and type(streaming) is bool
        and type(start) is float
        and math.isfinite(start)
        and type(phase) is str
        and phase in _PHASES
        and type(sent) is int
        and 0 <= sent < 1 << 53
        and (tokens_in is None or (type(tokens_in) is int and 0 <= tokens_in < 1 << 53))
        and (tokens_out is None or (type(tokens_out) is int and 0 <= tokens_out < 1 << 53))
        and (ttft is None or (type(ttft) is float and 0 <= ttft < math.inf))
        and (chunks is None or (type(chunks) is int and 0 <= chunks < 1 << 53))
        and (ttfb is None or (type(ttfb) is float and 0 <= ttfb < math.inf))
        and (last_output is None or (type(last_output) is float and 0 <= last_output < math.inf))
    ):
        if obj.keys() == _ROW_KEYS:  # exactly the fields checked: the dict itself will do
            return obj  # type: ignore[return-value]
        # Fields a later protocol version added are dropped; ones an earlier writer did not
        # send yet are null.
        return Row(
            request_id=rid,
            worker_id=wid,
            method=method,
            path=path,
            model=model,
            provider=provider,
            is_streaming=streaming,
            start_time=start,
            phase=phase,
            bytes_out=sent,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            ttft_ms=ttft,
            chunks_out=chunks,
            ttfb_ms=ttfb,
            last_output_at=last_output,
        )
    return None


def validate_row(obj: Any) -> Row:
    if not isinstance(obj, dict):
        raise MalformedMessage("a row must be a JSON object")
    fast = _fast_row(obj)
    return fast if fast is not None else _checked_row(obj)


def _checked_row(obj: dict[str, Any]) -> Row:
    """Field by field: slower than :func:`_fast_row`, and names the first bad field."""
    return Row(
        request_id=_text(obj, "request_id", MAX_ID_CHARS),  # type: ignore[typeddict-item]
        worker_id=_text(obj, "worker_id", MAX_ID_CHARS),  # type: ignore[typeddict-item]
        method=_text(obj, "method", MAX_METHOD_CHARS),  # type: ignore[typeddict-item]
        path=_text(obj, "path", MAX_PATH_CHARS),  # type: ignore[typeddict-item]
        model=_text(obj, "model", MAX_MODEL_CHARS, nullable=True),
        provider=_text(obj, "provider", MAX_PROVIDER_CHARS, nullable=True),
        is_streaming=_bool(obj, "is_streaming"),
        start_time=_number(obj, "start_time"),
        phase=_phase(obj),
        bytes_out=_count(obj, "bytes_out"),  # type: ignore[typeddict-item]
        input_tokens=_count(obj, "input_tokens", nullable=True),
        output_tokens=_count(obj, "output_tokens", nullable=True),
        ttft_ms=_nonnegative(obj, "ttft_ms"),
        chunks_out=_count(obj, "chunks_out", nullable=True),
        ttfb_ms=_nonnegative(obj, "ttfb_ms"),
        last_output_at=_nonnegative(obj, "last_output_at"),
    )


def decode_row(raw: bytes | str) -> Row:
    return validate_row(_load(raw, MAX_ROW_BYTES))


def decode_worker_record(raw: bytes | str) -> WorkerRecord:
    obj = _load(raw, MAX_RECORD_BYTES)
    if not isinstance(obj, dict):
        raise MalformedMessage("a worker record must be a JSON object")
    return _validate_record(obj)


def _validate_record(obj: dict[str, Any]) -> WorkerRecord:
    pid = _count(obj, "pid")
    record = WorkerRecord(
        worker_id=_text(obj, "worker_id", MAX_ID_CHARS),  # type: ignore[typeddict-item]
        host=_text(obj, "host", MAX_TEXT_CHARS),  # type: ignore[typeddict-item]
        pid=pid,  # type: ignore[typeddict-item]
        started_at=_number(obj, "started_at"),
        upstream=_text(obj, "upstream", MAX_TEXT_CHARS, nullable=True) or "",
        version=_text(obj, "version", MAX_TEXT_CHARS, nullable=True) or "",
        epoch=_text(obj, "epoch", MAX_ID_CHARS),  # type: ignore[typeddict-item]
        heartbeat_interval=_number(obj, "heartbeat_interval")
        if "heartbeat_interval" in obj
        else DEFAULT_HEARTBEAT_INTERVAL_S,
        ttl=_number(obj, "ttl") if "ttl" in obj else DEFAULT_WORKER_TTL_S,
    )
    if "events_dropped" in obj:
        record["events_dropped"] = _count(obj, "events_dropped")  # type: ignore[typeddict-item]
    if "cancellable" in obj:
        record["cancellable"] = _bool(obj, "cancellable")
    return record


def _fast_end(obj: dict[str, Any]) -> dict[str, Any] | None:
    """An `end` event in one pass of exact type checks (see :func:`_fast_row`)."""
    get = obj.get
    rid, status, outcome = get("request_id"), get("status"), get("outcome")
    took = get("duration_ms")
    tokens_in, tokens_out = get("input_tokens"), get("output_tokens")
    if (
        type(rid) is str
        and 0 < len(rid) <= MAX_ID_CHARS
        and type(status) is int
        and 0 <= status < 1 << 53
        and type(outcome) is str
        and outcome in _OUTCOMES
        and type(took) is float
        and math.isfinite(took)
        and (tokens_in is None or (type(tokens_in) is int and 0 <= tokens_in < 1 << 53))
        and (tokens_out is None or (type(tokens_out) is int and 0 <= tokens_out < 1 << 53))
    ):
        return {
            "type": EventType.END.value,
            "request_id": rid,
            "status": status,
            "outcome": outcome,
            "duration_ms": took,
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
        }
    return None


def _checked_end(obj: dict[str, Any]) -> dict[str, Any]:
    """Field by field: slower than :func:`_fast_end`, and names the first bad field."""
    outcome = obj.get("outcome")
    if not isinstance(outcome, str) or outcome not in _OUTCOMES:
        raise MalformedMessage(f"'outcome' must be one of {sorted(_OUTCOMES)}")
    return {
        "type": EventType.END.value,
        "request_id": _text(obj, "request_id", MAX_ID_CHARS),
        "status": _count(obj, "status"),
        "outcome": outcome,
        "duration_ms": _number(obj, "duration_ms"),
        "input_tokens": _count(obj, "input_tokens", nullable=True),
        "output_tokens": _count(obj, "output_tokens", nullable=True),
    }


def _validate_event(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise MalformedMessage("an event must be a JSON object")
    kind = obj.get("type")
    if kind == EventType.START:
        return {"type": kind, "row": validate_row(obj.get("row"))}
    if kind == EventType.PROGRESS:
        out: dict[str, Any] = {
            "type": kind,
            "request_id": _text(obj, "request_id", MAX_ID_CHARS),
        }
        for name in PROGRESS_FIELDS.intersection(obj):
            if name == "phase":
                out[name] = _phase(obj)
            elif name == "bytes_out":
                out[name] = _count(obj, name)
            elif name == "is_streaming":
                out[name] = _bool(obj, name)
            elif name == "model":
                out[name] = _text(obj, name, MAX_MODEL_CHARS, nullable=True)
            elif name in _TIME_FIELDS:
                out[name] = _nonnegative(obj, name)
            else:
                out[name] = _count(obj, name, nullable=True)
        return out
    if kind == EventType.END:
        fast = _fast_end(obj)
        return fast if fast is not None else _checked_end(obj)
    if kind == EventType.WORKER_UP:
        worker = obj.get("worker")
        if not isinstance(worker, dict):
            raise MalformedMessage("'worker' must be a JSON object")
        return {"type": kind, "worker": _validate_record(worker)}
    if kind == EventType.WORKER_DOWN:
        return {
            "type": kind,
            "worker_id": _text(obj, "worker_id", MAX_ID_CHARS),
            "reason": _text(obj, "reason", MAX_TEXT_CHARS, nullable=True),
        }
    raise MalformedMessage(f"unknown event type {str(kind)[:32]!r}")


def decode_batch(raw: bytes | str) -> Batch:
    obj = _load(raw, MAX_MESSAGE_BYTES)
    if not isinstance(obj, dict):
        raise MalformedMessage("a batch must be a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise MalformedMessage(f"unsupported protocol version {str(obj.get('v'))[:16]!r}")
    events = obj.get("events")
    if not isinstance(events, list) or len(events) > MAX_EVENTS_PER_BATCH:
        raise MalformedMessage(f"'events' must be a list of at most {MAX_EVENTS_PER_BATCH}")
    seq = _count(obj, "seq")
    return Batch(
        v=PROTOCOL_VERSION,
        worker_id=_text(obj, "worker_id", MAX_ID_CHARS),  # type: ignore[typeddict-item]
        epoch=_text(obj, "epoch", MAX_ID_CHARS),  # type: ignore[typeddict-item]
        seq=seq,  # type: ignore[typeddict-item]
        events=[_validate_event(e) for e in events],
    )


def parse_seq(raw: bytes | str | None) -> tuple[str, int] | None:
    """``P:seq`` value ``"epoch:seq"`` -> (epoch, seq); None when absent."""
    if raw is None:
        return None
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise MalformedMessage("sequence marker is not UTF-8") from None
    epoch, sep, seq = text.rpartition(":")
    # isascii: str.isdigit() also accepts digits int() refuses ("²").
    if not sep or not epoch or not (seq.isascii() and seq.isdigit()):
        raise MalformedMessage(f"bad sequence marker {text[:64]!r}")
    return epoch, int(seq)


_BYTES_NAMES: Final = {name: name.encode() for name in CompletedEntry.__annotations__}


def _optional_millis(fields: dict[Any, Any], name: str) -> float | None:
    """A completed entry's duration field that entries written before it existed lack (or
    hold empty): None then."""
    raw = fields.get(_BYTES_NAMES[name])
    if raw is None:
        raw = fields.get(name)
    if raw is None:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise MalformedMessage(f"completed entry {name} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise MalformedMessage(f"completed entry {name} is out of range")
    return value


def decode_completed(entry_id: bytes | str, fields: dict[Any, Any]) -> CompletedEntry:
    """One ``P:completed`` stream entry (field names and values as bytes or str)."""

    def get(name: str) -> str:
        # Field names come as bytes from redis-py (as text from test doubles). The hub decodes
        # every finished request, so the bytes names are made once (_BYTES_NAMES).
        value = fields.get(_BYTES_NAMES[name])
        if value is None:
            value = fields.get(name)
        if value is None:
            raise MalformedMessage(f"completed entry lacks {name!r}")
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if len(text) > MAX_PATH_CHARS:
            raise MalformedMessage(f"completed entry field {name!r} is too long")
        return text

    def opt_int(name: str) -> int | None:
        text = get(name)
        if text == "":
            return None
        if not (text.isascii() and text.isdigit()):
            raise MalformedMessage(f"completed entry field {name!r} is not a count")
        return int(text)

    try:
        start_time = float(get("start_time"))
        duration_ms = float(get("duration_ms"))
    except ValueError:
        raise MalformedMessage("completed entry times are not numbers") from None
    if not (math.isfinite(start_time) and math.isfinite(duration_ms)) or duration_ms < 0:
        raise MalformedMessage("completed entry times are out of range")
    outcome = get("outcome")
    if outcome not in _OUTCOMES:
        raise MalformedMessage("completed entry has an unknown outcome")
    status = opt_int("status")
    model = get("model")
    return CompletedEntry(
        id=entry_id.decode(errors="replace") if isinstance(entry_id, bytes) else entry_id,
        request_id=get("request_id"),
        worker_id=get("worker_id"),
        model=model or None,
        method=get("method"),
        path=get("path"),
        status=status or 0,
        outcome=outcome,
        start_time=start_time,
        duration_ms=duration_ms,
        input_tokens=opt_int("input_tokens"),
        output_tokens=opt_int("output_tokens"),
        bytes_out=opt_int("bytes_out") or 0,
        ttft_ms=_optional_millis(fields, "ttft_ms"),
        ttfb_ms=_optional_millis(fields, "ttfb_ms"),
    )
