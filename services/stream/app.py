"""The stream service's ASGI app: ``create_app(settings, redis=None)``.

Lifetime (see ``docs/architecture.md``): the lifespan starts the hub (pub/sub reader and
reaper), the completed-stream reader and the broadcaster's loops as sibling tasks; on the way
out it closes every open stream first, then cancels those tasks **and awaits them**, then
closes the Redis client if it created it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Route

from services.stream.fanout import Broadcaster
from services.stream.hub import Hub
from services.stream.memo import PeriodicMemo
from services.stream.metrics import StreamMetrics
from services.stream.sse import SSEEndpoint
from services.stream.stats import RollingStats
from shared.auth import DEFAULT_EXEMPT, ASGIApp, Receive, RequireAuth, Scope, Send
from shared.keys import Keys
from shared.settings import Settings

log = logging.getLogger("vdm.stream")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
STREAM_PATH = "/metrics/active-requests/stream"


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


def _in_flight(hub: Hub | None) -> dict[str, Any]:
    by_worker: dict[str, int] = {}
    by_model: dict[str, int] = {}
    total = 0
    if hub is not None:
        for wid, view in hub.workers.items():
            by_worker[wid] = len(view.rows)
            total += len(view.rows)
            for row in view.rows.values():
                model = row["model"] or "unknown"
                by_model[model] = by_model.get(model, 0) + 1
    return {"fleet": total, "by_worker": by_worker, "by_model": by_model}


class StreamApp(FastAPI):
    """FastAPI with one fast path: ``GET`` of the SSE stream skips FastAPI/Starlette's stack.

    With thousands of clients the per-send cost is the bottleneck, and every ``send`` through
    the full stack passes three wrapper coroutines (ServerErrorMiddleware, the exception
    handler's sender, FastAPI's AsyncExitStack), ~40% of the fan-out's CPU in a profile. The
    fast path is the raw SSE endpoint wrapped in the SAME access control (CORS outside auth,
    see ``_access_control``), so the HTTP contract is unchanged.
    """

    sse_fast_path: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.sse_fast_path
        if (
            fast is not None
            and scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"] == STREAM_PATH
        ):
            await fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _access_control(settings: Settings) -> list[tuple[Any, dict[str, Any]]]:
    """The access-control middleware, innermost first (docs/security.md).

    Auth sits inside CORS: preflights are answered by CORS before any auth check, and a 401
    still goes out through CORS, carrying the headers the browser needs to read it. /healthz
    and /readyz stay open for orchestrators' and compose's health probes.
    """
    layers: list[tuple[Any, dict[str, Any]]] = []
    if settings.auth_token:
        layers.append((RequireAuth, {"token": settings.auth_token, "exempt_paths": DEFAULT_EXEMPT}))
    if settings.cors_origins:
        origins = list(settings.cors_origins)
        cors = {
            "allow_origins": origins,
            "allow_methods": ["GET"],
            "allow_headers": ["Authorization", "Last-Event-ID", "Cache-Control"],
            # Credentials only with an explicit origin list (settings refuse '*' + token).
            "allow_credentials": "*" not in origins,
        }
        layers.append((CORSMiddleware, cors))
    return layers


def _guarded(endpoint: ASGIApp, settings: Settings) -> ASGIApp:
    """``endpoint`` wrapped in the same access control as the FastAPI app."""
    app = endpoint
    for middleware, options in _access_control(settings):
        app = middleware(app, **options)
    return app


def create_app(settings: Settings, redis: aioredis.Redis | None = None) -> FastAPI:
    owns_redis = redis is None
    client = redis or aioredis.Redis.from_url(settings.redis_url or DEFAULT_REDIS_URL)
    keys = Keys(settings.key_prefix)
    metrics = StreamMetrics()
    # LOG_REQUEST_METRICS=false: no hub at all; every stream gets a `disabled` event.
    hub = (
        Hub(client, keys, heartbeat_interval=settings.worker_heartbeat_interval)
        if settings.log_request_metrics
        else None
    )
    stats = RollingStats(
        client,
        keys,
        step=settings.sse_interval,
        in_flight=lambda: _in_flight(hub),
        on_entry=metrics.observe,
        on_malformed=metrics.malformed_completed,
    )
    bc = Broadcaster(
        hub,
        interval=settings.sse_interval,
        heartbeat=settings.sse_heartbeat,
        throttle=settings.sse_throttle,
        max_clients=settings.max_sse_clients,
        stats_summary=stats.tick,
        snapshot_bps=settings.sse_snapshot_max_bps,
    )
    if hub is not None:
        hub.on_change = bc.notify_change
    metrics.attach(hub, bc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bc.loop = asyncio.get_running_loop()
        jobs: list[Coroutine[Any, Any, None]] = []
        if hub is not None:
            jobs += [hub.run(), hub.reap_loop(), stats.run()]
            jobs += [bc.run_updates(), bc.run_heartbeats()]
            jobs += [bc.run_sweeps(settings.sse_send_timeout)]
        tasks = [asyncio.create_task(job, name=getattr(job, "__qualname__", "job")) for job in jobs]
        try:
            yield
        finally:
            bc.close()
            for task in tasks:
                task.cancel()
            # Await them, so nothing still uses the client we close next -- but bounded: a
            # task that does not unwind promptly must not hold shutdown past 2 s (issue 3).
            if tasks:
                _done, pending = await asyncio.wait(tasks, timeout=1.0)
                for task in pending:
                    log.warning("shutdown: task %s did not stop within 1 s", task.get_name())
            if owns_redis:
                with contextlib.suppress(TimeoutError, RedisError, OSError):
                    async with asyncio.timeout(0.5):
                        await client.aclose()

    sse = SSEEndpoint(
        bc,
        sse_enabled=settings.sse_enabled,
        metrics_enabled=settings.log_request_metrics,
        send_timeout=settings.sse_send_timeout,
        snapshot_bps=settings.sse_snapshot_max_bps,
    )
    # The polling endpoints answer from a cache whatever the number of pollers: the snapshot
    # is the broadcaster's (built at most once per published version), the summary is
    # recomputed at most once per interval.
    summary_memo = PeriodicMemo(
        lambda: orjson.dumps(stats.summary(time.time())), min(1.0, settings.sse_interval)
    )
    app = StreamApp(title="vdm-hub stream service", lifespan=lifespan)
    app.sse_fast_path = _guarded(sse, settings)
    app.state.settings = settings
    app.state.hub = hub
    app.state.stats = stats
    app.state.broadcaster = bc
    app.state.summary_memo = summary_memo
    app.state.metrics = metrics

    # Access control: the same layers around the whole app (Starlette runs the middleware
    # added LAST outermost, hence innermost first) and around the SSE fast path.
    for middleware, options in _access_control(settings):
        app.add_middleware(middleware, **options)

    # Every method but GET (HEAD, a CORS preflight, a 405) still takes the FastAPI path.
    app.router.routes.append(Route(STREAM_PATH, endpoint=sse, methods=["GET"]))

    @app.get("/metrics/active-requests")
    async def active_requests() -> Response:
        return JSONBytes(await bc.fresh_snapshot())

    @app.get("/metrics/summary")
    async def summary() -> Response:
        return JSONBytes(summary_memo.get())

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONBytes({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if hub is None:
            return JSONBytes({"status": "ready", "metrics": "disabled"})
        problem = None
        if not hub.ready:
            problem = "not in sync with Redis yet (starting, or resyncing after a lost link)"
        else:
            try:
                async with asyncio.timeout(1.0):
                    await client.ping()
            except (RedisError, OSError, TimeoutError) as exc:
                problem = f"Redis unreachable: {exc}"
        if problem:
            return JSONBytes({"status": "not_ready", "reason": problem}, status_code=503)
        return JSONBytes({"status": "ready", "workers": len(hub.workers)})

    return app
