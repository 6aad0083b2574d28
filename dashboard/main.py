"""``vdm-hub dashboard [--host 127.0.0.1] [--port 8050]``: the Dash app under Uvicorn.

Dash is a WSGI (Flask) app; a2wsgi's WSGIMiddleware adapts it so the dashboard runs under the
same ``shared.serve.serve`` as every other service (same ready line, same signal handling).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from vdm_hub.shared.options import listen_host, port, whole
from vdm_hub.shared.serve import serve
from vdm_hub.shared.settings import Settings

log = logging.getLogger("vdm.dashboard")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", type=listen_host, default="127.0.0.1", help="interface to bind [127.0.0.1]"
    )
    parser.add_argument("--port", type=port, default=8050, help="port, 0 for any free one [8050]")
    parser.add_argument(
        "--stream-port",
        type=whole(1, 65535),
        default=None,
        help="when VDM_STREAM_PUBLIC_URL is unset, the page connects to the stream service on "
        "this port of the host it was loaded from (as a remote browser names it) [unset: the "
        "same origin as the dashboard]",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from a2wsgi import WSGIMiddleware

    from vdm_hub.dashboard.app import create_app, stream_label

    app = create_app(settings, args.stream_port)
    log.info(
        "dashboard pages: /dashboard/ and /dashboard/metrics; %s",
        stream_label(settings, args.stream_port),
    )
    asgi: Any = WSGIMiddleware(app.server)
    if settings.auth_token:
        from vdm_hub.shared.auth import protect_dashboard

        # Login/logout pages in front; every other route needs the session cookie.
        asgi = protect_dashboard(asgi, settings.auth_token)
    exposed = (
        None
        if settings.auth_token
        else "anyone who can reach it can watch the fleet; set VDM_AUTH_TOKEN to require one"
    )
    return serve(asgi, args.host, args.port, "dashboard", exposed=exposed)
