"""An ASGI app that knows nothing of vdm-hub, for ``vdm-hub instrument`` to serve: ``GET
/slow?ms=N`` answers after N milliseconds, anything else at once."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    query = parse_qs(scope["query_string"].decode())
    await asyncio.sleep(int(query.get("ms", ["0"])[0]) / 1000)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"plain"})
