"""The stream service's ASGI app: ``create_app(settings, redis=None)``.

Lifetime (see ``docs/architecture.md``): the lifespan starts the hub (pub/sub reader and
reaper), the completed-stream reader and the broadcaster's loops as sibling tasks; on the way
out it closes every open stream first, then cancels those tasks **and awaits them**, then
closes the Redis client if it created it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from fastapi import APIRouter, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from vdm_hub.services.stream.cancel import cancel_router
from vdm_hub.services.stream.completed import completed_router
from vdm_hub.services.stream.fanout import Broadcaster
from vdm_hub.services.stream.hub import Hub
from vdm_hub.services.stream.memo import PeriodicMemo
from vdm_hub.services.stream.metrics import RequestMetrics, StreamMetrics
from vdm_hub.services.stream.sse import SSEEndpoint
from vdm_hub.services.stream.stats import RollingStats, flight_summary
from vdm_hub.services.stream.supervise import TaskSupervisor
from vdm_hub.shared.auth import DEFAULT_EXEMPT, RequireAuth
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.redis_client import build_client
from vdm_hub.shared.responses import JSONResponse
from vdm_hub.shared.settings import Settings, any_host_origin_regex

log = logging.getLogger("vdm.stream")

STREAM_PATH = "/metrics/active-requests/stream"


def _job_name(job: Callable[[], Awaitable[None]]) -> str:
    target = job.func if isinstance(job, functools.partial) else job
    return str(getattr(target, "__qualname__", "job"))


class StreamApp(FastAPI):
    """FastAPI with one fast path: ``GET`` of the SSE stream skips FastAPI/Starlette's stack.

    With thousands of clients the per-send cost is the bottleneck, and every ``send`` through
    the full stack passes three wrapper coroutines (ServerErrorMiddleware, the exception
    handler's sender, FastAPI's AsyncExitStack), ~40% of the fan-out's CPU in a profile. The
    fast path is the raw SSE endpoint wrapped in the SAME access control (CORS outside auth,
    see ``_access_control``), so the HTTP contract is unchanged.
    """

    def __init__(self, *, sse_fast_path: ASGIApp, **options: Any) -> None:
        super().__init__(**options)
        self.sse_fast_path = sse_fast_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == STREAM_PATH:
            await self.sse_fast_path(scope, receive, send)
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
        origins = [o for o in settings.cors_origins if not o.startswith(("http://*", "https://*"))]
        cors = {
            "allow_origins": origins,
            # scheme://*:port entries: any host name on that port (settings.py)
            "allow_origin_regex": any_host_origin_regex(settings.cors_origins),
            "allow_methods": ["GET", "POST"],  # POST: the cancel action
            "allow_headers": ["Authorization", "Content-Type", "Last-Event-ID", "Cache-Control"],
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


@dataclass(frozen=True)
class StreamService:
    """The objects of one stream service, each handed what it uses when it is built."""

    settings: Settings
    redis: aioredis.Redis
    owns_redis: bool
    keys: Keys
    hub: Hub | None
    stats: RollingStats
    broadcaster: Broadcaster
    metrics: StreamMetrics
    supervisor: TaskSupervisor
    summary_memo: PeriodicMemo[bytes]


def build_service(settings: Settings, redis: aioredis.Redis | None = None) -> StreamService:
    client = redis or build_client(settings)
    keys = Keys(settings.key_prefix)
    # The hub sets `changes` on every change, the broadcaster's update loop waits on it.
    changes = asyncio.Event()
    # LOG_REQUEST_METRICS=false: no hub at all; every stream gets a `disabled` event.
    hub = (
        Hub(
            client,
            keys,
            heartbeat_interval=settings.worker_heartbeat_interval,
            on_change=changes.set,
        )
        if settings.log_request_metrics
        else None
    )
    finished = RequestMetrics()
    stats = RollingStats(
        client,
        keys,
        step=settings.sse_interval,
        in_flight=(lambda: flight_summary(hub.in_flight())) if hub is not None else None,
        fleet_since=functools.partial(_fleet_since, hub) if hub is not None else None,
        on_entry=finished.observe,
        on_malformed=finished.malformed_completed,
    )
    bc = Broadcaster(
        hub,
        interval=settings.sse_interval,
        heartbeat=settings.sse_heartbeat,
        throttle=settings.sse_throttle,
        max_clients=settings.max_sse_clients,
        stats_summary=stats.tick,
        snapshot_bps=settings.sse_snapshot_max_bps,
        changes=changes,
    )
    # The polling endpoints answer from a cache whatever the number of pollers: the snapshot
    # is the broadcaster's (built at most once per published version), the summary is
    # recomputed at most once per interval.
    summary_memo = PeriodicMemo(
        lambda: orjson.dumps(stats.summary(time.time())), min(1.0, settings.sse_interval)
    )
    return StreamService(
        settings=settings,
        redis=client,
        owns_redis=redis is None,
        keys=keys,
        hub=hub,
        stats=stats,
        broadcaster=bc,
        metrics=StreamMetrics(
            hub, bc, finished, stuck_after=settings.stuck_after, stall_after=settings.stall_after
        ),
        supervisor=_supervisor(hub, stats, bc, settings.sse_send_timeout),
        summary_memo=summary_memo,
    )


def _fleet_since(hub: Hub) -> float | None:
    """The earliest start of a worker in view: the fleet has been serving since then."""
    return min(
        (view.record["started_at"] for view in hub.workers.values() if view.record), default=None
    )


def _supervisor(
    hub: Hub | None, stats: RollingStats, bc: Broadcaster, send_timeout: float
) -> TaskSupervisor:
    """The background loops, supervised (services/stream/supervise.py): a crash is logged,
    /readyz says not ready and the loop restarts with backoff, instead of a silent death."""
    supervisor = TaskSupervisor()
    if hub is None:
        return supervisor
    jobs: list[Callable[[], Awaitable[None]]] = [hub.run, hub.reap_loop, stats.run]
    jobs += [bc.run_updates, bc.run_heartbeats, functools.partial(bc.run_sweeps, send_timeout)]
    for job in jobs:
        # A crashed reader leaves its view unsynced until its restart has resynced it.
        crash = hub.reader_crashed if job == hub.run else None
        supervisor.add(_job_name(job), job, crash)
    return supervisor


def _lifespan(service: StreamService) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.supervisor.start()
        try:
            yield
        finally:
            service.broadcaster.close()
            # Await them, so nothing still uses the client we close next -- but bounded: a
            # task that does not unwind promptly must not hold shutdown past 2 s.
            await service.supervisor.stop(timeout=1.0)
            if service.owns_redis:
                with contextlib.suppress(TimeoutError, RedisError, OSError):
                    async with asyncio.timeout(0.5):
                        await service.redis.aclose()

    return lifespan


def _data_routes(service: StreamService) -> APIRouter:
    router = APIRouter()
    bc, memo, metrics = service.broadcaster, service.summary_memo, service.metrics

    @router.get("/metrics/active-requests")
    async def active_requests() -> Response:
        return JSONResponse(await bc.fresh_snapshot())

    @router.get("/metrics/summary")
    async def summary() -> Response:
        return JSONResponse(memo.get())

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


async def not_ready_because(service: StreamService) -> str | None:
    """Why the service is not ready (its hub is not in sync, a loop crashed, Redis is away)."""
    hub, supervisor = service.hub, service.supervisor
    if hub is None:
        return None
    if not supervisor.healthy:
        failing = ", ".join(sorted(supervisor.failing))
        return f"background task failed, restarting: {failing} (see the log)"
    if not hub.sync.ok:  # the reason clients are shown too (services/stream/sync.py)
        return f"not in sync with Redis: {hub.sync.reason}"
    if not hub.ready:
        return "not in sync with Redis yet (starting, or resyncing after a lost link)"
    try:
        async with asyncio.timeout(1.0):
            await service.redis.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        return f"Redis unreachable: {exc}"
    return None


def _health_routes(service: StreamService) -> APIRouter:
    router = APIRouter()

    # HEAD too: load balancers and uptime checkers probe with it (Starlette drops the body).
    @router.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @router.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> Response:
        hub = service.hub
        if hub is None:
            return JSONResponse({"status": "ready", "metrics": "disabled"})
        problem = await not_ready_because(service)
        if problem:
            return JSONResponse({"status": "not_ready", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ready", "workers": len(hub.workers)})

    return router


def create_app(settings: Settings, redis: aioredis.Redis | None = None) -> FastAPI:
    service = build_service(settings, redis)
    sse = SSEEndpoint(
        service.broadcaster,
        sse_enabled=settings.sse_enabled,
        metrics_enabled=settings.log_request_metrics,
        send_timeout=settings.sse_send_timeout,
        snapshot_bps=settings.sse_snapshot_max_bps,
    )
    app = StreamApp(
        sse_fast_path=_guarded(sse, settings),
        title="vdm-hub stream service",
        lifespan=_lifespan(service),
    )
    app.state.settings = settings
    app.state.hub = service.hub
    app.state.stats = service.stats
    app.state.broadcaster = service.broadcaster
    app.state.summary_memo = service.summary_memo
    app.state.metrics = service.metrics
    app.state.supervisor = service.supervisor

    # Access control: the same layers around the whole app (Starlette runs the middleware
    # added LAST outermost, hence innermost first) and around the SSE fast path.
    for middleware, options in _access_control(settings):
        app.add_middleware(middleware, **options)

    # Every method but GET (HEAD, a CORS preflight, a 405) still takes the FastAPI path.
    app.router.routes.append(Route(STREAM_PATH, endpoint=sse, methods=["GET"]))
    app.include_router(cancel_router(settings, service.hub, service.redis, service.keys))
    app.include_router(_data_routes(service))
    app.include_router(completed_router(service.redis, service.keys))
    app.include_router(_health_routes(service))
    return app
