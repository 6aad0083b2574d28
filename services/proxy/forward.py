"""A streaming reverse proxy as a plain ASGI app.

Any method and path go to ``upstream`` + the client's raw path and query, as-is. Bodies stream
both ways without buffering (an upstream SSE response reaches the client chunk by chunk);
status and end-to-end headers are preserved, hop-by-hop headers (RFC 9110 §7.6.1) dropped.
An upstream that cannot be reached gives a 502 with a JSON error; one that breaks off mid-
response ends the response early. Either way ``scope["vdm"]["upstream_error"]`` is set so the
instrumentation can report outcome ``upstream_error``. A client that disconnects cancels the
upstream request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

log = logging.getLogger("vdm.proxy")

Scope = dict[str, Any]
Message = dict[str, Any]


class ClientDisconnected(Exception):
    """The client went away while its request body was still being read."""


HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def _filtered(headers: Any, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    listed: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            listed.update(t.strip().lower() for t in bytes(value).split(b","))
    return [
        (bytes(k), bytes(v))
        for k, v in headers
        if k.lower() not in drop and k.lower() not in listed
    ]


async def send_json(send: Any, status: int, payload: Any) -> None:
    """A complete JSON response on a raw ASGI ``send``."""
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def make_client(max_connections: int = 1000) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=30.0),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        follow_redirects=False,
        trust_env=False,  # never route through a proxy from the environment by surprise
    )


class ReverseProxy:
    def __init__(self, upstream: str, client: httpx.AsyncClient) -> None:
        self.upstream = upstream.rstrip("/")
        self.client = client

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body_done = asyncio.Event()

        async def request_body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    body_done.set()
                    return

        headers = _filtered(scope["headers"], HOP_BY_HOP | {b"host"})
        has_body = any(
            k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"]
        )
        if not has_body:
            body_done.set()
        url = self.upstream + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        request = self.client.build_request(
            scope["method"],
            url,
            headers=headers,
            content=request_body() if has_body else None,
        )

        forward = asyncio.ensure_future(self._forward(scope, request, send))
        watcher = asyncio.ensure_future(self._wait_disconnect(receive, body_done))
        try:
            await asyncio.wait({forward, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (forward, watcher):
                task.cancel()
            for task in (forward, watcher):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if forward.done() and not forward.cancelled():
            exc = forward.exception()
            if exc is not None and not isinstance(exc, ClientDisconnected):
                raise exc

    @staticmethod
    async def _wait_disconnect(receive: Any, body_done: asyncio.Event) -> None:
        # Only after the body has been read: before that, the body generator owns receive().
        await body_done.wait()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _forward(self, scope: Scope, request: httpx.Request, send: Any) -> None:
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            if isinstance(exc.__cause__, ClientDisconnected) or isinstance(
                exc.__context__, ClientDisconnected
            ):
                raise ClientDisconnected from exc
            scope.setdefault("vdm", {})["upstream_error"] = True
            log.info("upstream %s unreachable: %s", self.upstream, exc)
            message = f"the worker could not reach its upstream {self.upstream}: "
            await send_json(
                send,
                502,
                {"error": "upstream_unreachable", "message": message + type(exc).__name__},
            )
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": _filtered(response.headers.raw, HOP_BY_HOP),
                }
            )
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                scope.setdefault("vdm", {})["upstream_error"] = True
                log.info("upstream broke off mid-response: %s", exc)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
