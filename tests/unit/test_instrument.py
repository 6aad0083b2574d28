"""The middleware's reports: a JSON request's first row already has its model and stream flag,
requests without a JSON body appear at once, a stalled body still appears, request ids are
unique while in flight; the response side reports TTFB, TTFT (the first output event of a
stream), SSE chunks and the last output's time, and sends exactly one X-Request-Id."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from vdm_hub.services.proxy import instrument
from vdm_hub.services.proxy.instrument import RequestMetricsMiddleware
from vdm_hub.shared.schema import Outcome, Row


class Recorded:
    """A Recorder double that keeps every call in order (rows copied as they were then)."""

    worker_id = "w1"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def start(self, row: Row) -> None:
        self.calls.append(("start", row["request_id"], dict(row)))

    def progress(self, request_id: str, fields: dict[str, Any]) -> None:
        self.calls.append(("progress", request_id, dict(fields)))

    def end(self, request_id: str, **fields: Any) -> None:
        self.calls.append(("end", request_id, fields))

    def discard(self, request_id: str, status: int) -> None:
        self.calls.append(("discard", request_id, {"status": status}))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [fields for k, _, fields in self.calls if k == kind]


def _scope(path: str, body: bytes | None, *, content_type: bytes = b"application/json") -> Any:
    headers = [(b"host", b"x")]
    if body is not None:
        headers += [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    return {
        "type": "http",
        "method": "POST" if body is not None else "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
    }


def _app(response: bytes, content_type: bytes, *, chunks: int = 1, reads: bool = True) -> Any:
    """An app that reads the whole body, then answers ``response`` in ``chunks`` parts."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if reads:
            while (await receive()).get("more_body"):
                pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type)],
            }
        )
        step = max(1, len(response) // chunks)
        for i in range(0, len(response), step):
            await send(
                {"type": "http.response.body", "body": response[i : i + step], "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def _run(app: Any, scope: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drive ``app`` with these request messages (then a client that stays); what it sent."""
    pending = list(messages)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with asyncio.timeout(5):
        await app(scope, receive, send)
    return sent


SHAPES = {
    "openai chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    "anthropic messages": (
        "/v1/messages",
        {"max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]},
    ),
    "openai responses": ("/v1/responses", {"input": "hi", "instructions": "be brief"}),
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("shape", sorted(SHAPES))
async def test_the_first_report_of_a_json_request_has_its_model_and_stream_flag(
    shape: str, streaming: bool
) -> None:
    path, extra = SHAPES[shape]
    # The order real SDKs send: the prompt first, the model and the flag after it.
    body = orjson.dumps({**extra, "model": f"model-{shape}", "stream": streaming})
    recorder = Recorded()
    mw = RequestMetricsMiddleware(_app(b"{}", b"application/json"), recorder)
    await _run(mw, _scope(path, body), [{"type": "http.request", "body": body}])
    kind, _, first = recorder.calls[0]
    assert kind == "start"
    assert (first["model"], first["is_streaming"]) == (f"model-{shape}", streaming)
    assert not [p for p in recorder.of("progress") if "model" in p or "is_streaming" in p]


async def test_model_and_stream_in_the_first_chunk_report_before_the_body_is_complete() -> None:
    head = b'{"model": "early", "stream": true, "messages": [{"content": "'
    recorder = Recorded()
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # the first chunk only
        started.set()
        assert recorder.of("start"), "reported while the rest of the body is still coming"
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = RequestMetricsMiddleware(app, recorder)
    await _run(
        mw,
        _scope("/v1/chat/completions", head + b'x"}]}'),
        [
            {"type": "http.request", "body": head, "more_body": True},
            {"type": "http.request", "body": b'x"}]}', "more_body": False},
        ],
    )
    assert started.is_set()
    assert recorder.of("start")[0]["model"] == "early"
    assert recorder.of("start")[0]["is_streaming"] is True


async def test_a_body_trickling_in_byte_by_byte_finds_a_model_split_across_chunks() -> None:
    body = b'{"messages": [], "model": "split-model", "stream": false, "x": "' + b"y" * 50
    recorder = Recorded()
    mw = RequestMetricsMiddleware(_app(b"{}", b"application/json"), recorder)
    messages = [
        {"type": "http.request", "body": body[i : i + 1], "more_body": True}
        for i in range(len(body))
    ] + [{"type": "http.request", "body": b'"}', "more_body": False}]
    await _run(mw, _scope("/v1/chat/completions", body + b'"}'), messages)
    start = recorder.of("start")[0]
    assert (start["model"], start["is_streaming"]) == ("split-model", False)


async def test_a_request_without_a_json_body_is_reported_at_once() -> None:
    recorder = Recorded()
    seen_before_app: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen_before_app.append(len(recorder.of("start")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = RequestMetricsMiddleware(app, recorder)
    await _run(mw, _scope("/v1/models", None), [{"type": "http.request", "body": b""}])
    await _run(
        mw,
        _scope("/upload", b"abc", content_type=b"text/plain"),
        [{"type": "http.request", "body": b"abc"}],
    )
    assert seen_before_app == [1, 2]
    assert [r["model"] for r in recorder.of("start")] == [None, None]
    assert [e["outcome"] for e in recorder.of("end")] == [Outcome.OK, Outcome.OK]


async def test_a_body_that_never_comes_is_still_reported_after_the_bound() -> None:
    recorder = Recorded()
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()  # never reads the body (an upstream connection that stalls)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = RequestMetricsMiddleware(app, recorder, start_bound=0.02)
    task = asyncio.create_task(_run(mw, _scope("/v1/messages", b"{}"), []))
    async with asyncio.timeout(5):
        while not recorder.of("start"):
            await asyncio.sleep(0.01)
    assert recorder.of("start")[0]["model"] is None
    assert not task.done()
    release.set()
    await task
    assert len(recorder.of("start")) == 1 and len(recorder.of("end")) == 1


async def test_a_request_that_ends_before_it_was_reported_is_reported_and_ended() -> None:
    recorder = Recorded()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    mw = RequestMetricsMiddleware(app, recorder, start_bound=60)
    with pytest.raises(RuntimeError):
        await _run(mw, _scope("/v1/messages", b"{}"), [])
    assert [k for k, _, _ in recorder.calls] == ["start", "end"]
    assert recorder.of("end")[0]["outcome"] == Outcome.ERROR


async def test_a_client_id_already_in_flight_gets_a_fresh_one() -> None:
    recorder = Recorded()
    gate = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = RequestMetricsMiddleware(app, recorder)

    def scope() -> Any:
        s = _scope("/v1/models", None)
        s["headers"].append((b"x-request-id", b"same-id"))
        return s

    first = asyncio.create_task(_run(mw, scope(), []))
    second = asyncio.create_task(_run(mw, scope(), []))
    async with asyncio.timeout(5):
        while len(recorder.of("start")) < 2:
            await asyncio.sleep(0)
    gate.set()
    sent = await asyncio.gather(first, second)
    ids = [r["request_id"] for r in recorder.of("start")]
    assert ids[0] == "same-id" and ids[1] != "same-id" and len(ids[1]) == 32
    headers = [dict(s[0]["headers"])[b"x-request-id"].decode() for s in sent]
    assert sorted(headers) == sorted(ids)
    assert sorted(rid for k, rid, _ in recorder.calls if k == "end") == sorted(ids)
    # Once both are done the client's id is free again.
    await _run(mw, scope(), [])
    assert recorder.of("start")[-1]["request_id"] == "same-id"


def _paced_app(frames: list[bytes], gap: float, content_type: bytes, headers: Any = ()) -> Any:
    """An app that sends ``frames`` one body message each; before the second, it waits
    ``gap`` seconds (an upstream's preamble, then the model's first token)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        start_headers = [(b"content-type", content_type), *headers]
        await send({"type": "http.response.start", "status": 200, "headers": start_headers})
        for i, frame in enumerate(frames):
            if i == 1:
                await asyncio.sleep(gap)
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


STREAM_BODY = b'{"model":"m","stream":true}'


async def _stream_through(app: Any, recorder: Recorded) -> list[dict[str, Any]]:
    return await _run(
        RequestMetricsMiddleware(app, recorder),
        _scope("/v1/messages", STREAM_BODY),
        [{"type": "http.request", "body": STREAM_BODY}],
    )


async def test_ttft_of_a_stream_is_its_first_output_event_and_ttfb_its_first_byte() -> None:
    preamble = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{}}}\n\n'
        b'event: ping\ndata: {"type": "ping"}\n\n'
    )
    token = (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}\n\n'
    )
    recorder = Recorded()
    await _stream_through(_paced_app([preamble, token, token], 0.2, b"text/event-stream"), recorder)
    first, second = recorder.of("progress")[:2]
    # The preamble's bytes start the stream; they are not a token.
    assert first["phase"] == "streaming" and first["ttfb_ms"] >= 0 and "ttft_ms" not in first
    assert first["chunks_out"] == 2
    # The first token is reported at once, not at the next progress cadence.
    assert second["ttft_ms"] - first["ttfb_ms"] >= 200 and second["chunks_out"] == 3
    end = recorder.of("end")[0]
    assert (end["ttft_ms"], end["ttfb_ms"]) == (second["ttft_ms"], first["ttfb_ms"])


async def test_a_stream_without_output_has_no_ttft_and_any_other_body_its_first_byte() -> None:
    recorder = Recorded()
    pings = [b'event: ping\ndata: {"type": "ping"}\n\n'] * 2
    await _stream_through(_paced_app(pings, 0, b"text/event-stream"), recorder)
    assert all("ttft_ms" not in p for p in recorder.of("progress"))
    end = recorder.of("end")[0]
    assert end["ttft_ms"] is None and end["ttfb_ms"] is not None

    recorder = Recorded()
    plain = RequestMetricsMiddleware(_app(b'{"usage": {}}', b"application/json"), recorder)
    await _run(
        plain, _scope("/v1/chat/completions", b"{}"), [{"type": "http.request", "body": b"{}"}]
    )
    first = recorder.of("progress")[0]
    assert first["ttft_ms"] == first["ttfb_ms"] >= 0 and "chunks_out" not in first
    assert recorder.of("start")[0]["chunks_out"] is None
    assert recorder.of("start")[0]["ttfb_ms"] is None


async def test_last_output_at_is_the_wall_clock_time_of_the_last_data_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(instrument, "PROGRESS_INTERVAL", 0.05)
    recorder = Recorded()
    frames = [b"data: {}\n\n", b": a keep-alive comment, not output\n\n"]
    before = time.time()
    await _stream_through(_paced_app(frames, 0.1, b"text/event-stream"), recorder)
    after = time.time()
    assert recorder.of("start")[0]["last_output_at"] is None
    first, second = recorder.of("progress")
    # Rounded to the millisecond; before the gap, not when reported.
    assert before - 0.001 <= first["last_output_at"] <= before + (after - before) / 2
    # The comment came after the progress cadence: reported, but it is no output event.
    assert second["bytes_out"] > first["bytes_out"]
    assert second["last_output_at"] == first["last_output_at"]


@pytest.mark.parametrize(
    ("app_headers", "expected"),
    [
        # The upstream's own id (OpenAI sends one) moves aside; the client sees the hub's.
        ([(b"x-request-id", b"req_upstream")], [(b"x-upstream-request-id", b"req_upstream")]),
        # An app that echoed the hub's id: still one header.
        ([(b"x-request-id", b"client-1")], []),
        # Behind another hub worker: the id nearest the upstream is kept.
        (
            [(b"x-upstream-request-id", b"req_openai"), (b"X-Request-Id", b"hop-2")],
            [(b"x-upstream-request-id", b"req_openai")],
        ),
        ([], []),
    ],
)
async def test_the_response_carries_exactly_one_x_request_id_the_hubs(
    app_headers: list[tuple[bytes, bytes]], expected: list[tuple[bytes, bytes]]
) -> None:
    recorder = Recorded()
    app = _paced_app([b"{}"], 0, b"application/json", app_headers)
    scope = _scope("/v1/chat/completions", b"{}")
    scope["headers"].append((b"x-request-id", b"client-1"))
    sent = await _run(
        RequestMetricsMiddleware(app, recorder), scope, [{"type": "http.request", "body": b"{}"}]
    )
    headers = [(k.lower(), v) for k, v in sent[0]["headers"] if k != b"content-type"]
    assert sorted(headers) == sorted([*expected, (b"x-request-id", b"client-1")])
    # Without the hub's header, the app's headers pass as they were.
    sent = await _run(
        RequestMetricsMiddleware(app, recorder, request_id_header=False),
        _scope("/v1/chat/completions", b"{}"),
        [{"type": "http.request", "body": b"{}"}],
    )
    assert sent[0]["headers"] == [(b"content-type", b"application/json"), *app_headers]
