"""The worker: the reverse proxy, wrapped in the instrumentation, with its own endpoints.

Paths under ``/_vdm/`` belong to the worker (``/_vdm/healthz``, ``/_vdm/status``) and are
never proxied or recorded; every other HTTP request goes to the upstream. WebSocket upgrades
are refused (403 with a JSON reason; not proxied, not recorded): the proxy speaks HTTP only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import redis.asyncio as aioredis
from starlette.routing import Router
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose

from vdm_hub.services.httppool import ShardedClients
from vdm_hub.services.proxy.forward import ReverseProxy, make_clients, quiet_deliberate_aborts
from vdm_hub.services.proxy.instrument import RequestMetricsMiddleware
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.services.proxy.workerid import WorkerIdPlan
from vdm_hub.shared.responses import JSONResponse
from vdm_hub.shared.settings import Settings

OWN_PREFIX = "/_vdm/"
# Policy violation: what a close before the handshake means (Uvicorn answers it with a 403).
WS_POLICY_VIOLATION = 1008

log = logging.getLogger("vdm.proxy")


class _QuietWebSocketRefusals(logging.Filter):
    """Drops what the server stack logs below WARNING about a WebSocket handshake: Uvicorn's
    ``"WebSocket /path?query" 403`` (it logs the query string whatever ``access_log`` says),
    the websockets library's ``connection rejected``, and at DEBUG every handshake header,
    ``Authorization`` included. Query strings and headers never go into a log here; the
    worker, which accepts no WebSocket, logs one line of its own instead. Both log through
    ``uvicorn.error`` from modules in a ``websockets`` package (Uvicorn's
    ``protocols/websockets/`` and the library), which is how their records are told apart."""

    PACKAGE = f"{os.sep}websockets{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self.PACKAGE not in record.pathname


QUIET_WEBSOCKET_REFUSALS = _QuietWebSocketRefusals()


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
        logging.getLogger("uvicorn.error").addFilter(QUIET_WEBSOCKET_REFUSALS)  # idempotent
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
        elif kind == "websocket":
            await self._refuse_websocket(scope, receive, send)
        elif kind == "lifespan":
            # Starlette's Router speaks the lifespan protocol (startup failure reported,
            # shutdown errors surfaced) around our context manager; requests never reach it.
            await self._lifespan_router.lifespan(scope, receive, send)

    @staticmethod
    async def _refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a WebSocket upgrade before the handshake (ASGI WebSocket spec: an HTTP
        response through the denial-response extension, or a close, both before accept).
        Returning without either made Uvicorn answer 500 and log an ERROR each time."""
        if (await receive())["type"] != "websocket.connect":
            return  # the client left already
        path = scope.get("path")  # without the query string
        log.info("refused a WebSocket upgrade to %.200r: the worker proxies HTTP only", path)
        if "websocket.http.response" in (scope.get("extensions") or {}):
            message = "this worker proxies HTTP requests only; WebSocket upgrades are refused"
            body = {"error": "websocket_not_supported", "message": message}
            await JSONResponse(body, 403)(scope, receive, send)
        else:
            await WebSocketClose(WS_POLICY_VIOLATION)(scope, receive, send)

    async def _own(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/_vdm/healthz":
            status, body = 200, {"status": "ok"}
        elif path == "/_vdm/status":
            status = 200
            body = (
                self.publisher.status()
                if self.publisher
                else {
                    "worker_id": WorkerIdPlan.here(self.settings.worker_id).first(),
                    "metrics": "disabled",
                }
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
