"""A pure ASGI middleware that reports each HTTP request's life to a :class:`Recorder`.

Apps use it through ``vdm_hub.instrument(app)`` (:mod:`services.proxy.embed`), which also owns
the publisher's lifetime; the worker proxy wraps its reverse proxy in it directly.

It never buffers a body on its way through and never delays a message: it only looks at
them. From the request it takes the method, the path without its query string, and `model`
and `stream` from a JSON body (sniffed while the app reads it); from the response the status,
the first body byte (phase `upstream` -> `streaming`, and `ttfb_ms`), the first generated
output (`ttft_ms`: for an SSE response the first event that carries output, see
:func:`services.proxy.sniff.carries_output`; for any other the first body byte), the byte
count, the SSE `data:` events forwarded (`chunks_out`), the time of the last output
(`last_output_at`: an SSE `data:` event, or a body chunk of any other response) and token
usage. Headers, bodies and query strings are never passed on.

A request with a JSON body is reported (``Recorder.start``) once `model` and `stream` are known
from the body, the body is complete, the response starts, or :data:`START_BOUND` has passed,
whichever comes first, so its first row already carries the model; any other request is
reported at once.

Request ids are unique per worker: the client's ``X-Request-Id`` when it is a safe token that
is not already in flight, else a fresh random id. The response carries exactly one
``X-Request-Id``, this one: an ``X-Request-Id`` the app set (a proxied upstream's, such as
OpenAI's) is moved to ``X-Upstream-Request-Id`` when it differs (and dropped when an
``X-Upstream-Request-Id`` is there already: the one nearest the upstream is kept).

Not every request is reported: paths in ``exclude`` (``VDM_EXCLUDE_PATHS``: health and metrics
probes, API docs, static files by default) pass straight through, and a GET answered with
``text/event-stream`` (the app's own live endpoint: an LLM stream is a POST) leaves the view as
its response starts, with no finished entry, so it never sits in the grid as a stuck request.

A client that disconnects before the response is complete ends the record at once with
outcome `client_closed`. An app reports what happened through ``scope["vdm"]``:
``upstream_error`` (the proxy could not reach, or lost, its upstream) and ``cancelled`` (an
operator stopped the request; see :mod:`services.proxy.cancel`). A cancellable middleware puts
an :class:`~services.proxy.abort.Abort` in ``scope["vdm"]["abort"]``, so any app can be
stopped the way a client disconnect stops it; an app with its own way replaces it.

While the app handles a reported request, ``vdm_hub.current_request()`` returns a handle on it
(:mod:`services.proxy.context`): labels, token usage and the model the app knows go on the row.
A request that already passed through an instrumentation (``scope["vdm"]`` is set: the app is
wrapped twice) is passed on untouched, so it is reported once.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vdm_hub.services.proxy import context, sniff
from vdm_hub.services.proxy.abort import Abort, RequestCancelled
from vdm_hub.services.proxy.cancel import InFlight
from vdm_hub.services.proxy.exclude import PathFilter
from vdm_hub.services.proxy.forward import CANCELLED_STATUS, ResponseAborted
from vdm_hub.shared.responses import JSONResponse
from vdm_hub.shared.schema import (
    MAX_METHOD_CHARS,
    MAX_PATH_CHARS,
    Outcome,
    Phase,
    Row,
    clamp,
)

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# JSON escapes a control character as six bytes (\u0001), so 512 characters of path can
# take 3 KB: clamp its encoded size too, so that a row always fits the readers'
# MAX_ROW_BYTES (with room for a 128-character model and ids), or every reader would skip it.
MAX_PATH_JSON_BYTES = 1536
# How often a long response may report its growing byte count (the final count is always
# in the `end` event). Keeps event volume independent of chunk size.
PROGRESS_INTERVAL = 0.5
# Longest a JSON request's row waits for its body before it is reported without the model:
# a client that sends headers and then stalls still shows up.
START_BOUND = 0.05


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
        ttft_ms: float | None = None,
        ttfb_ms: float | None = None,
    ) -> None: ...

    def discard(self, request_id: str, status: int) -> None: ...


def clamp_path(path: str) -> str:
    path = clamp(path, MAX_PATH_CHARS)
    while len(orjson.dumps(path)) > MAX_PATH_JSON_BYTES:
        path = path[: len(path) * 3 // 4]
    return path


def client_request_id(raw: bytes | None) -> str | None:
    """The client's X-Request-Id when it is a safe token, else None."""
    if raw is not None:
        text = raw.decode("latin-1")
        if _VALID_REQUEST_ID.fullmatch(text):
            return text
    return None


def answers_event_stream(message: Message) -> bool:
    """Does this response start an SSE stream (``text/event-stream``)?"""
    for key, value in message.get("headers", ()):
        if key.lower() == b"content-type":
            return b"text/event-stream" in bytes(value).lower()
    return False


def _has_body(content_length: bytes | None, chunked: bool) -> bool:
    if chunked:
        return True
    return content_length is not None and content_length.strip() not in (b"", b"0")


class _Tracker:
    """One request's state while it is in flight."""

    __slots__ = (
        "body",
        "body_done",
        "bytes_out",
        "ended",
        "first_byte",
        "json_response",
        "last_output",
        "last_progress",
        "model_from_app",
        "published",
        "recorder",
        "request_id",
        "response_body",
        "row",
        "scanner",
        "sniffed_model",
        "sniffed_stream",
        "started",
        "status",
        "ttfb_ms",
        "ttft_ms",
        "usage_from_app",
    )

    def __init__(self, recorder: Recorder, scope: Scope, in_flight: InFlight) -> None:
        self.recorder = recorder
        self.started = time.monotonic()
        # One pass over the headers for everything the tracker needs.
        wanted_id: bytes | None = None
        content_type = content_length = None
        chunked = False
        for key, value in scope.get("headers", ()):
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                content_length = value
            elif key == b"x-request-id":
                wanted_id = value
            elif key == b"transfer-encoding":
                chunked = True
        self.request_id = in_flight.claim(client_request_id(wanted_id), scope["vdm"])
        path = scope.get("path") or "/"
        json_body = content_type is not None and b"json" in bytes(content_type).lower()
        self.body = b""
        self.body_done = not json_body
        self.sniffed_model: str | None = None
        self.sniffed_stream: bool | None = None
        self.bytes_out = 0
        self.status = 0
        self.ended = False
        self.first_byte = False
        self.ttfb_ms: float | None = None
        self.ttft_ms: float | None = None
        self.last_progress = 0.0
        self.last_output: float | None = None  # monotonic time of the last output event
        self.scanner: sniff.SSEScanner | None = None
        self.json_response = False
        self.response_body: list[bytes] | None = None
        self.model_from_app = False
        self.usage_from_app: dict[str, int] | None = None
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
            "ttft_ms": None,
            "chunks_out": None,
            "ttfb_ms": None,
            "last_output_at": None,
            "labels": None,
        }
        # A JSON body is worth waiting for (briefly): it names the model.
        self.published = not (json_body and _has_body(content_length, chunked))
        if self.published:
            recorder.start(self.row)

    def publish_start(self) -> None:
        """Report the request now, with whatever is known of it (idempotent)."""
        if not self.published:
            self.published = True
            self.recorder.start(self.row)

    # -- what the app tells (context.RequestHandle); never after the end
    @property
    def worker_id(self) -> str:
        return self.row["worker_id"]

    @property
    def labels(self) -> dict[str, str]:
        return self.row.get("labels") or {}

    def put_labels(self, labels: dict[str, str]) -> None:
        self._put({"labels": labels or None})

    def put_usage(self, input_tokens: int | None, output_tokens: int | None) -> None:
        usage = self.usage_from_app = self.usage_from_app or {}
        if input_tokens is not None:
            usage["input_tokens"] = input_tokens
        if output_tokens is not None:
            usage["output_tokens"] = output_tokens
        self._put(dict(usage))

    def put_model(self, model: str) -> None:
        self.model_from_app = True
        if model != self.row["model"]:
            self._put({"model": model})

    def _put(self, fields: dict[str, Any]) -> None:
        self.row.update(fields)  # type: ignore[typeddict-item]
        if self.published:
            self.recorder.progress(self.request_id, fields)

    # -- request side
    def on_request_body(self, message: Message) -> None:
        if self.body_done:
            return
        chunk = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if len(self.body) < sniff.MAX_SNIFF_BYTES + 1:
            self.body += chunk[: sniff.MAX_SNIFF_BYTES + 1 - len(self.body)]
        if more and len(self.body) <= sniff.MAX_SNIFF_BYTES:
            if not self.published:
                self._sniff_partial(len(chunk))
            return
        self.body_done = True
        model, streaming = sniff.request_fields(self.body, complete=not more)
        self.body = b""
        if self.model_from_app:
            model = self.row["model"]
        if not self.published:
            self.row["model"] = model
            self.row["is_streaming"] = streaming
            self.publish_start()
            return
        # Reported before the body was complete: send what the whole body says, if new.
        changed: dict[str, Any] = {}
        if model is not None and model != self.row["model"]:
            changed["model"] = model
        if streaming != self.row["is_streaming"]:
            changed["is_streaming"] = streaming
        if changed:
            self.recorder.progress(self.request_id, changed)

    def _sniff_partial(self, new: int) -> None:
        """Look for `model` and `stream` in the part of a body read so far; report the request
        as soon as both are found. Only the newest bytes (with an overlap for a match split
        across chunks) are searched, so a body that trickles in byte by byte costs linear time.
        """
        window = self.body[-(new + sniff.MAX_MATCH_BYTES) :]
        if self.sniffed_model is None:
            self.sniffed_model = sniff.model_in(window)
        if self.sniffed_stream is None:
            self.sniffed_stream = sniff.stream_in(window)
        if self.sniffed_model is not None and self.sniffed_stream is not None:
            if not self.model_from_app:
                self.row["model"] = self.sniffed_model
            self.row["is_streaming"] = self.sniffed_stream
            self.publish_start()

    # -- response side
    def on_response_start(self, message: Message, request_id_header: bool) -> Message:
        """Note the status and the kind of body; with ``request_id_header``, the message to
        send instead, whose only ``X-Request-Id`` is this request's (issue: two of them
        reached clients when the upstream sent its own, as OpenAI does)."""
        self.publish_start()
        self.status = int(message.get("status", 0))
        content_type = b""
        theirs: bytes | None = None  # the first X-Request-Id the app set
        has_upstream_id = False
        headers: list[tuple[bytes, bytes]] = []
        for key, value in message.get("headers", ()):
            name = key.lower()
            if name == b"content-type":
                content_type = bytes(value).lower()
            elif name == b"x-request-id" and request_id_header:
                if theirs is None:
                    theirs = bytes(value)
                continue
            elif name == b"x-upstream-request-id":
                has_upstream_id = True
            headers.append((key, value))
        if b"text/event-stream" in content_type:
            self.scanner = sniff.SSEScanner()
        elif b"json" in content_type:
            self.json_response = True
            self.response_body = []
        if not request_id_header:
            return message
        ours = self.request_id.encode()
        if theirs is not None and theirs != ours and not has_upstream_id:
            headers.append((b"x-upstream-request-id", theirs))
        headers.append((b"x-request-id", ours))
        return {**message, "headers": headers}

    def _ms_since_start(self, now: float) -> float:
        return round((now - self.started) * 1000.0, 3)

    def on_response_body(self, message: Message) -> None:
        chunk = message.get("body", b"")
        if not chunk:
            return
        self.bytes_out += len(chunk)
        now = time.monotonic()
        scanner = self.scanner
        first_output = False
        if scanner is not None:
            events = scanner.data_events
            first_output = scanner.feed(chunk)
            if scanner.data_events != events:
                self.last_output = now
        else:
            self.last_output = now
            if self.response_body is not None:
                if self.bytes_out <= sniff.MAX_SNIFF_BYTES:
                    self.response_body.append(chunk)
                else:
                    self.response_body = None  # too big to parse for usage
        if not self.first_byte:
            self.first_byte = True
            self.ttfb_ms = self._ms_since_start(now)
            fields: dict[str, Any] = {"phase": Phase.STREAMING, "ttfb_ms": self.ttfb_ms}
            # Any other response's first byte is its first output.
            first_output = first_output or scanner is None
        elif not first_output and now - self.last_progress < PROGRESS_INTERVAL:
            return
        else:
            fields = {}
        # The first output is reported at once, whatever the cadence: it is what operators
        # wait for.
        if first_output:
            self.ttft_ms = self._ms_since_start(now)
            fields["ttft_ms"] = self.ttft_ms
        self.last_progress = now
        fields["bytes_out"] = self.bytes_out
        if scanner is not None:
            fields["chunks_out"] = scanner.data_events
        if self.last_output is not None:
            fields["last_output_at"] = round(time.time() - (now - self.last_output), 3)
        self.recorder.progress(self.request_id, fields)

    def drop(self, in_flight: InFlight) -> None:
        """Not a request to show after all (the app's own event stream, answering a GET): out
        of the view at once, with no finished entry, and nothing more reported."""
        if self.ended:
            return
        self.ended = True
        in_flight.release(self.request_id)
        if self.published:
            self.recorder.discard(self.request_id, self.status)
        self.published = True  # so that nothing reports it later (the start bound's timer)

    def finish(self, outcome: Outcome | None, scope: Scope, in_flight: InFlight) -> None:
        if self.ended:
            return
        self.ended = True
        in_flight.release(self.request_id)
        self.publish_start()  # a request that ends before it was reported still is
        usage: dict[str, int] = {}
        if self.scanner is not None:
            usage = self.scanner.usage
        elif self.response_body:
            usage = sniff.usage_from_json(b"".join(self.response_body))
        self.response_body = None
        if self.usage_from_app:
            usage = {**usage, **self.usage_from_app}
        vdm = scope["vdm"]
        if vdm.get("cancelled") is not None:
            outcome = Outcome.CANCELLED  # whatever else the cancel caused on the way out
        elif outcome is None:
            if vdm.get("upstream_error"):
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
            ttft_ms=self.ttft_ms,
            ttfb_ms=self.ttfb_ms,
        )


class _StartBound:
    """Reports requests whose body has not told their model within :data:`START_BOUND`.

    One timer for all of them, armed only while some are waiting, instead of one per request
    (most requests are reported within microseconds, when the app reads the body).
    """

    __slots__ = ("bound", "pending", "timer")

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.pending: deque[_Tracker] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, tracker: _Tracker) -> None:
        self.pending.append(tracker)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.bound, self._sweep)

    def _sweep(self) -> None:
        self.timer = None
        pending = self.pending
        now = time.monotonic()
        while pending:
            head = pending[0]
            if not head.published and now - head.started < self.bound:
                delay = head.started + self.bound - now
                self.timer = asyncio.get_running_loop().call_later(delay, self._sweep)
                return
            pending.popleft().publish_start()


class RequestMetricsMiddleware:
    """Reports every HTTP request of the wrapped app to ``recorder``; see the module doc."""

    def __init__(
        self,
        app: ASGIApp,
        recorder: Recorder,
        *,
        request_id_header: bool = True,
        in_flight: InFlight | None = None,
        start_bound: float = START_BOUND,
        exclude: Iterable[str] = (),
        cancellable: bool | None = None,
    ) -> None:
        self.app = app
        self.recorder = recorder
        # Whether to stop a cancelled request (abort.py); by default, when the recorder listens
        # for cancels (the publisher, unless VDM_WORKER_CANCEL=false).
        self.cancellable = (
            bool(getattr(recorder, "cancellable", False)) if cancellable is None else cancellable
        )
        self.request_id_header = request_id_header
        self.exclude = PathFilter(exclude)
        if in_flight is None:
            # The publisher's, so its cancel listener finds these requests.
            in_flight = getattr(recorder, "in_flight", None)
        self.in_flight = in_flight if isinstance(in_flight, InFlight) else InFlight()
        self._bound = _StartBound(start_bound)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "vdm" in scope or scope.get("path", "/") in self.exclude:
            await self.app(scope, receive, send)
            return
        vdm: dict[str, Any] = {}
        scope["vdm"] = vdm
        tracker = _Tracker(self.recorder, scope, self.in_flight)
        vdm["request_id"] = tracker.request_id
        if not tracker.published:
            self._bound.add(tracker)
        stop = None
        if self.cancellable:
            # The app's own abort hook, if it sets one (the reverse proxy does), replaces it.
            stop = vdm["abort"] = Abort()
        token = context.enter(tracker)
        try:
            await self._serve(scope, receive, send, tracker, stop)
        finally:
            context.leave(token)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, tracker: _Tracker, stop: Abort | None
    ) -> None:
        in_flight = self.in_flight
        response_complete = body_read = False

        async def receive_wrapper() -> Message:
            nonlocal body_read
            if stop is not None and (body_read or stop.requested):
                message = await stop.receive(receive)
                if message is None:  # cancelled: as a disconnect, but not the client's doing
                    return {"type": "http.disconnect"}
            else:
                message = await receive()
            kind = message["type"]
            if kind == "http.request":
                body_read = not message.get("more_body", False)
                tracker.on_request_body(message)
            elif kind == "http.disconnect" and not response_complete:
                tracker.finish(Outcome.CLIENT_CLOSED, scope, in_flight)
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal response_complete
            if stop is not None and stop.requested:
                raise RequestCancelled("the request was cancelled by an operator")
            kind = message["type"]
            if kind == "http.response.body":  # first: it is by far the most frequent
                if not tracker.ended:
                    tracker.on_response_body(message)
                if not message.get("more_body", False):
                    response_complete = True
            elif kind == "http.response.start":
                message = tracker.on_response_start(message, self.request_id_header)
                if tracker.row["method"] == "GET" and answers_event_stream(message):
                    tracker.drop(in_flight)
            try:
                await send(message)
            except OSError:
                # The client went away under us (Uvicorn raises ClientDisconnected, an
                # OSError, when sending on a closed connection).
                tracker.finish(Outcome.CLIENT_CLOSED, scope, in_flight)
                raise
            if response_complete:
                tracker.finish(None, scope, in_flight)

        try:
            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except BaseException as exc:
                if stop is None or not stop.requested or _not_ours(exc, stop):
                    if tracker.status == 0:
                        tracker.status = 500
                    # The flags the app left in scope["vdm"] (upstream error, cancel) decide.
                    failed = (
                        None
                        if response_complete or scope["vdm"].get("upstream_error")
                        else Outcome.ERROR
                    )
                    tracker.finish(failed, scope, in_flight)
                    raise
                # Otherwise the app stopped because of the cancel, whichever way it showed it.
            finally:
                if stop is not None:
                    stop.app_returned()
            if stop is not None and stop.requested and not response_complete:
                await _cut(tracker, scope, receive, send)
        finally:
            # An app that returns without completing the response (or after a disconnect).
            if not tracker.ended:
                tracker.finish(
                    None if response_complete else Outcome.CLIENT_CLOSED, scope, in_flight
                )


def _not_ours(exc: BaseException, stop: Abort) -> bool:
    """A cancellation the abort did not cause (a server shutting down) is not swallowed."""
    return isinstance(exc, asyncio.CancelledError) and not stop.forced


async def _cut(tracker: _Tracker, scope: Scope, receive: Receive, send: Send) -> None:
    """End a cancelled request's response: 499 if it had not begun, else cut it mid-way."""
    if tracker.status:
        raise ResponseAborted("cancelled mid-response")
    tracker.status = CANCELLED_STATUS
    body = {"error": "cancelled", "message": "the request was cancelled by an operator"}
    await JSONResponse(body, CANCELLED_STATUS)(scope, receive, send)
