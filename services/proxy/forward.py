"""A streaming reverse proxy as a plain ASGI app.

Any method and path go to ``upstream`` + the client's raw path and query, as-is. Bodies stream
both ways without buffering (an upstream SSE response reaches the client chunk by chunk);
status and end-to-end headers are preserved, hop-by-hop headers (RFC 9110 §7.6.1) dropped.

- The request target must be a path starting with exactly one ``/`` (else 400): the upstream
  URL is the configured one with only its path replaced, so no target (``@host:port/x``,
  ``//host/x``, an absolute URL) can change the host the request goes to.
- An upstream that cannot be reached gives a 502 with a JSON error (naming the upstream without
  its credentials). One that breaks off mid-response makes the worker break off too: it raises
  :class:`ResponseAborted`, so the server closes the connection without the last chunk and the
  client sees a truncated response, never a clean, complete 200. Either way
  ``scope["vdm"]["upstream_error"]`` is set so the instrumentation reports ``upstream_error``.
- A client that disconnects cancels the upstream request at once.
- Cancel: the proxy puts ``scope["vdm"]["abort"]``, a callable, for whoever wants to stop the
  request (the worker's cancel listener, through :class:`services.proxy.cancel.InFlight`), which
  sets ``scope["vdm"]["cancelled"]`` first. The upstream call is dropped; a client still
  waiting for the response head gets a 499 JSON error, one whose response had begun sees its
  connection closed mid-response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
from starlette.types import Message, Receive, Scope, Send

from vdm_hub.services.httppool import ShardedClients
from vdm_hub.shared.responses import JSONResponse

log = logging.getLogger("vdm.proxy")


# Status of a response the worker ends because an operator cancelled the request: a 4xx (the
# request did not fail on the server's side) that SDKs do not retry, unlike a 5xx. nginx uses
# 499 for a request the client ended; here it is the operator, on the client's behalf.
CANCELLED_STATUS = 499


class ClientDisconnected(Exception):
    """The client went away while its request body was still being read."""


class ResponseAborted(Exception):
    """The worker broke off a response on purpose (the upstream broke off, or an operator
    cancelled the request): the server must close the connection without finishing it."""


class _QuietAborts(logging.Filter):
    """Uvicorn logs any exception out of the app with a traceback; a deliberate abort has been
    logged already, in one line, by the proxy."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ResponseAborted)


QUIET_ABORTS = _QuietAborts()


def quiet_deliberate_aborts() -> None:
    """Keep Uvicorn's error log free of the tracebacks of deliberate aborts (idempotent)."""
    logging.getLogger("uvicorn.error").addFilter(QUIET_ABORTS)


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


def public_url(url: str | None) -> str:
    """``url`` without credentials, query or fragment: safe to log, show or store."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


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


def make_client(max_connections: int = 100) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=30.0),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        follow_redirects=False,
        trust_env=False,  # never route through a proxy from the environment by surprise
    )


# Upstream connections one worker keeps at most (beyond, requests wait for a free one, up to
# the pool timeout); in shards, see services/httppool.py.
MAX_UPSTREAM_CONNECTIONS = 4000


def make_clients(total: int = MAX_UPSTREAM_CONNECTIONS) -> ShardedClients:
    return ShardedClients(make_client, total)


def request_path(scope: Scope) -> bytes | None:
    """The raw path and query to send upstream, or None when the target is not a path.

    Only an origin-form target (RFC 9112 §3.2.1: a path starting with one ``/``) is taken.
    ``//host/x`` is a network-path reference and ``@host/x`` or ``http://...`` would read as
    an authority to a URL parser: none of them may reach the URL.
    """
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes) or not raw:
        raw = quote(str(scope.get("path", "")), safe="/:@!$&'()*+,;=-._~%").encode()
    if not raw.startswith(b"/") or raw.startswith(b"//"):
        return None
    query = scope.get("query_string")
    return raw + b"?" + query if query else raw


class ReverseProxy:
    def __init__(self, upstream: str, clients: ShardedClients | httpx.AsyncClient) -> None:
        self.upstream = upstream.rstrip("/")
        self.public_upstream = public_url(self.upstream)
        parts = urlsplit(self.upstream)
        # Credentials in the URL, to scrub from exception texts before they are logged.
        self._credentials = [
            form
            for c in (parts.password, parts.username)
            if c
            for form in (c, unquote(c), quote(c, safe=""))
        ]
        self._base = httpx.URL(self.upstream)
        self._base_path = self._base.raw_path.split(b"?", 1)[0].rstrip(b"/")
        self.clients = (
            clients if isinstance(clients, ShardedClients) else ShardedClients.of(clients)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        target = request_path(scope)
        if target is None:
            message = "the request target must be a path starting with a single '/'"
            body = {"error": "bad_request_target", "message": message}
            await JSONResponse(body, 400)(scope, receive, send)
            return
        vdm: dict[str, Any] = scope.setdefault("vdm", {})
        body_done = asyncio.Event()

        async def request_body(message: Message) -> AsyncIterator[bytes]:
            while True:
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    body_done.set()
                    return
                message = await receive()

        headers = _filtered(scope["headers"], HOP_BY_HOP | {b"host"})
        has_body = any(
            k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"]
        )
        first: Message | None = None
        if has_body:
            # The body's first part is read now, before any upstream connection: the metrics
            # middleware learns `model` and `stream` from it, and the row is published with
            # them. Read lazily (when the upstream connection pulls it), a busy upstream pool
            # or a slow connect let the middleware's wait for the body run out, and the row
            # went out without its model.
            first = await receive()
            if first["type"] == "http.disconnect":
                return
        else:
            body_done.set()
        request = self.clients.clients[0].build_request(
            scope["method"],
            self._base.copy_with(raw_path=self._base_path + target),
            headers=headers,
            content=request_body(first) if first is not None else None,
        )

        started: list[bool] = []  # non-empty once the response head went to the client
        forward = asyncio.ensure_future(self._forward(scope, receive, send, request, started))
        watcher = asyncio.ensure_future(self._wait_disconnect(receive, body_done))
        vdm["abort"] = forward.cancel
        if vdm.get("cancelled"):  # asked before the abort hook was in place
            forward.cancel()
        try:
            await asyncio.wait({forward, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            vdm.pop("abort", None)
            for task in (forward, watcher):
                task.cancel()
            for task in (forward, watcher):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if vdm.get("cancelled") and forward.cancelled():
            if started:
                raise ResponseAborted("cancelled mid-response")
            body = {"error": "cancelled", "message": "the request was cancelled by an operator"}
            await JSONResponse(body, CANCELLED_STATUS)(scope, receive, send)
            return
        if forward.done() and not forward.cancelled():
            exc = forward.exception()
            if exc is not None and not isinstance(exc, ClientDisconnected):
                raise exc

    def _describe(self, exc: Exception) -> str:
        """``Type: text`` of an upstream error, for the log: the text can quote the URL it was
        given, so the upstream's credentials are masked in it."""
        text = str(exc)
        for secret in self._credentials:
            text = text.replace(secret, "***")
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    @staticmethod
    async def _wait_disconnect(receive: Receive, body_done: asyncio.Event) -> None:
        # Only after the body has been read: before that, the body generator owns receive().
        await body_done.wait()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: httpx.Request,
        started: list[bool],
    ) -> None:
        # The lease spans the whole exchange: the pool counts a streaming response as busy.
        with self.clients.lease() as client:
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                if isinstance(exc.__cause__, ClientDisconnected) or isinstance(
                    exc.__context__, ClientDisconnected
                ):
                    raise ClientDisconnected from exc
                scope.setdefault("vdm", {})["upstream_error"] = True
                log.info("upstream %s unreachable: %s", self.public_upstream, self._describe(exc))
                message = f"the worker could not reach its upstream {self.public_upstream}: "
                body = {"error": "upstream_unreachable", "message": message + type(exc).__name__}
                await JSONResponse(body, 502)(scope, receive, send)
                return
            try:
                await self._relay(scope, send, response, started)
            finally:
                await response.aclose()

    async def _relay(
        self, scope: Scope, send: Send, response: httpx.Response, started: list[bool]
    ) -> None:
        """The upstream's response to the client, chunk by chunk as it arrives."""
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": _filtered(response.headers.raw, HOP_BY_HOP),
            }
        )
        started.append(True)
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            scope.setdefault("vdm", {})["upstream_error"] = True
            log.info(
                "upstream %s broke off mid-response (%s); closing the client's connection",
                self.public_upstream,
                self._describe(exc),
            )
            raise ResponseAborted("upstream broke off mid-response") from None
        await send({"type": "http.response.body", "body": b"", "more_body": False})
