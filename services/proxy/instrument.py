"""A pure ASGI middleware that reports each HTTP request's life to a :class:`Recorder`.

Add it to any ASGI app in a few lines::

    publisher = Publisher(settings)                # services.proxy.publisher
    app = RequestMetricsMiddleware(app, publisher)  # and run publisher.start()/close()

It never buffers a body on its way through and never delays a message: it only looks at
them. From the request it takes the method, the path without its query string, and `model`
and `stream` from a JSON body (sniffed while the app reads it); from the response the status,
the first body byte (phase `upstream` -> `streaming`), the byte count and token usage.
Headers, bodies and query strings are never passed on.

A client that disconnects before the response is complete ends the record at once with
outcome `client_closed`. An app that wants to report an upstream failure (the proxy does)
sets ``scope["vdm"]["upstream_error"] = True``.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Protocol

import orjson

from services.proxy import sniff
from shared.schema import (
    MAX_METHOD_CHARS,
    MAX_PATH_CHARS,
    Outcome,
    Phase,
    Row,
    clamp,
)

Scope = dict[str, Any]
Message = dict[str, Any]

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# JSON escapes a control character as six bytes (\u0001), so 512 characters of path can
# take 3 KB: clamp its encoded size too, so that a row always fits the readers'
# MAX_ROW_BYTES (with room for a 128-character model and ids), or every reader would skip it.
MAX_PATH_JSON_BYTES = 1536
# How often a long response may report its growing byte count (the final count is always
# in the `end` event). Keeps event volume independent of chunk size.
PROGRESS_INTERVAL = 0.5


class Recorder(Protocol):
    """Where request lifecycle events go (the publisher, or a test double)."""

    worker_id: str

    def start(self, row: Row) -> None: ...

    def progress(self, request_id: str, fields: dict[str, Any]) -> None: ...

    def end(
        self,
        request_id: str,
        *,
        status: int,
        outcome: Outcome,
        duration_ms: float,
        bytes_out: int,
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> None: ...


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def clamp_path(path: str) -> str:
    path = clamp(path, MAX_PATH_CHARS)
    while len(orjson.dumps(path)) > MAX_PATH_JSON_BYTES:
        path = path[: len(path) * 3 // 4]
    return path


def request_id_for(scope: Scope) -> str:
    """The client's X-Request-Id when it is a safe token, else a fresh random id."""
    raw = _header(scope, b"x-request-id")
    if raw is not None:
        text = raw.decode("latin-1")
        if _VALID_REQUEST_ID.fullmatch(text):
            return text
    return os.urandom(16).hex()  # like uuid4().hex, without building a UUID (~4x cheaper)


class _Tracker:
    """One request's state while it is in flight."""

    __slots__ = (
        "body",
        "body_done",
        "bytes_out",
        "ended",
        "json_body",
        "json_response",
        "last_progress",
        "recorder",
        "request_id",
        "response_body",
        "row",
        "scanner",
        "started",
        "status",
    )

    def __init__(self, recorder: Recorder, scope: Scope) -> None:
        self.recorder = recorder
        self.request_id = request_id_for(scope)
        self.started = time.monotonic()
        path = scope.get("path") or "/"
        content_type = _header(scope, b"content-type") or b""
        self.json_body = b"json" in content_type.lower()
        self.body = b""
        self.body_done = not self.json_body
        self.bytes_out = 0
        self.status = 0
        self.ended = False
        self.last_progress = 0.0
        self.scanner: sniff.StreamUsageScanner | None = None
        self.json_response = False
        self.response_body: list[bytes] | None = None
        # A dict literal, not Row(...): the TypedDict class call costs ~1.5 us more per request.
        self.row: Row = {
            "request_id": self.request_id,
            "worker_id": recorder.worker_id,
            "method": clamp(str(scope.get("method", "GET")), MAX_METHOD_CHARS),
            "path": clamp_path(path),
            "model": None,
            "provider": sniff.provider_for(path),
            "is_streaming": False,
            "start_time": time.time(),
            "phase": Phase.UPSTREAM,
            "bytes_out": 0,
            "input_tokens": None,
            "output_tokens": None,
        }
        recorder.start(self.row)

    # -- request side
    def on_request_body(self, message: Message) -> None:
        if self.body_done:
            return
        chunk = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if len(self.body) < sniff.MAX_SNIFF_BYTES + 1:
            self.body += chunk[: sniff.MAX_SNIFF_BYTES + 1 - len(self.body)]
        if more and len(self.body) <= sniff.MAX_SNIFF_BYTES:
            return
        self.body_done = True
        model, streaming = sniff.request_fields(self.body, complete=not more)
        self.body = b""
        changed: dict[str, Any] = {}
        if model is not None:
            changed["model"] = model
        if streaming:
            changed["is_streaming"] = True
        if changed:
            self.recorder.progress(self.request_id, changed)

    # -- response side
    def on_response_start(self, message: Message) -> None:
        self.status = int(message.get("status", 0))
        content_type = b""
        for key, value in message.get("headers", ()):
            if key.lower() == b"content-type":
                content_type = bytes(value).lower()
                break
        if b"text/event-stream" in content_type:
            self.scanner = sniff.StreamUsageScanner()
        elif b"json" in content_type:
            self.json_response = True
            self.response_body = []

    def on_response_body(self, message: Message) -> None:
        chunk = message.get("body", b"")
        if chunk:
            first = self.bytes_out == 0
            self.bytes_out += len(chunk)
            if self.scanner is not None:
                self.scanner.feed(chunk)
            elif self.response_body is not None:
                if self.bytes_out <= sniff.MAX_SNIFF_BYTES:
                    self.response_body.append(chunk)
                else:
                    self.response_body = None  # too big to parse for usage
            now = time.monotonic()
            if first:
                self.last_progress = now
                self.recorder.progress(
                    self.request_id, {"phase": Phase.STREAMING, "bytes_out": self.bytes_out}
                )
            elif now - self.last_progress >= PROGRESS_INTERVAL:
                self.last_progress = now
                self.recorder.progress(self.request_id, {"bytes_out": self.bytes_out})

    def finish(self, outcome: Outcome | None, scope: Scope) -> None:
        if self.ended:
            return
        self.ended = True
        usage: dict[str, int] = {}
        if self.scanner is not None:
            usage = self.scanner.usage
        elif self.response_body:
            usage = sniff.usage_from_json(b"".join(self.response_body))
        self.response_body = None
        if outcome is None:
            if scope["vdm"].get("upstream_error"):
                outcome = Outcome.UPSTREAM_ERROR
            elif self.status >= 400 or self.status == 0:
                outcome = Outcome.ERROR
            else:
                outcome = Outcome.OK
        self.recorder.end(
            self.request_id,
            status=self.status,
            outcome=outcome,
            duration_ms=(time.monotonic() - self.started) * 1000.0,
            bytes_out=self.bytes_out,
            input_tokens=usage.get("input_tokens"),
            output_tokens=usage.get("output_tokens"),
        )


class RequestMetricsMiddleware:
    """Reports every HTTP request of the wrapped app to ``recorder``; see the module doc."""

    def __init__(self, app: Any, recorder: Recorder, *, request_id_header: bool = True) -> None:
        self.app = app
        self.recorder = recorder
        self.request_id_header = request_id_header

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracker = _Tracker(self.recorder, scope)
        scope["vdm"] = {"request_id": tracker.request_id}
        response_complete = False

        async def receive_wrapper() -> Message:
            message: Message = await receive()
            kind = message["type"]
            if kind == "http.request":
                tracker.on_request_body(message)
            elif kind == "http.disconnect" and not response_complete:
                tracker.finish(Outcome.CLIENT_CLOSED, scope)
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal response_complete
            kind = message["type"]
            if kind == "http.response.body":  # first: it is by far the most frequent
                tracker.on_response_body(message)
                if not message.get("more_body", False):
                    response_complete = True
            elif kind == "http.response.start":
                tracker.on_response_start(message)
                if self.request_id_header:
                    headers = list(message.get("headers", ()))
                    headers.append((b"x-request-id", tracker.request_id.encode()))
                    message = {**message, "headers": headers}
            try:
                await send(message)
            except OSError:
                # The client went away under us (Uvicorn raises ClientDisconnected, an
                # OSError, when sending on a closed connection).
                tracker.finish(Outcome.CLIENT_CLOSED, scope)
                raise
            if response_complete:
                tracker.finish(None, scope)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException:
            if tracker.status == 0:
                tracker.status = 500
            tracker.finish(None if response_complete else Outcome.ERROR, scope)
            raise
        finally:
            # An app that returns without completing the response (or after a disconnect).
            if not tracker.ended:
                tracker.finish(None if response_complete else Outcome.CLIENT_CLOSED, scope)
