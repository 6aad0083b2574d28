"""``vdm-hub stream [--host 127.0.0.1] [--port 8090]``: one stream service."""

from __future__ import annotations

import argparse
import dataclasses

from vdm_hub.services.stream.app import create_app
from vdm_hub.shared.fdlimit import clients_allowed, raise_open_file_limit
from vdm_hub.shared.options import listen_host, port
from vdm_hub.shared.serve import serve
from vdm_hub.shared.settings import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", type=listen_host, default="127.0.0.1", help="address to listen on [127.0.0.1]"
    )
    parser.add_argument("--port", type=port, default=8090, help="port (0: any free one) [8090]")


def run(args: argparse.Namespace, settings: Settings) -> int:
    # One descriptor per SSE client: past what the limit allows, new streams get a 503 with
    # Retry-After (and /healthz still answers) rather than connection resets.
    limit = raise_open_file_limit()
    max_clients = clients_allowed(settings.max_sse_clients, limit, "VDM_MAX_SSE_CLIENTS")
    app = create_app(dataclasses.replace(settings, max_sse_clients=max_clients))
    bc = app.state.broadcaster
    # on_exit runs first on SIGINT/SIGTERM: open streams end themselves, so Uvicorn's graceful
    # shutdown does not wait on them (sse-starlette issues 124, 128).
    return serve(
        app, args.host, args.port, "stream", on_exit=bc.close_threadsafe, exposed=_exposed(settings)
    )


def _exposed(settings: Settings) -> str | None:
    if settings.auth_token:
        return None
    what = "anyone who can reach it can read every request in flight"
    if settings.cancel_enabled:
        what += " and cancel it (VDM_CANCEL_ENABLED=true)"
    return what + "; set VDM_AUTH_TOKEN to require one"
