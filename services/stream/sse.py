"""Server-Sent Events: frame encoding, the per-client event iterator, and the raw ASGI route.

The route is a small ASGI app rather than a ``StreamingResponse`` so the per-client work is
exactly: wait on a future, then ``send`` a ``bytes`` object that was encoded once for everyone.
Frames follow the WHATWG HTML "server-sent events" format: ``id:``/``event:``/``data:`` lines and
a blank line; a line starting with ``:`` is a comment (our ``: heartbeat``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from services.stream.fanout import Broadcaster, Client

log = logging.getLogger("vdm.stream.sse")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HEARTBEAT = b": heartbeat\n\n"
# Reconnect hint for EventSource (ms); the dashboard's own backoff takes over when CLOSED.
RETRY_MS = 2000

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    # Caches and proxies must not store or transform the stream (MDN, "Using server-sent
    # events"); nginx buffers responses unless told otherwise (X-Accel-Buffering).
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def encode_event(event: str, data: bytes, *, event_id: int | None = None) -> bytes:
    """One complete SSE frame; ``data`` is compact JSON, so it holds no newline."""
    head = b"" if event_id is None else b"id: %d\n" % event_id
    return head + b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


DISABLED_MESSAGE = "Request metrics are disabled on this stream service."
DISABLED_SUGGESTION = "Set LOG_REQUEST_METRICS=true on the stream service and restart it."


def disabled_frame() -> bytes:
    body = {"disabled": True, "message": DISABLED_MESSAGE, "suggestion": DISABLED_SUGGESTION}
    return encode_event("disabled", orjson.dumps(body))


async def client_frames(bc: Broadcaster, client: Client) -> AsyncIterator[bytes]:
    """Everything one client receives: the current frames at once, then each newer one.

    Only generation numbers are compared; the bytes themselves are shared, never copied
    per client. A client that kept up takes ``bc.delta`` (built once per publish); one that
    fell more than a publish behind joins the current frames of the kinds it missed.
    """
    # The retry hint rides in the first update frame: a block without data is never dispatched.
    # Note what this first chunk holds *before* yielding: anything published while it is
    # being sent must still go out afterwards.
    seen, seen_update, seen_stats, seen_beat = bc.gen, bc.update_gen, bc.stats_gen, bc.heartbeat_gen
    yield b"retry: %d\n" % RETRY_MS + bc.update_frame + bc.stats_frame
    while not (bc.closed or client.gone):
        gen = bc.gen
        if gen == seen:
            await bc.wait(client)
            continue
        if gen == seen + 1:
            chunk = bc.delta
        else:
            due: list[bytes] = []
            if bc.update_gen != seen_update:
                due.append(bc.update_frame)
            if bc.stats_gen != seen_stats:
                due.append(bc.stats_frame)
            if bc.heartbeat_gen != seen_beat:
                due.append(HEARTBEAT)
            chunk = due[0] if len(due) == 1 else b"".join(due)
        seen, seen_update, seen_stats, seen_beat = (
            gen,
            bc.update_gen,
            bc.stats_gen,
            bc.heartbeat_gen,
        )
        yield chunk


def json_response_start(status: int, extra: list[tuple[bytes, bytes]] | None = None) -> Message:
    headers = [(b"content-type", b"application/json"), *(extra or [])]
    return {"type": "http.response.start", "status": status, "headers": headers}


class SSEEndpoint:
    """ASGI app for ``GET /metrics/active-requests/stream``."""

    def __init__(
        self,
        bc: Broadcaster,
        *,
        sse_enabled: bool,
        metrics_enabled: bool,
        send_timeout: float,
    ) -> None:
        self.bc = bc
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
            await send(json_response_start(503))
            await send({"type": "http.response.body", "body": orjson.dumps(body)})
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
            await send(json_response_start(503, [(b"retry-after", b"5")]))
            await send({"type": "http.response.body", "body": orjson.dumps(body)})
            return
        await self._stream(receive, send)

    async def _stream(self, receive: Receive, send: Send) -> None:
        from services.stream.fanout import Client

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
            async for chunk in client_frames(bc, client):
                client.sending_since = time.monotonic()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
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


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
