"""The operator actuator: ``POST /metrics/active-requests/{request_id}/cancel``, and
``GET /metrics/capabilities`` that tells a dashboard whether to offer it.

A cancel is a request to the worker that owns the row, sent on its pub/sub channel
(``Keys.cancel(worker_id)``, JSON ``{"request_id", "by"}``); the worker aborts the upstream
call and the request ends with outcome ``cancelled``. Answers (``docs/security.md``):

- 403 ``cancel_disabled`` unless ``VDM_CANCEL_ENABLED=true``; 401 without the token when
  ``VDM_AUTH_TOKEN`` is set (the auth middleware, before this route);
- 403 ``cross_origin`` for a browser request without bearer token whose Origin (or Referer) is
  neither this service nor one of ``VDM_CORS_ORIGINS``: a session cookie is sent by the browser
  whoever wrote the page, so the cookie path needs a same-origin check (CSRF);
- 400 ``bad_request_id`` for an id no worker can have issued; 404 ``unknown_request`` when no
  row of this hub's view has that id;
- 202 ``requested`` once at least one subscriber of the worker's channel received it;
  503 ``worker_unreachable`` when nobody did (the worker is gone, or does not listen for
  cancels): PUBLISH is fire-and-forget, so its receiver count is the only honest signal;
- 503 ``redis_unavailable`` when Redis does not answer within ``PUBLISH_TIMEOUT``.

202 means "delivered", not "done": the row disappears from the view when the worker's
``end`` arrives. Every attempt is logged with who asked (``bearer``, ``session`` or
``anonymous``, never a credential), the request id and the worker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from vdm_hub.shared import schema
from vdm_hub.shared.auth import parse_bearer, request_is_secure, session_values
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.responses import JSONResponse
from vdm_hub.shared.settings import Settings

if TYPE_CHECKING:
    from vdm_hub.services.stream.hub import Hub

log = logging.getLogger("vdm.stream.cancel")

PUBLISH_TIMEOUT = 2.0  # seconds; the caller gets a 503 rather than a hanging button


def valid_request_id(request_id: str) -> bool:
    """The shape of an id a worker can have issued: 1-128 printable characters, no spaces."""
    return (
        0 < len(request_id) <= schema.MAX_ID_CHARS
        and request_id.isprintable()
        and not any(c.isspace() for c in request_id)
    )


def caller_of(request: Request, auth_enabled: bool) -> str:
    """Who asked: ``bearer``/``session`` (the auth middleware already checked it) or
    ``anonymous`` when the service runs without a token."""
    if not auth_enabled:
        return "anonymous"
    if parse_bearer(request.headers.get("authorization")) is not None:
        return "bearer"
    return "session" if session_values(request.scope) else "anonymous"


def request_origin(request: Request) -> str | None:
    """The browser's Origin header, else the origin of its Referer, else None."""
    origin = request.headers.get("origin")
    if origin:
        return origin.strip().lower()
    referer = request.headers.get("referer")
    if referer:
        parts = urlsplit(referer.strip())
        if parts.scheme and parts.netloc:
            return f"{parts.scheme}://{parts.netloc}".lower()
        return "null"
    return None


def own_origin(request: Request) -> str | None:
    host = request.headers.get("host")
    if not host:
        return None
    scheme = "https" if request_is_secure(request.scope) else "http"
    return f"{scheme}://{host}".lower()


def origin_allowed(request: Request, cors_origins: tuple[str, ...]) -> bool:
    """Same-origin check for requests a browser may have sent on another site's behalf.

    With a session cookie the Origin (or Referer) must be present and allowed: browsers send
    Origin on every cross-origin POST, so its absence means a non-browser client, which has no
    business holding the cookie. Anonymous callers (no token configured) without either header
    are command-line clients and pass; with one, it must be allowed, so a page on another site
    cannot drive the actuator through a visitor's browser either.
    """
    allowed = {o.lower().rstrip("/") for o in cors_origins if o != "*"}
    own = own_origin(request)
    if own:
        allowed.add(own)
    origin = request_origin(request)
    if origin is None:
        return not session_values(request.scope)
    return origin.rstrip("/") in allowed


def owner_of(hub: Hub | None, request_id: str) -> str | None:
    if hub is None:
        return None
    for worker_id, view in hub.workers.items():
        if request_id in view.rows:
            return worker_id
    return None


def refusal(
    request: Request, request_id: str, settings: Settings, by: str, client: str
) -> Response | None:
    """The answer to a cancel that must not go out (disabled, cross-origin, bad id), or None."""
    if not settings.cancel_enabled:
        log.info("cancel refused (disabled): request %r by %s from %s", request_id, by, client)
        body = {
            "error": "cancel_disabled",
            "message": "Cancelling requests is turned off on this stream service.",
            "suggestion": "Start the stream service with VDM_CANCEL_ENABLED=true "
            "(see docs/security.md for who may then use it).",
        }
        return JSONResponse(body, 403)
    bearer = parse_bearer(request.headers.get("authorization")) is not None
    if not bearer and not origin_allowed(request, settings.cors_origins):
        origin = request_origin(request)
        log.warning(
            "cancel refused (cross-origin %r): request %r by %s from %s",
            origin,
            request_id,
            by,
            client,
        )
        body = {
            "error": "cross_origin",
            "message": "This cancel came from a page of another origin; it is refused "
            "so that other sites cannot act with your session.",
            "suggestion": "Use the dashboard whose origin is in VDM_CORS_ORIGINS, or "
            "send 'Authorization: Bearer <VDM_AUTH_TOKEN>' from scripts.",
        }
        return JSONResponse(body, 403)
    if not valid_request_id(request_id):
        body = {
            "error": "bad_request_id",
            "message": f"A request id is 1-{schema.MAX_ID_CHARS} printable characters "
            "without spaces, as shown in the active-requests snapshot.",
        }
        return JSONResponse(body, 400)
    return None


async def deliver(
    redis: aioredis.Redis, keys: Keys, request_id: str, worker_id: str, by: str, client: str
) -> Response:
    """Publish the cancel on the worker's channel; 202 once somebody received it."""
    message = orjson.dumps({"request_id": request_id, "by": by})
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            receivers = int(await redis.publish(keys.cancel(worker_id), message))
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning(
            "cancel of request %r on worker %s by %s failed: Redis unavailable (%s)",
            request_id,
            worker_id,
            by,
            type(exc).__name__,
        )
        body = {
            "error": "redis_unavailable",
            "message": "Redis did not take the cancel request; nothing was cancelled.",
            "suggestion": "Retry when /readyz answers 200.",
        }
        return JSONResponse(body, 503)
    if receivers == 0:
        log.warning(
            "cancel of request %r on worker %s by %s: no worker listening",
            request_id,
            worker_id,
            by,
        )
        body = {
            "error": "worker_unreachable",
            "request_id": request_id,
            "worker_id": worker_id,
            "message": f"Worker {worker_id!r} is not listening for cancel requests "
            "(it may be gone, or run a version without cancel support); nothing was "
            "cancelled.",
        }
        return JSONResponse(body, 503)
    log.info(
        "cancel requested: request %r on worker %s by %s from %s", request_id, worker_id, by, client
    )
    return JSONResponse(
        {"request_id": request_id, "worker_id": worker_id, "status": "requested"}, 202
    )


def cancel_router(
    settings: Settings, hub: Hub | None, redis: aioredis.Redis, keys: Keys
) -> APIRouter:
    router = APIRouter()
    auth_enabled = bool(settings.auth_token)

    @router.get("/metrics/capabilities")
    async def capabilities() -> Response:
        body = {
            "cancel_enabled": settings.cancel_enabled,
            "stuck_after_s": settings.stuck_after,
            "stall_after_s": settings.stall_after,
            "delta": True,
        }
        return JSONResponse(body)

    @router.post("/metrics/active-requests/{request_id}/cancel")
    async def cancel(request_id: str, request: Request) -> Response:
        by = caller_of(request, auth_enabled)
        request_id = request_id[: 4 * schema.MAX_ID_CHARS]  # bounded in logs and answers
        client = request.client.host if request.client else "-"
        refused = refusal(request, request_id, settings, by, client)
        if refused is not None:
            return refused
        worker_id = owner_of(hub, request_id)
        if worker_id is None:
            log.info("cancel of unknown request %r by %s from %s", request_id, by, client)
            body = {
                "error": "unknown_request",
                "message": f"No request in flight has the id {request_id!r} (it may have "
                "finished already).",
            }
            return JSONResponse(body, 404)
        return await deliver(redis, keys, request_id, worker_id, by, client)

    return router
