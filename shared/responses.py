"""The one JSON response of every service: Starlette's ``JSONResponse``, encoded with orjson.

Starlette's own encodes with the standard library, several times slower on the large
snapshots the stream service answers pollers with; and those snapshots are already encoded
once per publish for every client, so ``bytes`` content is taken as JSON that is already
encoded and sent as it is. Being a Starlette response it is also a plain ASGI app, which is
how the raw ASGI code (the worker's proxy, the auth middleware, the SSE route) sends one:
``await JSONResponse(body, status_code=...)(scope, receive, send)``.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette import responses


class JSONResponse(responses.JSONResponse):
    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)
