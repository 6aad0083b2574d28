"""The instrumentation's own CPU cost per request, measured in one process without HTTP.

The side-by-side worker comparison (:mod:`bench.overhead`) is the real thing, but on this
machine a 2-second round of the *same* proxy varies by ±20% in CPU per request (httpx's
connection pool grows and shrinks between rounds; the other core's load moves), which buries a
few per cent. Here the noise is gone: one process runs a stand-in for the proxy — an ASGI app
that reads the request, waits as long as the upstream would, and answers with the same
messages the proxy sends (``http.response.start``, the JSON body, the empty last chunk) — with
and without :class:`RequestMetricsMiddleware` + :class:`Publisher` (flushing into a real Redis
on loopback), interleaved A B B A, and reads ``time.process_time()`` around each round. The
difference is what instrumentation adds per request: the middleware, the publisher's
bookkeeping, and its share of the Lua calls (whose batching depends on the request rate, so
the stand-in is paced to the rate the real worker reached).

With ``stream=True`` the stand-in answers as a streamed chat completion does instead: the demo
upstream's OpenAI SSE frames (the role-only preamble, 16 content chunks, the finish and usage
chunks, ``[DONE]``), one body message each, so the SSE scanner's cost per chunk is in it.

``shape="vandamme"`` has the answer take the path it takes in vandamme-proxy (a FastAPI app):
a Starlette response behind a ``BaseHTTPMiddleware`` (its ``@app.middleware("http")``), which
streams every answer and, under ASGI 2.3 servers such as Uvicorn, listens for the disconnect
with a ``receive()`` after the body was read; its SSE frames are the demo's re-serialized as
the OpenAI SDK does (every optional field present, ``"usage": null`` in each chunk).

Run alone: ``python -m bench.instrument_cost [--stream] [--shape vandamme] [--rate R]
[--concurrency C]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bench.overhead import OTHER_CORE, WORKER_CORE
from bench.procs import pin
from vdm_hub.services.demo import vendors
from vdm_hub.services.proxy.instrument import RequestMetricsMiddleware
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.settings import Settings

REQUEST_BODY = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
)
RESPONSE_BODY = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * 8}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11},
    }
)
# A streamed answer as the demo upstream sends it, one frame per body message.
SSE_FRAMES = list(vendors.openai_stream("gpt-4o-mini", 3, 16).frames())
SHAPES = ("raw", "vandamme")


def sdk_shaped(frame: bytes) -> bytes:
    """``frame`` as a proxy built on the OpenAI SDK re-sends it: the chunk model dumped with
    every optional field, null when unset (vandamme-proxy 2.0.9 sends exactly these keys)."""
    if not frame.startswith(b"data: {"):
        return frame
    chunk = orjson.loads(frame[6:])
    nulls = dict.fromkeys(("audio", "content", "function_call", "refusal", "role", "tool_calls"))
    chunk["choices"] = [
        {**choice, "delta": {**nulls, **choice["delta"]}} for choice in chunk["choices"]
    ]
    extra = ("moderation", "obfuscation", "service_tier", "system_fingerprint", "usage")
    return b"data: " + orjson.dumps({**chunk, **dict.fromkeys(extra), **chunk}) + b"\n\n"


SDK_FRAMES = [sdk_shaped(frame) for frame in SSE_FRAMES]
HEADERS = [
    (b"host", b"127.0.0.1"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(REQUEST_BODY)).encode()),
]


def stand_in(upstream_s: float, stream: bool = False) -> ASGIApp:
    """The proxy's ASGI conversation, with the upstream replaced by a wait."""
    content_type = b"text/event-stream" if stream else b"application/json"
    bodies = SSE_FRAMES if stream else [RESPONSE_BODY]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await asyncio.sleep(upstream_s)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type)],
            }
        )
        for body in bodies:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def vandamme_stand_in(upstream_s: float, stream: bool = False) -> ASGIApp:
    """:func:`stand_in` shaped as vandamme-proxy answers (see the module doc)."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        await Request(scope, receive).body()
        await asyncio.sleep(upstream_s)
        response: Response
        if stream:

            async def frames() -> AsyncIterator[bytes]:
                for frame in SDK_FRAMES:
                    yield frame

            response = StreamingResponse(frames(), media_type="text/event-stream")
        else:
            response = Response(RESPONSE_BODY, media_type="application/json")
        await response(scope, receive, send)

    async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)

    return BaseHTTPMiddleware(endpoint, dispatch=passthrough)


async def _request(app: ASGIApp) -> None:
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": HEADERS,
    }
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": REQUEST_BODY, "more_body": False}
        await asyncio.Event().wait()  # a client that stays connected
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        return None

    await app(scope, receive, send)


async def _round(app: ASGIApp, concurrency: int, requests: int) -> float:
    """CPU µs per request for ``requests`` requests over ``concurrency`` closed loops."""

    async def loop(n: int) -> None:
        for _ in range(n):
            await _request(app)

    per_loop = max(1, requests // concurrency)
    t0 = time.process_time()
    await asyncio.gather(*(loop(per_loop) for _ in range(concurrency)))
    return (time.process_time() - t0) / (per_loop * concurrency) * 1e6


@dataclass
class CostResult:
    concurrency: int
    rate: float  # requests/s the stand-in was paced to
    bare_us: float
    instrumented_us: float
    added_us: list[float]  # per A B B A block
    lua_calls_per_request: float

    @property
    def added(self) -> float:
        return statistics.median(self.added_us)


def instrumentation_cost(
    loads: list[tuple[int, float]],
    requests: int,
    blocks: int,
    stream: bool = False,
    shape: str = "raw",
) -> list[CostResult]:
    """For each (concurrency, request rate): bare and instrumented CPU per request.

    Blocking; call it in a thread of its own. It runs on uvloop, as the worker does, pinned
    (like the worker in :mod:`bench.overhead`) to core 1 with Redis on core 0.
    """
    import uvloop

    thread = threading.get_native_id()
    allowed = os.sched_getaffinity(thread)
    redis = EmbeddedRedis()
    redis.start()  # before pinning this thread: a child inherits its parent thread's affinity
    pin(thread, WORKER_CORE)
    try:
        if redis.process is not None:
            pin(redis.process.pid, OTHER_CORE)
        return uvloop.run(_measure(redis.url, loads, requests, blocks, stream, shape))
    finally:
        # This is a pooled thread (asyncio.to_thread): later scenarios start processes from it,
        # and those would inherit the pinning.
        os.sched_setaffinity(thread, allowed)
        redis.stop()


async def _measure(
    redis_url: str,
    loads: list[tuple[int, float]],
    requests: int,
    blocks: int,
    stream: bool,
    shape: str,
) -> list[CostResult]:
    settings = Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "VDM_WORKER_ID": "bench-cost",
            "VDM_KEY_PREFIX": f"cost{int(time.time() * 1000) % 10**8}",
        }
    )
    publisher = Publisher(settings)
    await publisher.start_background()
    async with asyncio.timeout(10):
        await publisher.wait_registered()
    results = []
    for concurrency, rate in loads:
        make = vandamme_stand_in if shape == "vandamme" else stand_in
        app = make(concurrency / rate, stream)
        instrumented = RequestMetricsMiddleware(app, publisher)
        sides: dict[str, ASGIApp] = {"instrumented": instrumented, "bare": app}
        for side in sides.values():  # warm up
            await _round(side, concurrency, max(concurrency, requests // 10))
        cpu: dict[str, list[float]] = {"instrumented": [], "bare": []}
        calls = 0
        for _ in range(blocks):
            for label in ("instrumented", "bare", "bare", "instrumented"):
                before = publisher.batches_sent
                cpu[label].append(await _round(sides[label], concurrency, requests))
                calls += publisher.batches_sent - before
        added = [
            statistics.fmean(cpu["instrumented"][i : i + 2])
            - statistics.fmean(cpu["bare"][i : i + 2])
            for i in range(0, 2 * blocks, 2)
        ]
        results.append(
            CostResult(
                concurrency=concurrency,
                rate=rate,
                bare_us=statistics.median(cpu["bare"]),
                instrumented_us=statistics.median(cpu["instrumented"]),
                added_us=added,
                lua_calls_per_request=calls / (2 * blocks * requests),
            )
        )
    await publisher.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instrument_cost", description=__doc__)
    parser.add_argument("--stream", action="store_true", help="answer as an SSE stream")
    parser.add_argument(
        "--shape", choices=SHAPES, default="raw", help="the app's ASGI conversation [raw]"
    )
    parser.add_argument("--rate", type=float, default=800.0, help="requests/s to pace to [800]")
    parser.add_argument("--concurrency", type=int, default=16, help="closed loops [16]")
    parser.add_argument("--requests", type=int, default=1000, help="per round [1000]")
    parser.add_argument("--blocks", type=int, default=3, help="A B B A blocks [3]")
    args = parser.parse_args()
    loads = [(args.concurrency, args.rate)]
    for r in instrumentation_cost(loads, args.requests, args.blocks, args.stream, args.shape):
        print(
            f"{'sse' if args.stream else 'json'} {args.shape} c={r.concurrency} rate={r.rate:g}:"
            f" bare {r.bare_us:.1f} us, instrumented {r.instrumented_us:.1f} us,"
            f" added {r.added:.1f} us (blocks {', '.join(f'{a:.1f}' for a in r.added_us)}),"
            f" Lua calls/request {r.lua_calls_per_request:.3f}"
        )


if __name__ == "__main__":
    main()
