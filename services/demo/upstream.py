"""``vdm-hub demo-upstream``: a fake OpenAI- and Anthropic-compatible LLM API (OpenAI's chat
completions and Responses API, Anthropic's Messages API; streaming or not).

It stands in for a real LLM API in the demo, the tests and the benchmarks, so it does no
per-request work beyond building a few small JSON documents. Pacing comes from the command
line (``--latency``, ``--chunk-delay``, ``--chunks``, ``--error-rate``) and can be overridden
per request with headers, which is how tests and benchmarks hold requests open:

- ``x-demo-delay-ms``: delay before the first response byte (for a non-streaming answer that
  is the whole answer);
- ``x-demo-chunks``: content chunks (= output tokens) of the answer;
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

from services.demo import vendors
from services.demo.vendors import Vendor
from shared.serve import serve
from shared.settings import Settings

MAX_DELAY_MS = 600_000  # 10 minutes
MAX_CHUNKS = 10_000
MAX_CHUNK_DELAY_MS = 60_000
MAX_BYTES = 1 << 30
MAX_BYTES_CHUNK = 1 << 20

JSON = "application/json"
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
    chunks: int = 16  # content chunks (= output tokens) per answer
    error_rate: float = 0.0  # share of LLM requests answered with a 500


@dataclass(frozen=True)
class Overrides:
    delay: float
    chunks: int
    chunk_delay: float
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
    status = _bounded_int(headers, "x-demo-status", 400, 599)
    return Overrides(
        delay=config.latency if delay_ms is None else delay_ms / 1000,
        chunks=config.chunks if chunks is None else chunks,
        chunk_delay=config.chunk_delay if chunk_delay_ms is None else chunk_delay_ms / 1000,
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


def _json(content: bytes, status: int = 200) -> Response:
    return Response(content, status_code=status, media_type=JSON)


async def _paced(stream: vendors.SSEStream, delay: float) -> AsyncIterator[bytes]:
    """The stream's frames, sleeping ``delay`` before each content frame."""
    for frame in stream.opening:
        yield frame
    for frame in stream.content:
        if delay > 0:
            await asyncio.sleep(delay)
        yield frame
    for frame in stream.closing:
        yield frame


def create_app(
    latency: float = 0.05,
    chunk_delay: float = 0.02,
    chunks: int = 16,
    error_rate: float = 0.0,
    *,
    seed: int | None = None,
) -> Starlette:
    config = UpstreamConfig(latency, chunk_delay, chunks, error_rate)
    rng = random.Random(seed)
    models_body = orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "vdm-demo"}
                for name in vendors.MODELS
            ],
        }
    )

    def llm_endpoint(vendor: Vendor, responses: bool = False) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                over = parse_overrides(request.headers, config)
            except BadOverride as exc:
                return _json(vendors.error_body(vendor, 400, str(exc)), 400)
            raw = await request.body()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return _json(vendors.error_body(vendor, 400, "request body is not valid JSON"), 400)
            if not isinstance(body, dict):
                return _json(vendors.error_body(vendor, 400, "request body must be an object"), 400)
            if not await _hold(request, over.delay):
                return Response(status_code=499)  # nobody is listening any more
            if over.status is not None:
                message = f"status {over.status} forced by x-demo-status"
                return _json(vendors.error_body(vendor, over.status, message), over.status)
            if config.error_rate > 0 and rng.random() < config.error_rate:
                message = "injected failure (demo-upstream --error-rate)"
                return _json(vendors.error_body(vendor, 500, message), 500)
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
                    _paced(stream, over.chunk_delay),
                    media_type="text/event-stream",
                    headers=SSE_HEADERS,
                )
            if responses:
                return _json(vendors.responses_answer(model, prompt, over.chunks))
            if vendor is Vendor.ANTHROPIC:
                return _json(vendors.anthropic_message(model, prompt, over.chunks))
            return _json(vendors.openai_completion(model, prompt, over.chunks))

        return endpoint

    async def models(request: Request) -> Response:
        return _json(models_body)

    async def healthz(request: Request) -> Response:
        return _json(b'{"status":"ok"}')

    async def echo(request: Request) -> Response:
        try:
            over = parse_overrides(request.headers, config)
        except BadOverride as exc:
            return _json(orjson.dumps({"error": str(exc)}), 400)
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
        return _json(orjson.dumps(description), over.status or 200)

    async def byte_stream(request: Request) -> Response:
        try:
            total = _bounded_int(request.query_params, "n", 0, MAX_BYTES)
            size = _bounded_int(request.query_params, "chunk", 1, MAX_BYTES_CHUNK)
            delay_ms = _bounded_int(request.query_params, "delay_ms", 0, MAX_DELAY_MS)
        except BadOverride as exc:
            return _json(orjson.dumps({"error": str(exc)}), 400)
        if total is None:
            return _json(
                orjson.dumps({"error": "query parameter n (bytes to send) is required"}), 400
            )
        chunk = size or min(max(total, 1), 65536)
        delay = (delay_ms or 0) / 1000

        async def body() -> AsyncIterator[bytes]:
            pattern = _PATTERN * (chunk // len(_PATTERN) + 2)
            for offset in range(0, total, chunk):
                if offset and delay:
                    await asyncio.sleep(delay)
                start = offset % len(_PATTERN)
                yield pattern[start : start + min(chunk, total - offset)]

        return StreamingResponse(
            body(),
            media_type="application/octet-stream",
            headers={"content-length": str(total), "cache-control": "no-cache"},
        )

    routes = [
        Route("/v1/chat/completions", llm_endpoint(Vendor.OPENAI), methods=["POST"]),
        Route("/v1/messages", llm_endpoint(Vendor.ANTHROPIC), methods=["POST"]),
        Route("/v1/responses", llm_endpoint(Vendor.OPENAI, responses=True), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/echo", echo, methods=ALL_METHODS),
        Route("/echo/{path:path}", echo, methods=ALL_METHODS),
        Route("/bytes", byte_stream, methods=["GET"]),
    ]
    return Starlette(routes=routes)


def pattern_bytes(total: int) -> bytes:
    """What ``GET /bytes?n=total`` sends, whatever the chunk size (for tests)."""
    return (_PATTERN * (total // len(_PATTERN) + 1))[:total]


# --- command line ---------------------------------------------------------------------------


def _number(low: float, high: float, kind: Callable[[str], Any] = float) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{raw} is outside {low:g}..{high:g}")
        return value

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address [127.0.0.1]")
    parser.add_argument("--port", type=int, default=8001, help="port, 0 for a free one [8001]")
    parser.add_argument(
        "--latency",
        type=_number(0, MAX_DELAY_MS / 1000),
        default=0.05,
        metavar="S",
        help="seconds before the first response byte [0.05]",
    )
    parser.add_argument(
        "--chunk-delay",
        type=_number(0, MAX_CHUNK_DELAY_MS / 1000),
        default=0.02,
        metavar="S",
        help="seconds before each streamed content chunk [0.02]",
    )
    parser.add_argument(
        "--chunks",
        type=_number(0, MAX_CHUNKS, int),
        default=16,
        metavar="N",
        help="content chunks (= output tokens) per answer [16]",
    )
    parser.add_argument(
        "--error-rate",
        type=_number(0, 1),
        default=0.0,
        metavar="F",
        help="share of LLM requests answered with HTTP 500, 0..1 [0]",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    app = create_app(args.latency, args.chunk_delay, args.chunks, args.error_rate)
    return serve(app, args.host, args.port, "demo-upstream")
