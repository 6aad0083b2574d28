"""Serve an ASGI app on a free loopback port inside the test's own event loop.

For tests that want a real HTTP server (real sockets, incremental streaming, disconnects)
without a child process: ``async with running(app, "upstream") as (url, server)``. It is the
server every vdm-hub service runs (``shared.serve.make_server``: lifespan on, the same ready
line), started and shut down with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from vdm_hub.shared.serve import bind_socket, make_server, url_for


@contextlib.asynccontextmanager
async def running(app: Any, name: str) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """Serve ``app`` on a free loopback port inside the current event loop."""
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(app, sock, name, graceful_timeout=1.0)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield url_for(sock), server
    finally:
        server.should_exit = True
        try:
            # A shutdown that hangs is a failure worth seeing, not something to swallow.
            async with asyncio.timeout(10):
                await task
        finally:
            sock.close()
