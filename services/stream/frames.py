"""SSE frame bytes: the only place that knows the wire format of a frame.

Frames follow the WHATWG HTML "server-sent events" format: ``id:``/``event:``/``data:`` lines and
a blank line; a line starting with ``:`` is a comment (our ``: heartbeat``). Payloads are
compact JSON, so a ``data:`` line never holds a newline.
"""

from __future__ import annotations

import orjson

HEARTBEAT = b": heartbeat\n\n"
# Reconnect hint for EventSource (ms); the dashboard's own backoff takes over when CLOSED.
RETRY_MS = 2000
RETRY = b"retry: %d\n" % RETRY_MS

DISABLED_MESSAGE = "Request metrics are disabled on this stream service."
DISABLED_SUGGESTION = "Set LOG_REQUEST_METRICS=true on the stream service and restart it."


def encode_event(event: str, data: bytes, *, event_id: int | None = None) -> bytes:
    """One complete SSE frame; ``data`` is compact JSON, so it holds no newline."""
    head = b"" if event_id is None else b"id: %d\n" % event_id
    return head + b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def disabled_frame() -> bytes:
    body = {"disabled": True, "message": DISABLED_MESSAGE, "suggestion": DISABLED_SUGGESTION}
    return encode_event("disabled", orjson.dumps(body))
