"""Wire schema v1: the one place that encodes and decodes what crosses Redis.

Writers (the worker) build the ``TypedDict`` shapes (:class:`Row`, ...) and use the
``encode_*`` helpers; readers (the stream service, tests, third-party tools) use the
``decode_*`` functions, which treat their input as untrusted: any bytes in, either a valid
value out or :class:`MalformedMessage`. Nothing else escapes. The readers' rules are msgspec
structs (:class:`WireRow`, :class:`Batch` and its events), one line per field with its limits:
a new row field is a line in :class:`Row` and one in :class:`WireRow` (a test holds the two
to the same fields), plus one in :class:`Progress` when progress events may carry it.
See ``docs/protocol.md`` for the prose version of this module.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal, NotRequired, TypedDict, TypeVar

import msgspec
import orjson
from msgspec import UNSET, Meta, Struct, UnsetType, to_builtins
from msgspec.structs import asdict

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
# Labels an app attaches to its request (``vdm_hub.current_request().set_label``). The JSON
# bound keeps a row with a maximal path, model and ids under MAX_ROW_BYTES.
MAX_LABELS: Final = 8
MAX_LABEL_KEY_CHARS: Final = 32
MAX_LABEL_VALUE_CHARS: Final = 128
MAX_LABELS_JSON_BYTES: Final = 1024

_T = TypeVar("_T")


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
    # What the app attached (at most MAX_LABELS string pairs); null when nothing.
    labels: NotRequired[dict[str, str] | None]


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
    # Random per process start: tells a process that re-registers its own id from another
    # live process holding the same one (register.lua).
    instance: NotRequired[str]
    # False: this worker cannot stop its requests (it does not listen for cancels); absent
    # means true (workers that predate the field listen).
    cancellable: NotRequired[bool]
    # Finished requests this worker dropped, oldest first, because they outgrew its backlog
    # bound during a Redis outage (VDM_COMPLETED_BACKLOG_BYTES); see services/proxy/backlog.py.
    completed_dropped: NotRequired[int]


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
    labels: NotRequired[dict[str, str] | None]
    id: NotRequired[str]


ROW_FIELDS: Final = tuple(Row.__annotations__)
# Order of the fields of a completed entry as passed to the apply script (shared/lua/apply.lua).
# `ttft_ms`, `ttfb_ms` and `labels` came later within v1: they are read when an entry has them
# (see decode_completed); the script writes them all.
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
    "labels",
)
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
        if value is None:
            out.append("")
        elif type(value) is dict:  # labels, as JSON ({} as none)
            out.append(orjson.dumps(value).decode() if value else "")
        else:
            out.append(str(value))
    return out


# --------------------------------------------------------------------------- reading
#
# Readers decode with msgspec: each message is parsed and checked against the typed structs
# below in one C pass (types, lengths, ranges, allowed values), instead of being parsed into
# dicts and checked field by field in Python. The structs ARE the reader's rules: a field and
# its limits are one line. JSON has no NaN or infinity and msgspec refuses numbers that
# overflow a double, so every decoded number is finite. Unknown fields are ignored (new optional
# fields may be added within v1); a float field also takes an integer, an integer field never
# takes a float or a bool.

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
Count = Annotated[int, Meta(ge=0, lt=1 << 53)]
NonNegative = Annotated[float, Meta(ge=0)]  # a duration in ms, or a time in epoch s
Model = Annotated[str, Meta(max_length=MAX_MODEL_CHARS)]
Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]
Labels = Annotated[
    dict[
        Annotated[str, Meta(min_length=1, max_length=MAX_LABEL_KEY_CHARS)],
        Annotated[str, Meta(max_length=MAX_LABEL_VALUE_CHARS)],
    ],
    Meta(max_length=MAX_LABELS),
]
# The values of Phase and Outcome, as plain strings (a decoded row holds text, as it always has;
# a test holds these to the enums).
PhaseName = Literal["upstream", "streaming"]
OutcomeName = Literal["ok", "error", "client_closed", "upstream_error", "cancelled"]


class WireRow(Struct, kw_only=True, gc=False):
    """A row as readers accept it (:class:`Row`); ``as_row`` is the dict the reader keeps.

    Fields that may be null may also be absent (null): ``ttft_ms``, ``chunks_out``,
    ``ttfb_ms``, ``last_output_at`` and ``labels`` came later within v1, and readers have
    always taken a missing nullable field as null.
    """

    request_id: Id
    worker_id: Id
    method: Annotated[str, Meta(min_length=1, max_length=MAX_METHOD_CHARS)]
    path: Annotated[str, Meta(min_length=1, max_length=MAX_PATH_CHARS)]
    model: Model | None = None
    provider: Annotated[str, Meta(max_length=MAX_PROVIDER_CHARS)] | None = None
    is_streaming: bool
    start_time: float
    phase: PhaseName
    bytes_out: Count
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    ttft_ms: NonNegative | None = None
    chunks_out: Count | None = None
    ttfb_ms: NonNegative | None = None
    last_output_at: NonNegative | None = None
    labels: Labels | None = None

    def as_row(self) -> Row:
        return asdict(self)  # type: ignore[return-value]


class WireRecord(Struct, gc=False):
    worker_id: Id
    host: Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS)]
    pid: Count
    started_at: float
    epoch: Id
    upstream: Text | None = None
    version: Text | None = None
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL_S
    ttl: float = DEFAULT_WORKER_TTL_S
    events_dropped: Count | UnsetType = UNSET
    instance: Id | UnsetType = UNSET
    cancellable: bool | UnsetType = UNSET
    completed_dropped: Count | UnsetType = UNSET

    def as_record(self) -> WorkerRecord:
        record = WorkerRecord(
            worker_id=self.worker_id,
            host=self.host,
            pid=self.pid,
            started_at=self.started_at,
            upstream=self.upstream or "",
            version=self.version or "",
            epoch=self.epoch,
            heartbeat_interval=self.heartbeat_interval,
            ttl=self.ttl,
        )
        if self.events_dropped is not UNSET:
            record["events_dropped"] = self.events_dropped
        if self.instance is not UNSET:
            record["instance"] = self.instance
        if self.cancellable is not UNSET:
            record["cancellable"] = self.cancellable
        if self.completed_dropped is not UNSET:
            record["completed_dropped"] = self.completed_dropped
        return record


# The events of a batch, told apart by their "type". ``type`` is also a class attribute, so
# ``event.type`` reads as it does in the JSON.


class Start(Struct, tag=EventType.START.value, tag_field="type", gc=False):
    type: ClassVar[str] = EventType.START.value
    row: WireRow


class Progress(Struct, tag=EventType.PROGRESS.value, tag_field="type", gc=False):
    """The fields a progress event may change; those it does not carry stay UNSET."""

    type: ClassVar[str] = EventType.PROGRESS.value
    request_id: Id
    phase: PhaseName | UnsetType = UNSET
    bytes_out: Count | UnsetType = UNSET
    input_tokens: Count | UnsetType | None = UNSET
    output_tokens: Count | UnsetType | None = UNSET
    model: Model | UnsetType | None = UNSET
    is_streaming: bool | UnsetType = UNSET
    ttft_ms: NonNegative | UnsetType | None = UNSET
    chunks_out: Count | UnsetType | None = UNSET
    ttfb_ms: NonNegative | UnsetType | None = UNSET
    last_output_at: NonNegative | UnsetType | None = UNSET
    labels: Labels | UnsetType | None = UNSET

    def changes(self) -> dict[str, Any]:
        """The row fields this event carries, by name."""
        fields: dict[str, Any] = to_builtins(self)
        del fields["type"], fields["request_id"]
        return fields


class End(Struct, tag=EventType.END.value, tag_field="type", gc=False):
    type: ClassVar[str] = EventType.END.value
    request_id: Id
    status: Count
    outcome: OutcomeName
    duration_ms: float
    input_tokens: Count | None = None
    output_tokens: Count | None = None


class WorkerUp(Struct, tag=EventType.WORKER_UP.value, tag_field="type", gc=False):
    type: ClassVar[str] = EventType.WORKER_UP.value
    worker: WireRecord


class WorkerDown(Struct, tag=EventType.WORKER_DOWN.value, tag_field="type", gc=False):
    type: ClassVar[str] = EventType.WORKER_DOWN.value
    worker_id: Id
    reason: Text | None = None


Event = Start | Progress | End | WorkerUp | WorkerDown


class Batch(Struct, gc=False):
    """A ``P:events`` message as readers accept it."""

    v: Literal[1]  # PROTOCOL_VERSION
    worker_id: Id
    epoch: Id
    seq: Count
    events: Annotated[list[Event], Meta(max_length=MAX_EVENTS_PER_BATCH)]


PROGRESS_FIELDS: Final = frozenset(Progress.__struct_fields__) - {"request_id"}

_batch_decoder: Final = msgspec.json.Decoder(Batch)
_row_decoder: Final = msgspec.json.Decoder(WireRow)
_record_decoder: Final = msgspec.json.Decoder(WireRecord)


def _decode(decoder: msgspec.json.Decoder[_T], raw: bytes | str, limit: int) -> _T:
    if len(raw) > limit:
        raise MalformedMessage(f"message of {len(raw)} bytes is over the {limit}-byte limit")
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeEncodeError) as exc:
        # DecodeError includes ValidationError; a ``str`` holding a lone surrogate cannot be
        # encoded to the UTF-8 the decoder reads. The message may quote the offending value:
        # keep log lines short.
        raise MalformedMessage(str(exc)[:200]) from None


def decode_batch(raw: bytes | str) -> Batch:
    """One ``P:events`` message. A bad event makes the whole batch malformed: the reader
    skips it, counts it once, and the next batch's sequence gap resyncs that worker."""
    return _decode(_batch_decoder, raw, MAX_MESSAGE_BYTES)


def decode_row(raw: bytes | str) -> Row:
    return _decode(_row_decoder, raw, MAX_ROW_BYTES).as_row()


def decode_worker_record(raw: bytes | str) -> WorkerRecord:
    return _decode(_record_decoder, raw, MAX_RECORD_BYTES).as_record()


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


# The fields every completed entry has, as redis-py hands back their names, and those that came
# later within v1 (an older writer's entry lacks them), in the order shared/lua/apply.lua
# writes them all.
_LATER: Final = ("ttft_ms", "ttfb_ms", "labels")
_REQUIRED: Final = tuple(name.encode() for name in COMPLETED_FIELDS if name not in _LATER)
_OPTIONAL: Final = tuple(name.encode() for name in _LATER)
_WRITTEN: Final = [name.encode() for name in COMPLETED_FIELDS]
# A completed entry's labels are JSON text; the writer keeps them under MAX_LABELS_JSON_BYTES.
MAX_COMPLETED_LABELS_BYTES: Final = 2 * MAX_LABELS_JSON_BYTES
_labels_decoder: Final = msgspec.json.Decoder(Labels | None)


class Finished(Struct, gc=False):
    """What rolling statistics and metrics take of a finished request (a completed entry)."""

    worker_id: str
    model: str | None
    outcome: str
    start_time: float
    duration_ms: float
    ttft_ms: float | None
    ttfb_ms: float | None = None


def finished_of(fields: Any) -> Finished:
    """Check a whole ``P:completed`` entry (see :func:`decode_completed`) and return what
    statistics need of it. The stream service does this for every finished request of the
    fleet, and builds the full entry only for the few it keeps (:func:`decode_completed`)."""
    return _checked_completed(*_completed_values(fields))[0]


def decode_completed(entry_id: bytes | str, fields: Any) -> CompletedEntry:
    """One ``P:completed`` stream entry: names and values as redis-py gives them (bytes; a dict,
    or Redis's flat list), or as text (test doubles, other clients). Every value is at most
    ``MAX_PATH_CHARS`` characters (``labels``: JSON of at most ``MAX_COMPLETED_LABELS_BYTES``
    bytes, held to the row's rules); counts are ASCII digits or empty (null), times finite
    numbers, ``duration_ms``, ``ttft_ms`` and ``ttfb_ms`` not negative; ``ttft_ms``,
    ``ttfb_ms`` and ``labels`` may be missing or empty (they came later within v1)."""
    values, later = _completed_values(fields)
    done, counts, labels = _checked_completed(values, later)
    rid, _, _, method, path = values[:5]
    status, tokens_in, tokens_out, sent = (int(c) if c else None for c in counts)
    # A dict literal: calling the TypedDict with keywords costs more.
    return {
        "id": entry_id.decode(errors="replace") if isinstance(entry_id, bytes) else entry_id,
        "request_id": rid.decode(errors="replace"),
        "worker_id": done.worker_id,
        "model": done.model,
        "method": method.decode(errors="replace"),
        "path": path.decode(errors="replace"),
        "status": status or 0,
        "outcome": done.outcome,
        "start_time": done.start_time,
        "duration_ms": done.duration_ms,
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "bytes_out": sent or 0,
        "ttft_ms": done.ttft_ms,
        "ttfb_ms": done.ttfb_ms,
        "labels": labels,
    }


def _completed_values(fields: Any) -> tuple[list[bytes], list[bytes]]:
    """The required values in ``_REQUIRED`` order and the later ones in ``_OPTIONAL`` order
    (b"" when absent), as bytes.

    ``fields`` is a mapping, or Redis's flat ``[name, value, ...]`` list: in the order the
    apply script writes (every current writer, and the older ones that wrote fewer of the
    later fields) the values are taken by position.
    """
    values: list[Any]
    if isinstance(fields, list):
        names = fields[0::2]
        if len(names) >= len(_REQUIRED) and names == _WRITTEN[: len(names)]:
            values = fields[1::2]
            try:
                b"".join(values)  # all bytes (a TypeError otherwise)
            except TypeError:
                pass
            else:
                later = values[len(_REQUIRED) :]
                return values[: len(_REQUIRED)], later + [b""] * (len(_OPTIONAL) - len(later))
        fields = dict(zip(names, fields[1::2], strict=False))
    values = list(map(fields.get, _REQUIRED))
    try:
        b"".join(values)  # a TypeError unless every value is there and bytes: the cheap check
    except TypeError:
        fields = {_as_bytes(k): _as_bytes(v) for k, v in fields.items() if v is not None}
        values = list(map(fields.get, _REQUIRED))
        if None in values:
            missing = _REQUIRED[values.index(None)].decode()
            raise MalformedMessage(f"completed entry lacks {missing!r}") from None
    later = [fields.get(name) for name in _OPTIONAL]
    return values, [b"" if v is None else _as_bytes(v) for v in later]


def _checked_completed(
    values: list[bytes], later: list[bytes]
) -> tuple[Finished, list[bytes], dict[str, str] | None]:
    """Every rule of a completed entry; its :class:`Finished`, its four counts' bytes and its
    labels.

    Text is decoded only where it is needed (worker, model, outcome) or where its bytes exceed
    the limit (UTF-8 never has more characters than bytes): ``errors="replace"`` makes any
    bytes valid text, so the rest need no decoding to be checked.
    """
    rid, wid, model, method, path, status, outcome, start, took, tokens_in, tokens_out, sent = (
        values
    )
    ttft, ttfb, labels_json = later
    if max(map(len, values)) > MAX_PATH_CHARS or max(len(ttft), len(ttfb)) > MAX_PATH_CHARS:
        for text in (rid, wid, model, method, path, outcome):
            if len(text.decode(errors="replace")) > MAX_PATH_CHARS:
                raise MalformedMessage("completed entry field is too long")
        if max(len(v) for v in (status, start, took, tokens_in, tokens_out, sent, ttft, ttfb)) > (
            MAX_PATH_CHARS
        ):
            raise MalformedMessage("completed entry field is too long")
    counts = [status, tokens_in, tokens_out, sent]
    digits = b"".join(counts)
    if digits and not digits.isdigit():  # each one empty (null) or ASCII digits
        raise MalformedMessage("completed entry count is not a count")
    try:
        start_time, duration_ms = float(start), float(took)
    except ValueError:
        raise MalformedMessage("completed entry times are not numbers") from None
    if not (math.isfinite(start_time) and math.isfinite(duration_ms)) or duration_ms < 0:
        raise MalformedMessage("completed entry times are out of range")
    ttft_ms = _first_ms(ttft, "ttft_ms") if ttft else None
    ttfb_ms = _first_ms(ttfb, "ttfb_ms") if ttfb else None
    outcome_text = outcome.decode(errors="replace")
    if outcome_text not in _OUTCOMES:
        raise MalformedMessage("completed entry has an unknown outcome")
    labels = (
        _decode(_labels_decoder, labels_json, MAX_COMPLETED_LABELS_BYTES) if labels_json else None
    )
    model_text = model.decode(errors="replace")
    done = Finished(
        wid.decode(errors="replace"),
        model_text or None,
        outcome_text,
        start_time,
        duration_ms,
        ttft_ms,
        ttfb_ms,
    )
    return done, counts, labels


def _first_ms(raw: bytes, name: str) -> float:
    """A completed entry's time to its first token or byte: a finite number, not negative."""
    try:
        value = float(raw)
    except ValueError:
        raise MalformedMessage(f"completed entry {name} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise MalformedMessage(f"completed entry {name} is out of range")
    return value


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode(errors="surrogatepass")
