"""The demo upstream: both vendors' wire formats, usage, per-request overrides, /echo, /bytes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.serving import running
from vdm_hub.services.demo.upstream import (
    BadOverride,
    UpstreamConfig,
    create_app,
    parse_overrides,
    pattern_bytes,
)

PROMPT = "Count to three, please."  # 23 characters -> 6 tokens
PROMPT_TOKENS = 6


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(latency=0, chunk_delay=0, chunks=4)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://upstream") as c:
        yield c


def body(model: str = "m-1", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": stream,
        **extra,
    }


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) per SSE event."""
    events = []
    for block in text.strip().split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


async def test_openai_completion_echoes_model_and_reports_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=body(), headers={"x-demo-chunks": "5"})
    assert r.status_code == 200
    doc = r.json()
    assert doc["object"] == "chat.completion"
    assert doc["model"] == "m-1"
    assert len(doc["choices"][0]["message"]["content"].split()) == 5
    assert doc["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 5,
        "total_tokens": 11,
    }


async def test_anthropic_message_reports_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", json=body("claude-x", system="Be brief."))
    assert r.status_code == 200
    doc = r.json()
    assert doc["type"] == "message" and doc["model"] == "claude-x"
    assert doc["content"][0]["type"] == "text"
    # system prompt counts too: (23 + 9) chars -> 8 tokens; 4 chunks by default here
    assert doc["usage"] == {"input_tokens": 8, "output_tokens": 4}


async def test_openai_stream_ends_with_usage_chunk_and_done(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json=body(stream=True), headers={"x-demo-chunks": "3"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"m-1"}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len(content) == 3 and all(content)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 3,
        "total_tokens": PROMPT_TOKENS + 3,
    }


async def test_anthropic_stream_follows_messages_event_order(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", json=body(stream=True), headers={"x-demo-chunks": "2"})
    assert r.status_code == 200
    events = sse_events(r.text)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = [orjson.loads(d) for _, d in events]
    assert [d["type"] for d in data] == names  # each data names its event, as the API does
    assert data[0]["message"]["model"] == "m-1"
    assert data[0]["message"]["usage"]["input_tokens"] == PROMPT_TOKENS
    assert data[6]["usage"] == {"output_tokens": 2}


async def test_responses_api_answer_reports_usage(client: httpx.AsyncClient) -> None:
    request = {"model": "gpt-4.1", "input": PROMPT, "instructions": "Be brief."}
    r = await client.post("/v1/responses", json=request, headers={"x-demo-chunks": "5"})
    assert r.status_code == 200
    doc = r.json()
    assert (doc["object"], doc["status"], doc["model"]) == ("response", "completed", "gpt-4.1")
    (item,) = doc["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert len(item["content"][0]["text"].split()) == 5
    # input and instructions count: (23 + 9) chars -> 8 tokens
    usage = doc["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (8, 5, 13)


async def test_responses_api_input_items_count_as_the_prompt(client: httpx.AsyncClient) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": PROMPT}]}]
    r = await client.post("/v1/responses", json={"model": "m", "input": items})
    assert r.json()["usage"]["input_tokens"] == PROMPT_TOKENS


async def test_responses_api_stream_follows_its_event_order(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/responses",
        json={"model": "gpt-4.1", "input": PROMPT, "stream": True},
        headers={"x-demo-chunks": "2"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    data = [orjson.loads(d) for _, d in events]
    assert [d["type"] for d in data] == names
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    deltas = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    assert deltas == data[6]["text"] and len(deltas.split()) == 2
    assert data[0]["response"]["status"] == "in_progress"
    final = data[-1]["response"]
    assert final["status"] == "completed" and final["model"] == "gpt-4.1"
    usage = final["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (PROMPT_TOKENS, 2)


async def test_the_sniffer_reads_what_the_demo_responses_api_sends(
    client: httpx.AsyncClient,
) -> None:
    from vdm_hub.services.proxy import sniff

    request = {"model": "gpt-4.1", "input": PROMPT, "stream": True}
    assert sniff.request_fields(orjson.dumps(request), complete=True) == ("gpt-4.1", True)
    r = await client.post("/v1/responses", json=request, headers={"x-demo-chunks": "3"})
    scanner = sniff.SSEScanner()
    scanner.feed(r.content)
    assert scanner.usage == {"input_tokens": PROMPT_TOKENS, "output_tokens": 3}
    assert scanner.data_events == 4 + 3 + 4
    r = await client.post("/v1/responses", json={**request, "stream": False})
    assert sniff.usage_from_json(r.content) == {"input_tokens": PROMPT_TOKENS, "output_tokens": 4}


@pytest.mark.parametrize("stream", [False, True])
async def test_every_answer_carries_the_vendors_own_request_id_header(
    client: httpx.AsyncClient, stream: bool
) -> None:
    openai = await client.post("/v1/chat/completions", json=body(stream=stream))
    responses = await client.post("/v1/responses", json=body(stream=stream, input=PROMPT))
    anthropic = await client.post("/v1/messages", json=body(stream=stream))
    failed = await client.post("/v1/messages", json=body(), headers={"x-demo-status": "529"})
    for r in (openai, responses):
        assert r.headers["x-request-id"].startswith("req_") and "request-id" not in r.headers
    for r in (anthropic, failed):
        assert r.headers["request-id"].startswith("req_") and "x-request-id" not in r.headers
    assert openai.headers["x-request-id"] != responses.headers["x-request-id"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
async def test_zero_chunks_gives_empty_answer_with_zero_output_tokens(
    client: httpx.AsyncClient, path: str
) -> None:
    r = await client.post(path, json=body(), headers={"x-demo-chunks": "0"})
    usage = r.json()["usage"]
    assert usage.get("completion_tokens", usage.get("output_tokens")) == 0


async def test_delay_header_holds_the_answer(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    r = await client.post("/v1/chat/completions", json=body(), headers={"x-demo-delay-ms": "300"})
    assert r.status_code == 200
    assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize(
    ("path", "check"),
    [
        ("/v1/chat/completions", lambda d: d["error"]["type"] == "server_error"),
        ("/v1/messages", lambda d: d["type"] == "error" and d["error"]["type"] == "api_error"),
    ],
)
async def test_forced_status_answers_with_vendor_error_body(
    client: httpx.AsyncClient, path: str, check: Any
) -> None:
    r = await client.post(path, json=body(stream=True), headers={"x-demo-status": "503"})
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    assert check(r.json())


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-demo-delay-ms", "-1"),
        ("x-demo-delay-ms", "600001"),
        ("x-demo-delay-ms", "1.5"),
        ("x-demo-chunks", "abc"),
        ("x-demo-chunks", "10001"),
        ("x-demo-chunk-delay-ms", "60001"),
        ("x-demo-status", "200"),
        ("x-demo-status", "600"),
    ],
)
async def test_bad_override_is_a_400_naming_the_header(
    client: httpx.AsyncClient, header: str, value: str
) -> None:
    r = await client.post("/v1/chat/completions", json=body(), headers={header: value})
    assert r.status_code == 400
    assert header in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]"])
async def test_invalid_json_body_is_a_400(
    client: httpx.AsyncClient, path: str, content: bytes
) -> None:
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "message" in r.json()["error"]


async def test_error_rate_one_fails_every_llm_request() -> None:
    transport = httpx.ASGITransport(app=create_app(latency=0, error_rate=1.0))
    async with httpx.AsyncClient(transport=transport, base_url="http://u") as c:
        statuses = {(await c.post("/v1/messages", json=body())).status_code for _ in range(5)}
        assert statuses == {500}
        assert (await c.get("/healthz")).status_code == 200


async def test_models_and_healthz(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"]
    assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_echo_describes_the_request(client: httpx.AsyncClient) -> None:
    payload = b"secret body \x00\xff" * 100
    r = await client.request(
        "PUT",
        "/echo/a/b%20c?x=1&y=two",
        content=payload,
        headers=[("X-Thing", "one"), ("X-Thing", "two"), ("X-Other", "3")],
    )
    assert r.status_code == 200
    doc = r.json()
    assert doc["method"] == "PUT"
    assert doc["path"] == "/echo/a/b c"
    assert doc["raw_path"] == "/echo/a/b%20c"
    assert doc["query"] == "x=1&y=two"
    assert doc["headers"]["x-thing"] == "one, two"
    assert doc["headers"]["x-other"] == "3"
    assert doc["body_bytes"] == len(payload)
    assert doc["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_echo_honours_forced_status(client: httpx.AsyncClient) -> None:
    r = await client.get("/echo/x", headers={"x-demo-status": "418"})
    assert r.status_code == 418
    assert r.json()["method"] == "GET"


async def test_bytes_sends_exactly_n_pattern_bytes(client: httpx.AsyncClient) -> None:
    r = await client.get("/bytes", params={"n": 1000, "chunk": 77})
    assert r.status_code == 200
    assert r.content == pattern_bytes(1000)
    assert r.headers["content-length"] == "1000"


@pytest.mark.parametrize("query", ["", "?n=-1", "?n=10&chunk=0", "?n=10&delay_ms=x"])
async def test_bytes_rejects_bad_parameters(client: httpx.AsyncClient, query: str) -> None:
    r = await client.get("/bytes" + query)
    assert r.status_code == 400
    assert "error" in r.json()


# --- over a real socket: pacing is visible to the client ------------------------------------


async def test_stream_reaches_client_chunk_by_chunk() -> None:
    app = create_app(latency=0, chunk_delay=0.3, chunks=2)
    async with (
        running(app, "upstream") as (url, _),
        httpx.AsyncClient(base_url=url, trust_env=False) as c,
        c.stream("POST", "/v1/chat/completions", json=body(stream=True)) as r,
    ):
        raw = r.aiter_raw()
        first = await anext(raw)
        rest = b"".join([chunk async for chunk in raw])
    assert b"[DONE]" not in first  # the first frames came before the paced content
    assert b"[DONE]" in rest


async def test_bytes_reach_client_chunk_by_chunk() -> None:
    async with (
        running(create_app(), "upstream") as (url, _),
        httpx.AsyncClient(base_url=url, trust_env=False) as c,
        c.stream("GET", "/bytes", params={"n": 300, "chunk": 100, "delay_ms": 300}) as r,
    ):
        received = [chunk async for chunk in r.aiter_raw()]
    assert len(received[0]) < 300
    assert b"".join(received) == pattern_bytes(300)


def test_the_first_token_delay_defaults_to_the_chunk_delay_and_can_be_overridden() -> None:
    config = UpstreamConfig(chunk_delay=0.02)
    assert parse_overrides({}, config).first_token_delay == 0.02
    assert parse_overrides({"x-demo-chunk-delay-ms": "5"}, config).first_token_delay == 0.005
    config = UpstreamConfig(chunk_delay=0.02, first_token_delay=2.0)
    assert parse_overrides({}, config).first_token_delay == 2.0
    over = parse_overrides({"x-demo-first-token-delay-ms": "300"}, config)
    assert (over.first_token_delay, over.chunk_delay) == (0.3, 0.02)
    with pytest.raises(BadOverride, match="x-demo-first-token-delay-ms"):
        parse_overrides({"x-demo-first-token-delay-ms": "-1"}, config)


@pytest.mark.parametrize(
    ("path", "first_content"),
    [
        ("/v1/messages", b"content_block_delta"),
        ("/v1/chat/completions", b'"content":"The'),
        ("/v1/responses", b"response.output_text.delta"),
    ],
)
async def test_a_stream_sends_its_preamble_at_once_and_its_first_token_after_the_delay(
    path: str, first_content: bytes
) -> None:
    app = create_app(latency=0, chunk_delay=0, chunks=2)
    request = body(stream=True, input=PROMPT)
    headers = {"x-demo-first-token-delay-ms": "300"}
    arrivals: list[tuple[float, bytes]] = []
    sent = time.monotonic()
    async with (
        running(app, "upstream") as (url, _),
        httpx.AsyncClient(base_url=url, trust_env=False) as c,
        c.stream("POST", path, json=request, headers=headers) as r,
    ):
        async for chunk in r.aiter_raw():
            arrivals.append((time.monotonic(), chunk))
    assert first_content not in arrivals[0][1]  # the preamble, alone
    content_at = next(t for t, chunk in arrivals if first_content in chunk)
    # The event loop's timer may fire up to a millisecond early.
    assert content_at - sent >= 0.299
