"""The operator actuator: ``POST /metrics/active-requests/{request_id}/cancel``, and
``GET /metrics/capabilities`` that tells a dashboard whether to offer it.

A cancel is a request to the worker that owns the row, sent on its pub/sub channel
(``Keys.cancel(worker_id)``, JSON ``{"request_id", "by"}``); the worker aborts the upstream
call and the request ends with outcome ``cancelled``. Answers (``docs/security.md``):

- 403 ``cancel_disabled`` unless ``VDM_CANCEL_ENABLED=true``; 401 without the token when
  ``VDM_AUTH_TOKEN`` is set (the auth middleware, before this route);
- 403 ``cross_origin`` for a browser request without bearer token whose Origin (or Referer) is
  none of the configured public origins (``VDM_STREAM_PUBLIC_URL``'s, ``VDM_CORS_ORIGINS``),
  never judged by ``Host``: a session cookie is sent by the browser whoever wrote the page, so
  the cookie path needs an origin check (CSRF);
- 400 ``bad_request_id`` for an id no worker can have issued; 404 ``unknown_request`` when no
  row of this hub's view has that id;
- ``?worker_id=W`` names the row: a request id is unique per worker only (a client's retry can
  carry one ``X-Request-Id`` to two workers). With it, exactly W's request is cancelled (404
  ``unknown_request`` when W holds none by that id); without it, an id that two or more
  workers hold answers 409 ``ambiguous_request`` naming them and the parameter, never a guess;
- 409 ``not_cancellable`` when the owning worker's record says ``"cancellable": false`` (it
  does not listen for cancels, so nothing would stop the request);
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
from urllib.parse import quote, urlsplit

import orjson
import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from vdm_hub.shared import schema
from vdm_hub.shared.auth import parse_bearer, session_values
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.responses import JSONResponse
from vdm_hub.shared.settings import Settings

if TYPE_CHECKING:
    from vdm_hub.services.stream.hub import Hub, WorkerView

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


def _normal_origin(url: str) -> str:
    """``scheme://host[:port]`` in lower case, without a default port (browsers omit it)."""
    parts = urlsplit(url.strip().lower())
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}" + (f":{port}" if port and port != default else "")


def public_origins(settings: Settings) -> frozenset[str]:
    """The origins pages that may cancel are served from: the stream service's public URL
    (VDM_STREAM_PUBLIC_URL, when a reverse proxy serves it and the dashboard on one origin)
    and the dashboards' origins (VDM_CORS_ORIGINS).

    Never the request's ``Host``: a DNS-rebinding page sends ``Host`` and ``Origin`` both
    ``evil.example:PORT``, and a reverse proxy that rewrites ``Host`` (nginx's default
    ``proxy_set_header Host $proxy_host``) makes the dashboard's real origin look foreign.
    """
    configured = [settings.stream_public_url or "", *settings.cors_origins]
    # Exact origins only: neither '*' nor an any-host entry (scheme://*:port) lets a page act.
    return frozenset(_normal_origin(o) for o in configured if o and "*" not in o)


def origin_allowed(request: Request, settings: Settings) -> bool:
    """Origin check for requests a browser may have sent on another site's behalf (CSRF).

    With a session cookie the Origin (or Referer) must be present and allowed: browsers send
    Origin on every cross-origin POST, so its absence means a non-browser client, which has no
    business holding the cookie. Anonymous callers (no token configured) without either header
    are command-line clients and pass; with one, it must be allowed, so a page on another site
    cannot drive the actuator through a visitor's browser either.
    """
    origin = request_origin(request)
    if origin is None:
        return not session_values(request.scope)
    return origin != "null" and _normal_origin(origin) in public_origins(settings)


def holders(hub: Hub | None, request_id: str) -> list[str]:
    """The workers with a request in flight under this id, in id order (usually one)."""
    if hub is None:
        return []
    return sorted(wid for wid, view in hub.workers.items() if request_id in view.rows)


def owner_of(hub: Hub | None, request_id: str, worker_id: str | None) -> WorkerView | Response:
    """The view of the worker whose row the cancel names, or the answer saying why none is."""
    if worker_id is not None:
        view = hub.workers.get(worker_id) if hub is not None else None
        if view is not None and request_id in view.rows:
            return view
        message = (
            f"Worker {worker_id!r} has no request in flight with the id {request_id!r} "
            "(it may have finished already)."
        )
        return JSONResponse({"error": "unknown_request", "message": message}, 404)
    owners = holders(hub, request_id)
    if len(owners) == 1 and hub is not None:
        return hub.workers[owners[0]]
    if not owners:
        message = f"No request in flight has the id {request_id!r} (it may have finished already)."
        return JSONResponse({"error": "unknown_request", "message": message}, 404)
    body = {
        "error": "ambiguous_request",
        "request_id": request_id,
        "worker_ids": owners,
        "message": f"{len(owners)} workers have a request in flight with the id "
        f"{request_id!r}: {', '.join(owners)}. Nothing was cancelled.",
        "suggestion": "Name the one to cancel with the query parameter worker_id "
        "(the row's worker_id), e.g. ?worker_id=" + quote(owners[0], safe=""),
    }
    return JSONResponse(body, 409)


def not_cancellable(request_id: str, worker_id: str) -> Response:
    body = {
        "error": "not_cancellable",
        "request_id": request_id,
        "worker_id": worker_id,
        "message": f"Worker {worker_id!r} cannot stop its requests (its record says "
        "cancellable: false); nothing was cancelled.",
        "suggestion": "Stop the request at its client, or run that worker with its cancel "
        "listener on.",
    }
    return JSONResponse(body, 409)


def refusal(
    request: Request,
    request_id: str,
    worker_id: str | None,
    settings: Settings,
    by: str,
    client: str,
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
    if not bearer and not origin_allowed(request, settings):
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
            "suggestion": "Use a dashboard whose origin is in VDM_CORS_ORIGINS (or, behind a "
            "reverse proxy serving both on one origin, set VDM_STREAM_PUBLIC_URL to it), or "
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
    if worker_id is not None and not 0 < len(worker_id) <= schema.MAX_ID_CHARS:
        body = {
            "error": "bad_worker_id",
            "message": f"The query parameter worker_id is 1-{schema.MAX_ID_CHARS} "
            "characters, as shown in the row's worker_id.",
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
    async def cancel(request_id: str, request: Request, worker_id: str | None = None) -> Response:
        by = caller_of(request, auth_enabled)
        request_id = request_id[: 4 * schema.MAX_ID_CHARS]  # bounded in logs and answers
        if worker_id is not None:
            worker_id = worker_id[: 4 * schema.MAX_ID_CHARS]
        client = request.client.host if request.client else "-"
        refused = refusal(request, request_id, worker_id, settings, by, client)
        if refused is not None:
            return refused
        view = owner_of(hub, request_id, worker_id)
        if isinstance(view, Response):
            log.info(
                "cancel of request %r (worker %s) by %s from %s: %s",
                request_id,
                worker_id or "not named",
                by,
                client,
                "ambiguous" if view.status_code == 409 else "unknown",
            )
            return view
        if not view.cancellable:
            log.info(
                "cancel of request %r on worker %s by %s from %s: not cancellable",
                request_id,
                view.worker_id,
                by,
                client,
            )
            return not_cancellable(request_id, view.worker_id)
        return await deliver(redis, keys, request_id, view.worker_id, by, client)

    return router
