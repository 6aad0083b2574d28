"""Property-based tests of the wire decoder (protocol invariant 5: anything read from Redis is
untrusted). Any bytes or text in: a valid value out or :class:`MalformedMessage`, never another
exception; every valid batch a writer can produce decodes back to itself; and the decoder
accepts exactly what the protocol's field rules accept (``tests/wire_rules.py``)."""

from __future__ import annotations

import math
from typing import Any, get_args

import msgspec
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import wire_rules
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.schema import MalformedMessage
from vdm_hub.shared.store import read_worker_state

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=150, deadline=None)

# --------------------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=25,
)
ids = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=24
)
counts = st.integers(min_value=0, max_value=(1 << 53) - 1)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
millis = st.floats(min_value=0, allow_nan=False, allow_infinity=False, width=64)
phases = st.sampled_from([p.value for p in schema.Phase])
outcomes = st.sampled_from([o.value for o in schema.Outcome])
labels = st.dictionaries(
    st.text(min_size=1, max_size=schema.MAX_LABEL_KEY_CHARS),
    st.text(max_size=schema.MAX_LABEL_VALUE_CHARS),
    max_size=schema.MAX_LABELS,
)


@st.composite
def rows(draw: st.DrawFn, worker_id: str | None = None) -> schema.Row:
    return schema.Row(
        request_id=draw(ids),
        worker_id=worker_id if worker_id is not None else draw(ids),
        method=draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"])),
        path=draw(st.text(min_size=1, max_size=60)),
        model=draw(st.none() | st.text(min_size=1, max_size=30)),
        provider=draw(st.none() | st.sampled_from(["openai", "anthropic"])),
        is_streaming=draw(st.booleans()),
        start_time=draw(finite),
        phase=draw(phases),
        bytes_out=draw(counts),
        input_tokens=draw(st.none() | counts),
        output_tokens=draw(st.none() | counts),
        ttft_ms=draw(st.none() | millis),
        chunks_out=draw(st.none() | counts),
        ttfb_ms=draw(st.none() | millis),
        last_output_at=draw(st.none() | millis),
        labels=draw(st.none() | labels),
    )


@st.composite
def records(draw: st.DrawFn, worker_id: str) -> schema.WorkerRecord:
    record = schema.WorkerRecord(
        worker_id=worker_id,
        host=draw(st.text(min_size=1, max_size=30)),
        pid=draw(counts),
        started_at=draw(finite),
        upstream=draw(st.text(max_size=30)),
        version=draw(st.text(max_size=10)),
        epoch=draw(ids),
        heartbeat_interval=draw(finite),
        ttl=draw(finite),
    )
    if draw(st.booleans()):
        record["events_dropped"] = draw(counts)
    if draw(st.booleans()):
        record["instance"] = draw(ids)
    if draw(st.booleans()):
        record["cancellable"] = draw(st.booleans())
    if draw(st.booleans()):
        record["completed_dropped"] = draw(counts)
    return record


@st.composite
def events(draw: st.DrawFn, worker_id: str) -> dict[str, Any]:
    kind = draw(st.sampled_from(list(schema.EventType)))
    if kind is schema.EventType.START:
        return {"type": "start", "row": draw(rows(worker_id))}
    if kind is schema.EventType.PROGRESS:
        fields = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "phase": phases,
                    "bytes_out": counts,
                    "input_tokens": st.none() | counts,
                    "output_tokens": st.none() | counts,
                    "model": st.none() | st.text(min_size=1, max_size=30),
                    "is_streaming": st.booleans(),
                    "ttft_ms": st.none() | millis,
                    "chunks_out": st.none() | counts,
                    "ttfb_ms": st.none() | millis,
                    "last_output_at": st.none() | millis,
                    "labels": st.none() | labels,
                },
            )
        )
        return {"type": "progress", "request_id": draw(ids), **fields}
    if kind is schema.EventType.END:
        return {
            "type": "end",
            "request_id": draw(ids),
            "status": draw(st.integers(0, 599)),
            "outcome": draw(outcomes),
            "duration_ms": draw(finite),
            "input_tokens": draw(st.none() | counts),
            "output_tokens": draw(st.none() | counts),
        }
    if kind is schema.EventType.WORKER_UP:
        return {"type": "worker_up", "worker": draw(records(worker_id))}
    return {
        "type": "worker_down",
        "worker_id": worker_id,
        "reason": draw(st.none() | st.text(max_size=20)),
    }


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Any]:
    wid = draw(ids)
    return {
        "v": 1,
        "worker_id": wid,
        "epoch": draw(ids),
        "seq": draw(st.integers(1, (1 << 53) - 1)),
        "events": draw(st.lists(events(wid), max_size=6)),
    }


def _set_path(obj: Any, path: list[Any], value: Any) -> Any:
    """``obj`` with the item at ``path`` replaced by ``value`` (a deep copy along the path)."""
    if not path:
        return value
    head, *rest = path
    if isinstance(obj, dict):
        return {**obj, head: _set_path(obj[head], rest, value)}
    copy = list(obj)
    copy[head] = _set_path(copy[head], rest, value)
    return copy


def _paths(obj: Any, prefix: list[Any] | None = None) -> list[list[Any]]:
    prefix = prefix or []
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, [*prefix, key])
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            out += _paths(value, [*prefix, index])
    return out


@st.composite
def mutated_batches(draw: st.DrawFn) -> bytes:
    """A valid batch with one value anywhere in it replaced by arbitrary JSON: these get past
    the JSON parser and probe every field check, which random bytes rarely reach."""
    batch: Any = draw(batches())
    path = draw(st.sampled_from(_paths(batch)))
    return orjson.dumps(_set_path(batch, path, draw(json_values)))


# --------------------------------------------------------------------------- helpers


def _is_valid_row(row: Any) -> bool:
    return (
        isinstance(row, dict)
        and set(row) == set(schema.ROW_FIELDS)
        and isinstance(row["request_id"], str)
        and 0 < len(row["request_id"]) <= schema.MAX_ID_CHARS
        and len(row["path"]) <= schema.MAX_PATH_CHARS
        and (row["model"] is None or len(row["model"]) <= schema.MAX_MODEL_CHARS)
        and len(row["method"]) <= schema.MAX_METHOD_CHARS
        and row["phase"] in {p.value for p in schema.Phase}
        and math.isfinite(row["start_time"])
        and isinstance(row["bytes_out"], int)
        and row["bytes_out"] >= 0
        and (row["ttft_ms"] is None or (math.isfinite(row["ttft_ms"]) and row["ttft_ms"] >= 0))
        and (row["chunks_out"] is None or row["chunks_out"] >= 0)
        and all(
            row[name] is None or (math.isfinite(row[name]) and row[name] >= 0)
            for name in ("ttfb_ms", "last_output_at")
        )
        and (row["labels"] is None or wire_rules.labels_ok(row["labels"]))
    )


def _check_batch(batch: schema.Batch) -> None:
    assert batch.v == 1
    assert isinstance(batch.seq, int) and batch.seq >= 0
    assert len(batch.events) <= schema.MAX_EVENTS_PER_BATCH
    for event in batch.events:
        assert event.type in {t.value for t in schema.EventType}
        if isinstance(event, schema.Start):
            row = event.row.as_row()
            assert _is_valid_row(row)
            orjson.dumps(row)  # what the stream service does with it next


def _decode_or_reject(decoder: Any, raw: Any) -> Any:
    try:
        return decoder(raw)
    except MalformedMessage:
        return None


# --------------------------------------------------------------------------- any input


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_any_bytes_are_a_batch_or_a_malformed_message(raw: bytes | str) -> None:
    batch = _decode_or_reject(schema.decode_batch, raw)
    if batch is not None:
        _check_batch(batch)


@FUZZ
@given(json_values)
def test_any_json_is_a_batch_row_or_record_or_a_malformed_message(value: Any) -> None:
    raw = orjson.dumps(value)
    batch = _decode_or_reject(schema.decode_batch, raw)
    if batch is not None:
        _check_batch(batch)
    row = _decode_or_reject(schema.decode_row, raw)
    if row is not None:
        assert _is_valid_row(row)
    record = _decode_or_reject(schema.decode_worker_record, raw)
    if record is not None:
        assert isinstance(record["pid"], int) and record["worker_id"]


@FUZZ
@given(mutated_batches())
def test_a_batch_with_any_field_replaced_decodes_or_is_rejected(raw: bytes) -> None:
    batch = _decode_or_reject(schema.decode_batch, raw)
    if batch is not None:
        _check_batch(batch)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_are_a_row_or_a_malformed_message(raw: bytes | str) -> None:
    row = _decode_or_reject(schema.decode_row, raw)
    if row is not None:
        assert _is_valid_row(row)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_are_a_worker_record_or_a_malformed_message(raw: bytes | str) -> None:
    record = _decode_or_reject(schema.decode_worker_record, raw)
    if record is not None:
        assert isinstance(record["worker_id"], str) and record["worker_id"]


@FUZZ
@given(st.none() | st.binary(max_size=60) | st.text(max_size=60))
def test_any_sequence_marker_parses_or_is_a_malformed_message(raw: bytes | str | None) -> None:
    marker = _decode_or_reject(schema.parse_seq, raw)
    if marker is not None:
        epoch, seq = marker
        assert epoch and isinstance(seq, int) and seq >= 0


def test_sequence_markers_with_non_ascii_digits_or_bad_utf8_are_malformed() -> None:
    # Found by the fuzzer: "²".isdigit() is true but int("²") raises ValueError, and bytes
    # that are not UTF-8 raised UnicodeDecodeError; either one killed the hub's reader task.
    for raw in (b"e:\xc2\xb2", "e:\u0663", b"\xff\xfe:1"):
        with pytest.raises(MalformedMessage):
            schema.parse_seq(raw)
    assert schema.parse_seq(b"ep:och:12") == ("ep:och", 12)


def test_unhashable_phase_or_outcome_is_malformed() -> None:
    # Found by the fuzzer: `[] in frozenset(...)` raised TypeError out of decode_batch, and the
    # stream service's reader task (which catches MalformedMessage) died on one bad message.
    progress = {"type": "progress", "request_id": "r", "phase": []}
    end = {"type": "end", "request_id": "r", "status": 200, "outcome": {}, "duration_ms": 1}
    for event in (progress, end):
        raw = orjson.dumps({"v": 1, "worker_id": "w", "epoch": "e", "seq": 1, "events": [event]})
        with pytest.raises(MalformedMessage):
            schema.decode_batch(raw)


completed_field = st.binary(max_size=40) | st.text(max_size=40) | st.integers()


@FUZZ
@given(
    st.binary(max_size=30) | st.text(max_size=30),
    st.dictionaries(
        st.sampled_from(schema.COMPLETED_FIELDS) | st.text(max_size=10), completed_field
    ),
    st.booleans(),
)
def test_any_completed_entry_decodes_or_is_a_malformed_message(
    entry_id: bytes | str, fields: dict[Any, Any], as_bytes: bool
) -> None:
    if as_bytes:
        fields = {k.encode() if isinstance(k, str) else k: v for k, v in fields.items()}
    entry = _decode_or_reject(lambda f: schema.decode_completed(entry_id, f), fields)
    if entry is not None:
        assert entry["outcome"] in {o.value for o in schema.Outcome}
        assert math.isfinite(entry["duration_ms"]) and entry["duration_ms"] >= 0
        assert isinstance(entry["status"], int)


COMPLETED = {
    "request_id": "r1", "worker_id": "w1", "model": "m", "method": "POST", "path": "/v1/x",
    "status": "200", "outcome": "ok", "start_time": "1764036000.5", "duration_ms": "12.5",
    "input_tokens": "3", "output_tokens": "", "bytes_out": "10", "ttft_ms": "4.25",
    "ttfb_ms": "3.5", "labels": '{"team":"a"}',
}  # fmt: skip
completed_values = (
    st.sampled_from(["", "0", "12", "-1", "1.5", "-0.5", "1e3", "nan", "inf", " 7", "x" * 513])
    | st.sampled_from(["null", "{}", "[]", '{"k":1}', '{"":"v"}', '{"k":"v"', "x" * 2049])
    | labels.map(lambda value: orjson.dumps(value).decode())
    | st.sampled_from([o.value for o in schema.Outcome])
    | st.text(alphabet=st.characters(codec="ascii"), max_size=12)
    | json_scalars
)


@st.composite
def completed_entries(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid entry with some values replaced or dropped, as bytes (redis-py) or text."""
    fields: dict[str, Any] = dict(COMPLETED)
    for name in draw(st.lists(st.sampled_from(sorted(COMPLETED)), max_size=3)):
        if draw(st.booleans()):
            fields[name] = draw(completed_values)
        else:
            fields.pop(name, None)
    form = draw(st.sampled_from(["text", "bytes", "list"]))
    if form == "text":
        return fields
    as_bytes = {k.encode(): v.encode() if isinstance(v, str) else v for k, v in fields.items()}
    if form == "bytes":
        return as_bytes
    # As Redis sends an entry: names and values in one list, in the order they were written
    # (the apply script's, unless a field was dropped or replaced above).
    return [x for kv in as_bytes.items() for x in kv]  # type: ignore[return-value]


FINISHED_FIELDS = (
    "worker_id",
    "model",
    "outcome",
    "start_time",
    "duration_ms",
    "ttft_ms",
    "ttfb_ms",
)


@FUZZ
@given(completed_entries())
def test_the_completed_decoder_accepts_exactly_what_the_field_rules_do(
    fields: dict[Any, Any],
) -> None:
    try:
        got: Any = schema.decode_completed(b"1-0", fields)
    except MalformedMessage:
        got = wire_rules.Reject
    by_name = (
        dict(zip(fields[0::2], fields[1::2], strict=True)) if isinstance(fields, list) else fields
    )
    try:
        expected: Any = wire_rules.completed(b"1-0", by_name)
    except wire_rules.Reject:
        expected = wire_rules.Reject
    assert got == expected
    # What the stream service reads of every entry: the same verdict, the same values.
    try:
        done: Any = schema.finished_of(fields)
    except MalformedMessage:
        done = wire_rules.Reject
    if got is wire_rules.Reject:
        assert done is wire_rules.Reject
    else:
        assert msgspec.structs.asdict(done) == {name: got[name] for name in FINISHED_FIELDS}


def test_completed_entries_with_non_ascii_digits_are_malformed() -> None:
    fields = dict.fromkeys(schema.COMPLETED_FIELDS, "1")
    fields.update(outcome="ok", status="\u00b2", labels="")
    with pytest.raises(MalformedMessage):
        schema.decode_completed(b"1-0", fields)
    fields["status"] = "200"
    assert schema.decode_completed(b"\xff-0", fields)["status"] == 200


# --------------------------------------------------------------------------- round trips


@ROUND_TRIP
@given(batches())
def test_every_valid_batch_round_trips(batch: dict[str, Any]) -> None:
    # The way the worker's Lua script builds it: envelope prefix, seq, then the events.
    raw = (
        schema.envelope_prefix(batch["worker_id"], batch["epoch"])
        + str(batch["seq"]).encode()
        + b',"events":'
        + schema.encode(batch["events"])
        + b"}"
    )
    assert msgspec.to_builtins(schema.decode_batch(raw)) == batch


@ROUND_TRIP
@given(rows())
def test_every_valid_row_round_trips(row: schema.Row) -> None:
    assert schema.decode_row(schema.encode_row(row)) == row


@ROUND_TRIP
@given(ids.flatmap(records))
def test_every_valid_worker_record_round_trips(record: schema.WorkerRecord) -> None:
    assert schema.decode_worker_record(schema.encode(record)) == record


@ROUND_TRIP
@given(
    rows(),
    st.integers(0, 599),
    outcomes,
    finite.map(abs),
    st.text(min_size=1, max_size=8),
    st.none() | millis,
    st.none() | millis,
)
def test_every_completed_entry_round_trips(
    row: schema.Row,
    status: int,
    outcome: str,
    duration: float,
    entry_id: str,
    ttft: float | None,
    ttfb: float | None,
) -> None:
    # An empty object is written as "" and read back as null, like an absent one.
    row["labels"] = row.get("labels") or None
    entry = schema.CompletedEntry(
        request_id=row["request_id"],
        worker_id=row["worker_id"],
        model=row["model"],
        method=row["method"],
        path=row["path"],
        status=status,
        outcome=outcome,
        start_time=row["start_time"],
        duration_ms=duration,
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        bytes_out=row["bytes_out"],
        ttft_ms=ttft,
        ttfb_ms=ttfb,
        labels=row["labels"],
    )
    # As Redis hands them back: field names and values as bytes.
    fields = {
        name.encode(): value.encode()
        for name, value in zip(schema.COMPLETED_FIELDS, schema.completed_values(entry), strict=True)
    }
    fields[b"ttft_ms"] = b"" if ttft is None else repr(ttft).encode()
    fields[b"ttfb_ms"] = b"" if ttfb is None else repr(ttfb).encode()
    assert schema.decode_completed(entry_id, fields) == {**entry, "id": entry_id}


@pytest.mark.parametrize("name", ["ttft_ms", "ttfb_ms"])
def test_completed_entries_without_a_later_time_field_or_with_a_bad_one(name: str) -> None:
    later = ("ttft_ms", "ttfb_ms", "labels")
    fields = {f: "1" for f in schema.COMPLETED_FIELDS if f not in later}
    fields.update(outcome="cancelled", model="")
    entry = schema.decode_completed("1-0", fields)  # written before the field existed
    assert entry[name] is None and entry["outcome"] == "cancelled"  # type: ignore[literal-required]
    assert schema.decode_completed("1-0", {**fields, name: "2.5"})[name] == 2.5  # type: ignore[literal-required]
    for bad in ("nan", "-1", "inf", "soon"):
        with pytest.raises(MalformedMessage, match=name):
            schema.decode_completed("1-0", {**fields, name: bad})


def test_a_row_from_a_writer_without_the_later_fields_decodes_with_nulls() -> None:
    old = {
        "request_id": "r1",
        "worker_id": "w1",
        "method": "POST",
        "path": "/v1/messages",
        "model": "m",
        "provider": None,
        "is_streaming": False,
        "start_time": 1.5,
        "phase": "upstream",
        "bytes_out": 0,
        "input_tokens": None,
        "output_tokens": None,
    }
    row = schema.decode_row(orjson.dumps(old))
    later = {
        "ttft_ms": None,
        "chunks_out": None,
        "ttfb_ms": None,
        "last_output_at": None,
        "labels": None,
    }
    assert row == {**old, **later}
    assert wire_rules.row(old) == row
    for bad in (
        {"ttft_ms": -1.0},
        {"ttft_ms": "1"},
        {"chunks_out": -1},
        {"chunks_out": 1.5},
        {"ttfb_ms": True},
        {"last_output_at": "now"},
        {"last_output_at": -2.0},
    ):
        with pytest.raises(MalformedMessage):
            schema.decode_row(orjson.dumps({**old, **bad}))


def test_oversized_messages_are_rejected_before_parsing() -> None:
    with pytest.raises(MalformedMessage, match="limit"):
        schema.decode_row(b" " * (schema.MAX_ROW_BYTES + 1))
    with pytest.raises(MalformedMessage, match="limit"):
        schema.decode_batch(b"[" * (schema.MAX_MESSAGE_BYTES + 1))


# --------------------------------------------------------------------------- the reader


async def test_garbage_in_a_workers_hashes_is_counted_not_fatal(
    fake_redis: aioredis.Redis,
) -> None:
    keys = Keys("fuzz")
    good = schema.Row(
        request_id="r1",
        worker_id="w1",
        method="POST",
        path="/v1/x",
        model=None,
        provider=None,
        is_streaming=False,
        start_time=1.0,
        phase="upstream",
        bytes_out=0,
        input_tokens=None,
        output_tokens=None,
    )
    await fake_redis.hset(keys.seq, "w1", b"e1:\xc2\xb2")  # "²": not a seq
    await fake_redis.hset(
        keys.active("w1"),
        mapping={b"r1": schema.encode_row(good), b"\xff\xfe": b"{}", b"r2": b"\x00garbage"},
    )
    state = await read_worker_state(fake_redis, keys, "w1")
    assert state.epoch is None
    assert set(state.rows) == {"r1"}
    assert state.malformed == 3


# --------------------------------------------------------------------------- the field rules


def _by_rules(check: Any, raw: bytes) -> Any:
    try:
        return check(raw)
    except wire_rules.Reject:
        return wire_rules.Reject


def _by_decoder(decode: Any, raw: bytes) -> Any:
    try:
        value = decode(raw)
    except MalformedMessage:
        return wire_rules.Reject
    if isinstance(value, schema.Batch):
        # A worker_up's record as readers keep it (null upstream and version become "").
        return {
            **msgspec.to_builtins(value),
            "events": [
                {"type": e.type, "worker": e.worker.as_record()}
                if isinstance(e, schema.WorkerUp)
                else msgspec.to_builtins(e)
                for e in value.events
            ],
        }
    return msgspec.to_builtins(value)


# Values at and just past every limit, and each allowed word: where a rule could be off by one.
EDGES: list[Any] = [
    *("x" * n for n in (0, 1, 16, 17, 32, 33, 128, 129, 256, 257, 512, 513)),
    *("\u00e9" * n for n in (128, 129)),  # characters, not bytes
    *(p.value for p in schema.Phase),
    *(o.value for o in schema.Outcome),
    -1,
    0,
    (1 << 53) - 1,
    1 << 53,
    -0.5,
    0.5,
    -0.0,
    True,
    False,
    None,
    [],
    {},
    # labels at and just past their limits
    {"k" * schema.MAX_LABEL_KEY_CHARS: "v" * schema.MAX_LABEL_VALUE_CHARS},
    {"k" * (schema.MAX_LABEL_KEY_CHARS + 1): "v"},
    {"k": "v" * (schema.MAX_LABEL_VALUE_CHARS + 1)},
    {"": "v"},
    {"k": 1},
    {f"k{i}": "v" for i in range(schema.MAX_LABELS)},
    {f"k{i}": "v" for i in range(schema.MAX_LABELS + 1)},
]
edges = st.sampled_from(EDGES)


@st.composite
def mangled(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with one field (sometimes more) replaced by an edge value or any JSON value,
    or dropped, and sometimes an unknown field added."""
    obj = dict(base)
    names = sorted(base)
    for name in [draw(st.sampled_from(names)), *draw(st.lists(st.sampled_from(names), max_size=2))]:
        action = draw(st.sampled_from(["edge", "any", "drop"]))
        if action == "drop":
            obj.pop(name, None)
        else:
            obj[name] = draw(edges if action == "edge" else json_scalars)
    if draw(st.booleans()):
        obj[draw(st.text(max_size=8))] = draw(json_scalars)
    return obj


@st.composite
def mangled_batches(draw: st.DrawFn) -> bytes:
    """A batch whose envelope or one of its events (or the row in it) was mangled."""
    batch = draw(batches())
    events = batch["events"]
    if events and draw(st.booleans()):
        i = draw(st.integers(0, len(events) - 1))
        event = events[i]
        if "row" in event and draw(st.booleans()):
            event = {**event, "row": draw(mangled(event["row"]))}
        elif "worker" in event and draw(st.booleans()):
            event = {**event, "worker": draw(mangled(event["worker"]))}
        else:
            event = draw(mangled(event))
        events = [*events[:i], event, *events[i + 1 :]]
        return orjson.dumps({**batch, "events": events})
    return orjson.dumps(draw(mangled(batch)))


@FUZZ
@given(mangled_batches())
def test_the_decoder_accepts_a_batch_exactly_when_the_field_rules_do(raw: bytes) -> None:
    assert _by_decoder(schema.decode_batch, raw) == _by_rules(wire_rules.batch, raw)


@FUZZ
@given(rows().flatmap(lambda row: mangled(dict(row))))
def test_the_decoder_accepts_a_row_exactly_when_the_field_rules_do(obj: dict[str, Any]) -> None:
    raw = orjson.dumps(obj)
    expected = _by_rules(lambda r: wire_rules.row(wire_rules.load(r, schema.MAX_ROW_BYTES)), raw)
    assert _by_decoder(schema.decode_row, raw) == expected


@FUZZ
@given(ids.flatmap(records).flatmap(lambda record: mangled(dict(record))))
def test_the_decoder_accepts_a_record_exactly_when_the_field_rules_do(
    obj: dict[str, Any],
) -> None:
    raw = orjson.dumps(obj)
    expected = _by_rules(
        lambda r: wire_rules.record(wire_rules.load(r, schema.MAX_RECORD_BYTES)), raw
    )
    assert _by_decoder(schema.decode_worker_record, raw) == expected


def _every_edge(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """``obj`` with each of its fields in turn dropped, and set to each edge value."""
    out = []
    for name in obj:
        out.append({k: v for k, v in obj.items() if k != name})
        out += [{**obj, name: value} for value in EDGES]
    return out


ROW = {
    "request_id": "r1", "worker_id": "w1", "method": "POST", "path": "/v1/chat/completions",
    "model": "m", "provider": "openai", "is_streaming": True, "start_time": 1.5,
    "phase": "streaming", "bytes_out": 3, "input_tokens": 4, "output_tokens": 5, "ttft_ms": 1.5,
    "chunks_out": 2, "ttfb_ms": 1.25, "last_output_at": 1764036000.5, "labels": {"team": "a"},
}  # fmt: skip
RECORD = {
    "worker_id": "w1", "host": "h", "pid": 1, "started_at": 1.5, "upstream": "u", "version": "v",
    "epoch": "e", "heartbeat_interval": 2.0, "ttl": 10.0, "events_dropped": 0,
    "instance": "i", "cancellable": True, "completed_dropped": 0,
}  # fmt: skip
EVENTS = [
    {"type": "start", "row": ROW},
    {"type": "progress", "request_id": "r1", **{k: ROW[k] for k in schema.PROGRESS_FIELDS}},
    {"type": "end", "request_id": "r1", "status": 200, "outcome": "ok", "duration_ms": 1.5,
     "input_tokens": 1, "output_tokens": 2},
    {"type": "worker_up", "worker": RECORD},
    {"type": "worker_down", "worker_id": "w1", "reason": "shutdown"},
]  # fmt: skip


def _batch_of(*events: Any, **envelope: Any) -> bytes:
    return orjson.dumps({"v": 1, "worker_id": "w1", "epoch": "e", "seq": 1, **envelope,
                         "events": list(events)})  # fmt: skip


def test_every_field_at_every_edge_is_decided_as_the_field_rules_decide() -> None:
    """Each field of each event, row, record and envelope: dropped, and set to each edge value
    (exhaustive, where the random tests above could miss one field's boundary)."""
    cases = [orjson.dumps(row) for row in _every_edge(ROW)]
    for raw in cases:
        expected = _by_rules(lambda r: wire_rules.row(wire_rules.load(r, 4096)), raw)
        assert _by_decoder(schema.decode_row, raw) == expected, raw
    for record in _every_edge(RECORD):
        raw = orjson.dumps(record)
        expected = _by_rules(lambda r: wire_rules.record(wire_rules.load(r, 4096)), raw)
        assert _by_decoder(schema.decode_worker_record, raw) == expected, raw
    envelope = {"v": 1, "worker_id": "w1", "epoch": "e", "seq": 1}
    batches = [_batch_of(**e) for e in _every_edge(envelope)]
    batches += [_batch_of(e) for event in EVENTS for e in _every_edge(event)]
    batches += [_batch_of({**EVENTS[0], "row": r}) for r in _every_edge(ROW)]
    batches += [_batch_of({**EVENTS[3], "worker": r}) for r in _every_edge(RECORD)]
    for raw in batches:
        assert _by_decoder(schema.decode_batch, raw) == _by_rules(wire_rules.batch, raw), raw


def test_a_batch_holding_one_bad_event_is_malformed_as_a_whole() -> None:
    good = {"type": "progress", "request_id": "r1", "bytes_out": 5}
    bad = {"type": "progress", "request_id": "r2", "bytes_out": -1}
    raw = orjson.dumps({"v": 1, "worker_id": "w", "epoch": "e", "seq": 2, "events": [good, bad]})
    with pytest.raises(MalformedMessage, match=r"events\[1\]"):
        schema.decode_batch(raw)


def test_text_that_is_not_utf8_encodable_is_malformed() -> None:
    # A str holding a lone surrogate cannot be encoded to the UTF-8 the decoder reads; the
    # UnicodeEncodeError it raised would have ended the hub's reader task.
    envelope = '{"v":1,"worker_id":"\ud800","epoch":"e","seq":1,"events":[]}'
    for decode in (schema.decode_batch, schema.decode_row, schema.decode_worker_record):
        with pytest.raises(MalformedMessage):
            decode(envelope)


def test_the_decoder_knows_every_row_field_and_progress_changes_only_row_fields() -> None:
    # A field added to Row (what writers build) must be added to WireRow (what readers take).
    assert schema.WireRow.__struct_fields__ == schema.ROW_FIELDS
    assert set(schema.ROW_FIELDS) >= schema.PROGRESS_FIELDS
    assert set(get_args(schema.PhaseName)) == {p.value for p in schema.Phase}
    assert set(get_args(schema.OutcomeName)) == {o.value for o in schema.Outcome}


def test_a_progress_event_changes_exactly_the_fields_it_carries() -> None:
    raw = orjson.dumps(
        {
            "v": 1,
            "worker_id": "w",
            "epoch": "e",
            "seq": 2,
            "events": [{"type": "progress", "request_id": "r", "model": None, "bytes_out": 7}],
        }
    )
    (event,) = schema.decode_batch(raw).events
    assert isinstance(event, schema.Progress)
    assert event.changes() == {"model": None, "bytes_out": 7}


def test_labels_are_checked_like_every_field() -> None:
    row = {
        "request_id": "r1",
        "worker_id": "w1",
        "method": "POST",
        "path": "/v1/messages",
        "model": "m",
        "provider": None,
        "is_streaming": False,
        "start_time": 1.5,
        "phase": "upstream",
        "bytes_out": 0,
        "input_tokens": None,
        "output_tokens": None,
        "labels": {"team": "a", "user": "u" * schema.MAX_LABEL_VALUE_CHARS},
    }
    assert schema.decode_row(orjson.dumps(row))["labels"] == row["labels"]
    for bad in (
        [],
        "team=a",
        {"team": 1},
        {"": "a"},
        {"k" * (schema.MAX_LABEL_KEY_CHARS + 1): "a"},
        {"team": "v" * (schema.MAX_LABEL_VALUE_CHARS + 1)},
        {f"k{i}": "v" for i in range(schema.MAX_LABELS + 1)},
    ):
        with pytest.raises(MalformedMessage, match="labels"):
            schema.decode_row(orjson.dumps({**row, "labels": bad}))
        with pytest.raises(MalformedMessage, match="labels"):
            schema.decode_batch(
                orjson.dumps(
                    {
                        "v": 1,
                        "worker_id": "w1",
                        "epoch": "e",
                        "seq": 1,
                        "events": [{"type": "progress", "request_id": "r1", "labels": bad}],
                    }
                )
            )
    fields = {name: "1" for name in schema.COMPLETED_FIELDS}
    fields.update(outcome="ok", labels='{"team":"a"}')
    assert schema.decode_completed("1-0", fields)["labels"] == {"team": "a"}
    with pytest.raises(MalformedMessage):
        schema.decode_completed("1-0", {**fields, "labels": '{"team":2}'})
