"""The worker: the reverse proxy, wrapped in the instrumentation, with its own endpoints.

Paths under ``/_vdm/`` belong to the worker (``/_vdm/healthz``, ``/_vdm/status``) and are
never proxied or recorded; everything else goes to the upstream.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import redis.asyncio as aioredis
from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from vdm_hub.services.httppool import ShardedClients
from vdm_hub.services.proxy.forward import ReverseProxy, make_clients, quiet_deliberate_aborts
from vdm_hub.services.proxy.instrument import RequestMetricsMiddleware
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared.responses import JSONResponse
from vdm_hub.shared.settings import Settings

OWN_PREFIX = "/_vdm/"


class WorkerApp:
    """ASGI app of one worker; ``publisher`` is None when LOG_REQUEST_METRICS is false."""

    def __init__(
        self,
        settings: Settings,
        upstream: str,
        redis: aioredis.Redis | None = None,
        client: httpx.AsyncClient | None = None,
        *,
        instrument: bool | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self._own_client = client is None
        self.clients = ShardedClients.of(client) if client is not None else make_clients()
        proxy: Any = ReverseProxy(upstream, self.clients)
        quiet_deliberate_aborts()
        enabled = settings.log_request_metrics if instrument is None else instrument
        self.publisher = Publisher(settings, redis, upstream=upstream) if enabled else None
        self.proxied = (
            RequestMetricsMiddleware(proxy, self.publisher, exclude=settings.exclude_paths)
            if self.publisher
            else proxy
        )
        self._lifespan_router = Router(lifespan=lambda _app: self.lifespan())

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        if self.publisher is not None:
            await self.publisher.start_background()
        try:
            yield
        finally:
            # Uvicorn has already drained in-flight requests (graceful timeout) by now.
            if self.publisher is not None:
                await self.publisher.close()
            if self._own_client:
                await self.clients.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"].startswith(OWN_PREFIX):
                await self._own(scope, receive, send)
            else:
                await self.proxied(scope, receive, send)
        elif kind == "lifespan":
            # Starlette's Router speaks the lifespan protocol (startup failure reported,
            # shutdown errors surfaced) around our context manager; requests never reach it.
            await self._lifespan_router.lifespan(scope, receive, send)

    async def _own(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/_vdm/healthz":
            status, body = 200, {"status": "ok"}
        elif path == "/_vdm/status":
            status = 200
            body = (
                self.publisher.status()
                if self.publisher
                else {"worker_id": self.settings.worker_id, "metrics": "disabled"}
            )
        else:
            status, body = 404, {"error": "not_found", "message": f"no worker endpoint {path}"}
        await JSONResponse(body, status)(scope, receive, send)


def create_app(
    settings: Settings,
    redis: aioredis.Redis | None = None,
    *,
    upstream: str | None = None,
    client: httpx.AsyncClient | None = None,
) -> WorkerApp:
    target = upstream or settings.upstream_url
    if not target:
        from vdm_hub.shared.settings import ConfigError

        raise ConfigError("VDM_UPSTREAM_URL: not set and no --upstream given")
    return WorkerApp(settings, target, redis, client)
