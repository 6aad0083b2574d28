"""``vdm-hub demo-upstream``: a fake OpenAI- and Anthropic-compatible LLM API (OpenAI's chat
completions and Responses API, Anthropic's Messages API; streaming or not).

It stands in for a real LLM API in the demo, the tests and the benchmarks, so it does no
per-request work beyond building a few small JSON documents. Pacing comes from the command
line (``--latency``, ``--first-token-delay``, ``--chunk-delay``, ``--chunks``, ``--error-rate``)
and can be overridden per request with headers, which is how tests and benchmarks hold
requests open:

- ``x-demo-delay-ms``: delay before the first response byte (for a non-streaming answer that
  is the whole answer);
- ``x-demo-chunks``: content chunks (= output tokens) of the answer;
- ``x-demo-first-token-delay-ms``: delay between a stream's pre-content preamble (sent at once:
  OpenAI's role-only chunk, Anthropic's ``message_start``/``content_block_start``/``ping``, the
  Responses API's ``response.created`` and friends) and its first content chunk, as real LLM
  APIs do (default: the chunk delay);
- ``x-demo-chunk-delay-ms``: delay before each content chunk of a stream;
- ``x-demo-status``: answer with this HTTP status (400-599) and the vendor's error body.

A client that goes away while its request is held is noticed at once (the hold watches for
``http.disconnect``), so cancelled benchmark requests do not pile up sleeping here.

Besides the LLM endpoints: ``GET /v1/models``, ``GET /healthz``, ``ANY /echo/{path}``
(describes the request it got, for the proxy's tests) and ``GET /bytes?n=&chunk=&delay_ms=``
(N raw bytes in paced chunks, for incremental-streaming tests).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from vdm_hub.services.demo import vendors
from vdm_hub.services.demo.vendors import Vendor
from vdm_hub.shared.options import listen_host, number, port, whole
from vdm_hub.shared.responses import JSONResponse
from vdm_hub.shared.serve import serve
from vdm_hub.shared.settings import Settings

MAX_DELAY_MS = 600_000  # 10 minutes
MAX_CHUNKS = 10_000
MAX_CHUNK_DELAY_MS = 60_000
MAX_BYTES = 1 << 30
MAX_BYTES_CHUNK = 1 << 20

# Cache-Control and X-Accel-Buffering as real SSE APIs send them, so proxies pass chunks on.
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

# /bytes content: a repeating printable pattern, so a test can check order as well as length.
_PATTERN = bytes(range(ord("!"), ord("!") + 64))


class BadOverride(ValueError):
    """A request header or query parameter has a value outside its bounds."""


@dataclass(frozen=True)
class UpstreamConfig:
    latency: float = 0.05  # seconds before the first response byte
    chunk_delay: float = 0.02  # seconds before each content chunk of a stream
    # Seconds between a stream's preamble and its first content chunk; None: chunk_delay.
    first_token_delay: float | None = None
    chunks: int = 16  # content chunks (= output tokens) per answer
    error_rate: float = 0.0  # share of LLM requests answered with a 500


@dataclass(frozen=True)
class Overrides:
    delay: float
    chunks: int
    chunk_delay: float
    first_token_delay: float
    status: int | None


def _bounded_int(source: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = source.get(name)
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or not low <= int(text) <= high:
        raise BadOverride(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
    return int(text)


def parse_overrides(headers: Mapping[str, str], config: UpstreamConfig) -> Overrides:
    delay_ms = _bounded_int(headers, "x-demo-delay-ms", 0, MAX_DELAY_MS)
    chunks = _bounded_int(headers, "x-demo-chunks", 0, MAX_CHUNKS)
    chunk_delay_ms = _bounded_int(headers, "x-demo-chunk-delay-ms", 0, MAX_CHUNK_DELAY_MS)
    first_ms = _bounded_int(headers, "x-demo-first-token-delay-ms", 0, MAX_DELAY_MS)
    status = _bounded_int(headers, "x-demo-status", 400, 599)
    chunk_delay = config.chunk_delay if chunk_delay_ms is None else chunk_delay_ms / 1000
    if first_ms is not None:
        first_token_delay = first_ms / 1000
    elif config.first_token_delay is not None:
        first_token_delay = config.first_token_delay
    else:
        first_token_delay = chunk_delay
    return Overrides(
        delay=config.latency if delay_ms is None else delay_ms / 1000,
        chunks=config.chunks if chunks is None else chunks,
        chunk_delay=chunk_delay,
        first_token_delay=first_token_delay,
        status=status,
    )


async def _hold(request: Request, seconds: float) -> bool:
    """Wait ``seconds`` before answering; False if the client went away meanwhile.

    Call only after the request body has been read: then the next ASGI message can only be
    ``http.disconnect``.
    """
    if seconds <= 0:
        return True
    try:
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return True
    return False


async def _paced(stream: vendors.SSEStream, first: float, delay: float) -> AsyncIterator[bytes]:
    """The stream's frames: the opening at once, then ``first`` seconds before the first
    content frame and ``delay`` before each later one."""
    for frame in stream.opening:
        yield frame
    wait = first
    for frame in stream.content:
        if wait > 0:
            await asyncio.sleep(wait)
        wait = delay
        yield frame
    for frame in stream.closing:
        yield frame


def _error(exc: BadOverride) -> Response:
    return JSONResponse({"error": str(exc)}, 400)


class DemoUpstream:
    """The endpoints, sharing one configuration and one random source (for --error-rate)."""

    def __init__(self, config: UpstreamConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "vdm-demo"}
                    for name in vendors.MODELS
                ],
            }
        )

    def llm_endpoint(self, vendor: Vendor, responses: bool = False) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self.llm(request, vendor, responses)

        return endpoint

    async def llm(self, request: Request, vendor: Vendor, responses: bool) -> Response:
        headers = vendors.request_id_header(vendor)

        def error(status: int, message: str) -> Response:
            return JSONResponse(vendors.error_body(vendor, status, message), status, headers)

        try:
            over = parse_overrides(request.headers, self.config)
        except BadOverride as exc:
            return error(400, str(exc))
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "request body must be an object")
        if not await _hold(request, over.delay):
            return Response(status_code=499)  # nobody is listening any more
        if over.status is not None:
            return error(over.status, f"status {over.status} forced by x-demo-status")
        if self.config.error_rate > 0 and self.rng.random() < self.config.error_rate:
            return error(500, "injected failure (demo-upstream --error-rate)")
        return _answer(vendor, responses, body, over, headers)

    async def models(self, request: Request) -> Response:
        return JSONResponse(self.models_body)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def echo(self, request: Request) -> Response:
        try:
            over = parse_overrides(request.headers, self.config)
        except BadOverride as exc:
            return _error(exc)
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        # Echo holds only when asked: the configured --latency is for the LLM endpoints.
        if "x-demo-delay-ms" in request.headers and not await _hold(request, over.delay):
            return Response(status_code=499)
        headers: dict[str, str] = {}
        for key, value in request.headers.raw:
            name, text = key.decode("latin-1").lower(), value.decode("latin-1")
            headers[name] = f"{headers[name]}, {text}" if name in headers else text
        raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
        description = {
            "method": request.method,
            "path": request.scope["path"],
            "raw_path": raw_path.decode("latin-1"),
            "query": request.scope["query_string"].decode("latin-1"),
            "headers": headers,
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
        return JSONResponse(description, over.status or 200)

    async def byte_stream(self, request: Request) -> Response:
        try:
            total = _bounded_int(request.query_params, "n", 0, MAX_BYTES)
            size = _bounded_int(request.query_params, "chunk", 1, MAX_BYTES_CHUNK)
            delay_ms = _bounded_int(request.query_params, "delay_ms", 0, MAX_DELAY_MS)
        except BadOverride as exc:
            return _error(exc)
        if total is None:
            return JSONResponse({"error": "query parameter n (bytes to send) is required"}, 400)
        chunk = size or min(max(total, 1), 65536)
        return StreamingResponse(
            _pattern_chunks(total, chunk, (delay_ms or 0) / 1000),
            media_type="application/octet-stream",
            headers={"content-length": str(total), "cache-control": "no-cache"},
        )


def _answer(
    vendor: Vendor,
    responses: bool,
    body: dict[str, Any],
    over: Overrides,
    headers: dict[str, str],
) -> Response:
    """The vendor's answer to ``body``: a paced SSE stream or one JSON document."""
    model = vendors.model_of(body)
    prompt = vendors.input_tokens(body)
    if vendors.wants_stream(body):
        if responses:
            stream = vendors.responses_stream(model, prompt, over.chunks)
        elif vendor is Vendor.ANTHROPIC:
            stream = vendors.anthropic_stream(model, prompt, over.chunks)
        else:
            stream = vendors.openai_stream(model, prompt, over.chunks)
        return StreamingResponse(
            _paced(stream, over.first_token_delay, over.chunk_delay),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **headers},
        )
    if responses:
        answer = vendors.responses_answer(model, prompt, over.chunks)
    elif vendor is Vendor.ANTHROPIC:
        answer = vendors.anthropic_message(model, prompt, over.chunks)
    else:
        answer = vendors.openai_completion(model, prompt, over.chunks)
    return JSONResponse(answer, headers=headers)


async def _pattern_chunks(total: int, chunk: int, delay: float) -> AsyncIterator[bytes]:
    """``total`` bytes of the pattern in pieces of ``chunk``, ``delay`` seconds apart."""
    pattern = _PATTERN * (chunk // len(_PATTERN) + 2)
    for offset in range(0, total, chunk):
        if offset and delay:
            await asyncio.sleep(delay)
        start = offset % len(_PATTERN)
        yield pattern[start : start + min(chunk, total - offset)]


def create_app(
    latency: float = 0.05,
    chunk_delay: float = 0.02,
    chunks: int = 16,
    error_rate: float = 0.0,
    *,
    first_token_delay: float | None = None,
    seed: int | None = None,
) -> Starlette:
    config = UpstreamConfig(
        latency=latency,
        chunk_delay=chunk_delay,
        first_token_delay=first_token_delay,
        chunks=chunks,
        error_rate=error_rate,
    )
    demo = DemoUpstream(config, random.Random(seed))
    routes = [
        Route("/v1/chat/completions", demo.llm_endpoint(Vendor.OPENAI), methods=["POST"]),
        Route("/v1/messages", demo.llm_endpoint(Vendor.ANTHROPIC), methods=["POST"]),
        Route("/v1/responses", demo.llm_endpoint(Vendor.OPENAI, responses=True), methods=["POST"]),
        Route("/v1/models", demo.models, methods=["GET"]),
        Route("/healthz", demo.healthz, methods=["GET"]),
        Route("/echo", demo.echo, methods=ALL_METHODS),
        Route("/echo/{path:path}", demo.echo, methods=ALL_METHODS),
        Route("/bytes", demo.byte_stream, methods=["GET"]),
    ]
    return Starlette(routes=routes)


def pattern_bytes(total: int) -> bytes:
    """What ``GET /bytes?n=total`` sends, whatever the chunk size (for tests)."""
    return (_PATTERN * (total // len(_PATTERN) + 1))[:total]


# --- command line ---------------------------------------------------------------------------


# The paced-answer options: flag, parser (with bounds), default, metavar, help.
_OPTIONS: list[tuple[str, Callable[[str], Any], float, str, str]] = [
    ("--latency", number(0, MAX_DELAY_MS / 1000), 0.05, "S",
     "seconds before the first response byte"),
    ("--chunk-delay", number(0, MAX_CHUNK_DELAY_MS / 1000), 0.02, "S",
     "seconds before each streamed content chunk"),
    ("--chunks", whole(0, MAX_CHUNKS), 16, "N",
     "content chunks (= output tokens) per answer"),
    ("--error-rate", number(0, 1), 0.0, "F",
     "share of LLM requests answered with HTTP 500, 0..1"),
]  # fmt: skip


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", type=listen_host, default="127.0.0.1", help="bind address [127.0.0.1]"
    )
    parser.add_argument("--port", type=port, default=8001, help="port, 0 for a free one [8001]")
    for flag, kind, default, metavar, text in _OPTIONS:
        parser.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} [{default:g}]"
        )
    parser.add_argument(
        "--first-token-delay",
        type=number(0, MAX_DELAY_MS / 1000),
        default=None,
        metavar="S",
        help="seconds between a stream's pre-content preamble and its first content chunk"
        " [the chunk delay]",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    app = create_app(
        args.latency,
        args.chunk_delay,
        args.chunks,
        args.error_rate,
        first_token_delay=args.first_token_delay,
    )
    return serve(
        app,
        args.host,
        args.port,
        "demo-upstream",
        exposed="anyone who can reach it can call this fake LLM API",
        # Like a real LLM API's front end, idle connections outlive the worker's pool expiry
        # (httpx: 5 s): with Uvicorn's own 5 s the two raced, and a worker that reused a
        # connection the upstream was closing answered 502 (~1 request in 3,000 under load).
        timeout_keep_alive=75,
    )
