"""Serve an ASGI app on a free loopback port inside the running event loop.

For tests and benchmarks that want a real HTTP server (real sockets, real incremental
streaming, real disconnects) without a child process: ``async with serving(app) as url``.
Unlike ``shared.serve.serve`` it leaves signal handling alone, so it can run inside pytest or
inside another service's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Generator
from typing import Any

import uvicorn

from shared.serve import bind_socket, url_for


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # signals belong to whoever owns the loop


@contextlib.asynccontextmanager
async def serving(
    app: Any, host: str = "127.0.0.1", *, start_timeout: float = 10.0
) -> AsyncIterator[str]:
    """Yield the base URL while ``app`` is served; shut down (1 s grace) on exit."""
    sock = bind_socket(host, 0)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if task.done():
                task.result()  # raises the start-up error
                raise RuntimeError("server exited before it started")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start within {start_timeout}s")
            await asyncio.sleep(0.01)
        yield url_for(sock)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 10)
        finally:
            sock.close()
