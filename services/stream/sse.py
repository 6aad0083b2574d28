"""The raw ASGI route of ``GET /metrics/active-requests/stream``.

The route is a small ASGI app rather than a ``StreamingResponse`` so the per-client work is
exactly: wait on a future, then ``send`` a ``bytes`` object that was encoded once for everyone.
Frame bytes are in ``frames.py``; which frames a client gets, in ``feeds.py``.

``?delta=1`` asks for contract v2 (deltas); a ``Last-Event-ID`` header (EventSource sends it by
itself on reconnect) or a ``last_event_id`` query parameter on such a request is a resume
point. An unusable one (absent, not a number, from another process) just means a full snapshot
first: never an error, so a browser never gives up on the stream because of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from vdm_hub.services.stream.fanout import Broadcaster, Client
from vdm_hub.services.stream.feeds import delta_feed, snapshot_feed
from vdm_hub.services.stream.frames import disabled_frame
from vdm_hub.shared.responses import JSONResponse

log = logging.getLogger("vdm.stream.sse")


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    # Caches and proxies must not store or transform the stream (MDN, "Using server-sent
    # events"); nginx buffers responses unless told otherwise (X-Accel-Buffering).
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
# A version is at most 16 digits (below 2**53); anything longer is not one of ours.
MAX_EVENT_ID_CHARS = 20


def _query(scope: Scope) -> list[tuple[str, str]]:
    return parse_qsl(scope.get("query_string", b"").decode("latin-1"))


def wants_delta(scope: Scope) -> bool:
    return any(k == "delta" and v in ("1", "true") for k, v in _query(scope))


def last_event_id(scope: Scope) -> int | None:
    """The resume version, or None when there is no usable one.

    From the ``Last-Event-ID`` header (what EventSource sends on its own reconnects), else from
    a ``last_event_id`` query parameter: a client that reconnects by creating a new
    EventSource (its own backoff) cannot set headers.
    """
    text: str | None = None
    for name, value in scope.get("headers", ()):
        if name == b"last-event-id":
            text = value.decode("latin-1")
            break
    else:
        text = next((v for k, v in _query(scope) if k == "last_event_id"), None)
    if text is None:
        return None
    text = text.strip()
    if text.isascii() and text.isdigit() and len(text) <= MAX_EVENT_ID_CHARS:
        return int(text)
    return None


class SSEEndpoint:
    """ASGI app for ``GET /metrics/active-requests/stream``."""

    def __init__(
        self,
        bc: Broadcaster,
        *,
        sse_enabled: bool,
        metrics_enabled: bool,
        send_timeout: float,
        snapshot_bps: float = 1_000_000,
    ) -> None:
        self.bc = bc
        self.snapshot_bps = snapshot_bps
        self.sse_enabled = sse_enabled
        self.metrics_enabled = metrics_enabled
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.sse_enabled:
            body = {
                "error": "sse_disabled",
                "message": "The active-requests stream is disabled on this stream service.",
                "suggestion": "Set VDM_ACTIVE_REQUESTS_SSE_ENABLED=true to enable it, or poll "
                "GET /metrics/active-requests instead.",
            }
            await JSONResponse(body, 503)(scope, receive, send)
            return
        if not self.metrics_enabled:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": disabled_frame()})
            return
        bc = self.bc
        if bc.closed or bc.clients >= bc.max_clients:
            body = {
                "error": "too_many_clients",
                "message": "This stream service is at its client limit (VDM_MAX_SSE_CLIENTS).",
                "suggestion": "Retry later, or run another stream service.",
            }
            await JSONResponse(body, 503, headers={"retry-after": "5"})(scope, receive, send)
            return
        await self._stream(scope, receive, send)

    def _feed(self, scope: Scope, client: Client) -> AsyncIterator[bytes]:
        if wants_delta(scope):
            return delta_feed(self.bc, client, last_event_id(scope))
        return snapshot_feed(self.bc, client, self.snapshot_bps)

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        bc = self.bc
        client = Client(asyncio.current_task())
        bc.join(client)

        def gone(_: object) -> None:
            # A parked client leaves at the next publish (see Broadcaster); it stops counting
            # against the client cap now.
            client.gone = True
            bc.leave(client)

        # The one extra task per client: Uvicorn's send() is silent after a disconnect, so
        # only receive() tells us the client left.
        listener = asyncio.ensure_future(_until_disconnect(receive))
        listener.add_done_callback(gone)
        # VDM_SSE_SEND_TIMEOUT: each send stamps when it began; the broadcaster's sweep cancels
        # this task if a send stays blocked (a paused transport) longer than the timeout.
        try:
            client.sending_since = time.monotonic()
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for chunk in self._feed(scope, client):
                for piece in pieces(chunk):
                    client.sending_since = time.monotonic()
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                client.sending_since = 0.0
            if not client.gone:
                client.sending_since = time.monotonic()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            client.sending_since = 0.0
        except asyncio.CancelledError:
            task = client.task
            if not client.timed_out or task is None or task.uncancel() > 0:
                raise  # not (only) our sweep: somebody else wants this task gone
            bc.dropped += 1
            log.warning("dropped an SSE client that took no data for %.1fs", self.send_timeout)
        finally:
            bc.leave(client)
            listener.remove_done_callback(gone)
            listener.cancel()


# Uvicorn's transport pauses writers above 64 KiB of unsent data (its HIGH_WATER_LIMIT) and
# send() waits for the drain, but one large write is buffered whole, and copied: a 4 MB
# snapshot to 1,000 clients that cannot take it at once held ~0.9 GB (bench rows scenario).
# Written in pieces of that size, a client holds at most about two pieces whatever the frame.
PIECE_BYTES = 65536


def pieces(chunk: bytes) -> list[bytes] | list[memoryview]:
    """``chunk`` as one piece, or as views of at most PIECE_BYTES each (no copies)."""
    if len(chunk) <= PIECE_BYTES:
        return [chunk]
    view = memoryview(chunk)
    return [view[i : i + PIECE_BYTES] for i in range(0, len(chunk), PIECE_BYTES)]


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
