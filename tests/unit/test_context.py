"""``current_request()``: the app's handle on the request it serves — labels within their
limits, token usage and the model the app knows win over what was sniffed, and nothing
happens (or raises) outside a request or after it ended."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from tests.unit.test_instrument import Recorded, _run, _scope
from vdm_hub import current_request
from vdm_hub.services.proxy.context import RequestHandle
from vdm_hub.services.proxy.instrument import RequestMetricsMiddleware
from vdm_hub.shared import schema

BODY = orjson.dumps({"model": "from-body", "stream": False})
USAGE = orjson.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}})


def _app(during: Any) -> Any:
    """Reads the body, calls ``during(handle)``, answers JSON with a usage block."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        during(current_request())
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": USAGE})

    return app


async def _serve(during: Any) -> Recorded:
    recorder = Recorded()
    mw = RequestMetricsMiddleware(_app(during), recorder)
    await _run(mw, _scope("/v1/chat/completions", BODY), [{"type": "http.request", "body": BODY}])
    return recorder


def test_outside_a_request_there_is_none() -> None:
    assert current_request() is None


async def test_labels_usage_and_model_go_on_the_row_and_into_the_end() -> None:
    seen: list[RequestHandle] = []

    def during(handle: RequestHandle | None) -> None:
        assert handle is not None
        seen.append(handle)
        handle.set_label("team", "search")
        handle.set_labels({"user": 42, "team": "ads"})
        handle.set_usage(input_tokens=100, output_tokens=200)
        handle.set_model("gpt-4o-2024-08-06")

    recorder = await _serve(during)
    (handle,) = seen
    (start,) = recorder.of("start")
    assert handle.request_id == start["request_id"] and handle.worker_id == "w1"
    changes: dict[str, Any] = {}
    for fields in recorder.of("progress"):
        changes.update(fields)
    assert changes["labels"] == {"team": "ads", "user": "42"}
    assert changes["model"] == "gpt-4o-2024-08-06"
    (end,) = recorder.of("end")
    # The app's counts win over the response's usage block (3 and 4).
    assert (end["input_tokens"], end["output_tokens"]) == (100, 200)
    # After the end: harmless no-ops, and nothing more is reported.
    calls = len(recorder.calls)
    handle.set_label("late", "x")
    handle.set_usage(input_tokens=1)
    handle.set_model("late")
    assert len(recorder.calls) == calls
    assert current_request() is None


async def test_labels_set_before_the_start_is_reported_are_on_the_first_row() -> None:
    recorder = Recorded()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        handle = current_request()
        assert handle is not None and not recorder.of("start")  # the body names the model
        handle.set_label("team", "early")
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = RequestMetricsMiddleware(app, recorder)
    await _run(mw, _scope("/v1/messages", BODY), [{"type": "http.request", "body": BODY}])
    (start,) = recorder.of("start")
    assert start["labels"] == {"team": "early"} and start["model"] == "from-body"
    assert not [p for p in recorder.of("progress") if "labels" in p]


async def test_labels_stay_within_their_limits(caplog: pytest.LogCaptureFixture) -> None:
    result: dict[str, str] = {}

    def during(handle: RequestHandle | None) -> None:
        assert handle is not None
        handle.set_label("k" * (schema.MAX_LABEL_KEY_CHARS + 1), "too long a key")
        handle.set_label("", "empty key")
        handle.set_label("long", "v" * 500)
        for i in range(schema.MAX_LABELS + 3):
            handle.set_label(f"n{i}", str(i))
        handle.set_label("long", None)  # removes it
        result.update(handle.labels)

    with caplog.at_level(logging.WARNING, logger="vdm.instrument"):
        await _serve(during)
    assert len(result) == schema.MAX_LABELS - 1  # "long" took a place, then was removed
    assert set(result) == {f"n{i}" for i in range(schema.MAX_LABELS - 1)}
    assert len(orjson.dumps(result)) <= schema.MAX_LABELS_JSON_BYTES
    # Left-out labels are logged, once per kind per process, never with their values.
    assert "too long a key" not in caplog.text and "v" * 50 not in caplog.text


async def test_long_values_are_cut_and_the_json_stays_within_its_bound() -> None:
    result: dict[str, str] = {}

    def during(handle: RequestHandle | None) -> None:
        assert handle is not None
        handle.set_label("long", "v" * 500)
        assert handle.labels["long"] == "v" * schema.MAX_LABEL_VALUE_CHARS
        for i in range(schema.MAX_LABELS):
            handle.set_label(f"key{i:02d}" + "k" * 25, "é" * schema.MAX_LABEL_VALUE_CHARS)
        result.update(handle.labels)

    await _serve(during)
    assert len(orjson.dumps(result)) <= schema.MAX_LABELS_JSON_BYTES
    assert 0 < len(result) < schema.MAX_LABELS


async def test_each_request_sees_its_own_handle() -> None:
    recorder = Recorded()
    gate = asyncio.Event()
    ids: dict[str, str] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        handle = current_request()
        assert handle is not None
        handle.set_label("path", scope["path"])
        await gate.wait()  # both requests in flight at once
        ids[scope["path"]] = current_request().request_id  # type: ignore[union-attr]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = RequestMetricsMiddleware(app, recorder)
    runs = [
        asyncio.create_task(_run(mw, _scope(p, None), [{"type": "http.request"}]))
        for p in ("/a", "/b")
    ]
    while len(recorder.of("start")) < 2:
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*runs)
    starts = {s["path"]: s["request_id"] for s in recorder.of("start")}
    assert ids == starts
    labels = [fields["labels"] for fields in recorder.of("progress") if "labels" in fields]
    assert sorted(label["path"] for label in labels) == ["/a", "/b"]
