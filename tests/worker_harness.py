"""In-loop servers for worker tests: a controllable fake upstream and a worker on real sockets.

The upstream's responses wait on gates the test opens, so a test holds a request in flight
exactly as long as it needs to, with no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis

from tests.serving import running
from vdm_hub.services.proxy.app import WorkerApp, create_app
from vdm_hub.shared.settings import Settings


class GatedUpstream:
    """A fake LLM API. ``gates[name]`` holds requests that send header ``x-gate: name``."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.arrived: dict[str, asyncio.Event] = {}
        self.seen: list[dict[str, Any]] = []

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def arrival(self, name: str) -> asyncio.Event:
        return self.arrived.setdefault(name, asyncio.Event())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append({"path": scope["path"], "headers": headers, "body": body})
        gate_name = headers.get("x-gate")
        if gate_name:
            self.arrival(gate_name).set()
        request = orjson.loads(body) if body.startswith(b"{") else {}
        if scope["path"] == "/v1/chat/completions" and request.get("stream"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            first = {"choices": [{"delta": {"content": "Hel"}}]}
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: %s\n\n" % orjson.dumps(first),
                    "more_body": True,
                }
            )
            if gate_name:
                await self.gate(gate_name).wait()
            usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: %s\n\ndata: [DONE]\n\n" % orjson.dumps(usage),
                    "more_body": False,
                }
            )
            return
        if gate_name:
            await self.gate(gate_name).wait()
        status = int(headers.get("x-status", "200"))
        payload = orjson.dumps({"ok": True, "usage": {"input_tokens": 11, "output_tokens": 5}})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def worker_settings(redis_url: str, key_prefix: str, **extra: str) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "VDM_KEY_PREFIX": key_prefix,
            "VDM_WORKER_ID": "w1",
            "VDM_WORKER_HEARTBEAT_INTERVAL": "0.2",
            "VDM_WORKER_TTL": "2",
            **extra,
        }
    )


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, upstream_url: str, redis: aioredis.Redis | None = None
) -> AsyncIterator[tuple[str, WorkerApp]]:
    app = create_app(settings, redis, upstream=upstream_url)
    async with running(app, "worker") as (url, _server):
        if app.publisher is not None:
            async with asyncio.timeout(10):
                await app.publisher.wait_registered()
        yield url, app
