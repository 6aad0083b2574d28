"""The reader's rules of wire protocol v1, written out field by field: the test oracle for
``shared/schema.py``'s decoder.

This is the hand-written validator the stream service used before its decoder became msgspec
structs (and its completed-entry decoder read values by name, one at a time), kept as plain
Python so a property test can ask, for any input, whether the decoder accepts exactly what
these rules accept and gives the same values: the limits (lengths, ranges, allowed values)
stay what they were. Deliberate changes: ``v`` must be the integer 1 (the old check
``v != 1`` also let ``1.0`` and ``true`` through; no writer sends those); a completed entry's
numbers are ASCII (``float()`` of text also took other scripts' digits) and ``ttft_ms`` and
``ttfb_ms`` are held to the same length limit as the other values.

Every function returns plain JSON values or raises :class:`Reject`.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from vdm_hub.shared import schema


class Reject(Exception):
    pass


PHASES = frozenset(p.value for p in schema.Phase)
OUTCOMES = frozenset(o.value for o in schema.Outcome)


def text(obj: dict[str, Any], name: str, limit: int, *, nullable: bool = False) -> str | None:
    value = obj.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, str) or len(value) > limit or (not nullable and not value):
        raise Reject(name)
    return value


def number(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Reject(name)
    return float(value)


def millis(obj: dict[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    return nonnegative(number(obj, name), name)


def nonnegative(value: float, name: str) -> float:
    if value < 0:
        raise Reject(name)
    return value


def count(obj: dict[str, Any], name: str, *, nullable: bool = False) -> int | None:
    value = obj.get(name)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 53:
        raise Reject(name)
    return value


def boolean(obj: dict[str, Any], name: str) -> bool:
    value = obj.get(name)
    if not isinstance(value, bool):
        raise Reject(name)
    return value


def choice(obj: dict[str, Any], name: str, allowed: frozenset[str]) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or value not in allowed:
        raise Reject(name)
    return value


def labels_ok(value: Any) -> bool:
    if type(value) is not dict or len(value) > schema.MAX_LABELS:
        return False
    for key, text in value.items():
        if type(key) is not str or not 0 < len(key) <= schema.MAX_LABEL_KEY_CHARS:
            return False
        if type(text) is not str or len(text) > schema.MAX_LABEL_VALUE_CHARS:
            return False
    return True


def labels(obj: dict[str, Any], name: str = "labels") -> dict[str, str] | None:
    value = obj.get(name)
    if value is None:
        return None
    if not labels_ok(value):
        raise Reject(name)
    return value  # type: ignore[no-any-return]


def row(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise Reject("row")
    return {
        "request_id": text(obj, "request_id", schema.MAX_ID_CHARS),
        "worker_id": text(obj, "worker_id", schema.MAX_ID_CHARS),
        "method": text(obj, "method", schema.MAX_METHOD_CHARS),
        "path": text(obj, "path", schema.MAX_PATH_CHARS),
        "model": text(obj, "model", schema.MAX_MODEL_CHARS, nullable=True),
        "provider": text(obj, "provider", schema.MAX_PROVIDER_CHARS, nullable=True),
        "is_streaming": boolean(obj, "is_streaming"),
        "start_time": number(obj, "start_time"),
        "phase": choice(obj, "phase", PHASES),
        "bytes_out": count(obj, "bytes_out"),
        "input_tokens": count(obj, "input_tokens", nullable=True),
        "output_tokens": count(obj, "output_tokens", nullable=True),
        "ttft_ms": millis(obj, "ttft_ms"),
        "chunks_out": count(obj, "chunks_out", nullable=True),
        "ttfb_ms": millis(obj, "ttfb_ms"),
        "last_output_at": millis(obj, "last_output_at"),
        "labels": labels(obj),
    }


def record(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise Reject("worker")
    out = {
        "worker_id": text(obj, "worker_id", schema.MAX_ID_CHARS),
        "host": text(obj, "host", schema.MAX_TEXT_CHARS),
        "pid": count(obj, "pid"),
        "started_at": number(obj, "started_at"),
        "upstream": text(obj, "upstream", schema.MAX_TEXT_CHARS, nullable=True) or "",
        "version": text(obj, "version", schema.MAX_TEXT_CHARS, nullable=True) or "",
        "epoch": text(obj, "epoch", schema.MAX_ID_CHARS),
        "heartbeat_interval": number(obj, "heartbeat_interval")
        if "heartbeat_interval" in obj
        else schema.DEFAULT_HEARTBEAT_INTERVAL_S,
        "ttl": number(obj, "ttl") if "ttl" in obj else schema.DEFAULT_WORKER_TTL_S,
    }
    if "events_dropped" in obj:
        out["events_dropped"] = count(obj, "events_dropped")
    if "instance" in obj:
        out["instance"] = text(obj, "instance", schema.MAX_ID_CHARS)
    if "cancellable" in obj:
        out["cancellable"] = boolean(obj, "cancellable")
    if "completed_dropped" in obj:
        out["completed_dropped"] = count(obj, "completed_dropped")
    return out


PROGRESS = {
    "phase": lambda o, n: choice(o, n, PHASES),
    "bytes_out": count,
    "is_streaming": boolean,
    "model": lambda o, n: text(o, n, schema.MAX_MODEL_CHARS, nullable=True),
    "ttft_ms": millis,
    "input_tokens": lambda o, n: count(o, n, nullable=True),
    "output_tokens": lambda o, n: count(o, n, nullable=True),
    "chunks_out": lambda o, n: count(o, n, nullable=True),
    "ttfb_ms": millis,
    "last_output_at": millis,
    "labels": labels,
}


def event(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise Reject("event")
    kind = obj.get("type")
    if kind == "start":
        return {"type": kind, "row": row(obj.get("row"))}
    if kind == "progress":
        out = {"type": kind, "request_id": text(obj, "request_id", schema.MAX_ID_CHARS)}
        for name, check in PROGRESS.items():
            if name in obj:
                out[name] = check(obj, name)
        return out
    if kind == "end":
        return {
            "type": kind,
            "request_id": text(obj, "request_id", schema.MAX_ID_CHARS),
            "status": count(obj, "status"),
            "outcome": choice(obj, "outcome", OUTCOMES),
            "duration_ms": number(obj, "duration_ms"),
            "input_tokens": count(obj, "input_tokens", nullable=True),
            "output_tokens": count(obj, "output_tokens", nullable=True),
        }
    if kind == "worker_up":
        return {"type": kind, "worker": record(obj.get("worker"))}
    if kind == "worker_down":
        return {
            "type": kind,
            "worker_id": text(obj, "worker_id", schema.MAX_ID_CHARS),
            "reason": text(obj, "reason", schema.MAX_TEXT_CHARS, nullable=True),
        }
    raise Reject("type")


def batch(raw: bytes) -> dict[str, Any]:
    """A whole ``P:events`` message: one bad event rejects the batch."""
    obj = load(raw, schema.MAX_MESSAGE_BYTES)
    if not isinstance(obj, dict):
        raise Reject("batch")
    v = obj.get("v")
    if type(v) is not int or v != 1:
        raise Reject("v")
    events = obj.get("events")
    if not isinstance(events, list) or len(events) > schema.MAX_EVENTS_PER_BATCH:
        raise Reject("events")
    return {
        "v": 1,
        "worker_id": text(obj, "worker_id", schema.MAX_ID_CHARS),
        "epoch": text(obj, "epoch", schema.MAX_ID_CHARS),
        "seq": count(obj, "seq"),
        "events": [event(e) for e in events],
    }


def load(raw: bytes, limit: int) -> Any:
    if len(raw) > limit:
        raise Reject("size")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Reject("json") from None


def completed(entry_id: bytes | str, fields: dict[Any, Any]) -> dict[str, Any]:
    """A ``P:completed`` entry: every value text of at most ``MAX_PATH_CHARS`` characters
    (``labels``: JSON of at most ``MAX_COMPLETED_LABELS_BYTES`` bytes, null or a row's labels);
    counts ASCII digits or empty (null); times finite numbers, ``duration_ms``, ``ttft_ms`` and
    ``ttfb_ms`` not negative; ``ttft_ms``, ``ttfb_ms`` and ``labels`` may be missing or
    empty."""

    def get(name: str) -> str:
        value = fields.get(name.encode())
        if value is None:
            value = fields.get(name)
        if value is None:
            raise Reject(name)
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if len(text) > schema.MAX_PATH_CHARS:
            raise Reject(name)
        return text

    def opt_count(name: str) -> int | None:
        text = get(name)
        if text == "":
            return None
        if not (text.isascii() and text.isdigit()):
            raise Reject(name)
        return int(text)

    def finite(name: str, text: str) -> float:
        if not text.isascii():
            raise Reject(name)
        try:
            value = float(text)
        except ValueError:
            raise Reject(name) from None
        if not math.isfinite(value):
            raise Reject(name)
        return value

    def later(name: str) -> str:
        return "" if fields.get(name.encode(), fields.get(name)) is None else get(name)

    def first_ms(name: str) -> float | None:
        text = later(name)
        return nonnegative(finite(name, text), name) if text else None

    def entry_labels() -> dict[str, str] | None:
        raw = fields.get(b"labels", fields.get("labels"))
        if raw is None or raw in (b"", ""):
            return None
        data = raw if isinstance(raw, bytes) else str(raw).encode(errors="surrogatepass")
        return labels({"labels": load(data, schema.MAX_COMPLETED_LABELS_BYTES)})

    outcome = get("outcome")
    if outcome not in OUTCOMES:
        raise Reject("outcome")
    return {
        "id": entry_id.decode(errors="replace") if isinstance(entry_id, bytes) else entry_id,
        "request_id": get("request_id"),
        "worker_id": get("worker_id"),
        "model": get("model") or None,
        "method": get("method"),
        "path": get("path"),
        "status": opt_count("status") or 0,
        "outcome": outcome,
        "start_time": finite("start_time", get("start_time")),
        "duration_ms": nonnegative(finite("duration_ms", get("duration_ms")), "duration_ms"),
        "input_tokens": opt_count("input_tokens"),
        "output_tokens": opt_count("output_tokens"),
        "bytes_out": opt_count("bytes_out") or 0,
        "ttft_ms": first_ms("ttft_ms"),
        "ttfb_ms": first_ms("ttfb_ms"),
        "labels": entry_labels(),
    }
