"""``vdm-hub worker --upstream URL``: one instrumented worker proxy."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from vdm_hub.services.proxy.app import create_app
from vdm_hub.shared.options import http_base_url, listen_host, number, port
from vdm_hub.shared.serve import serve
from vdm_hub.shared.settings import ConfigError, Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--upstream",
        type=http_base_url,
        default=None,
        help="base URL of the upstream, e.g. http://127.0.0.1:8001 (default: VDM_UPSTREAM_URL)",
    )
    parser.add_argument(
        "--host", type=listen_host, default="127.0.0.1", help="bind address [127.0.0.1]"
    )
    parser.add_argument("--port", type=port, default=8080, help="port, 0 for a free one [8080]")
    parser.add_argument(
        "--graceful-timeout",
        type=number(0),
        default=10.0,
        help="on SIGTERM, seconds to let in-flight requests finish [10]",
    )


KEEP_ALIVE_S = 75  # seconds an idle client connection stays open (nginx's default)


def run(args: argparse.Namespace, settings: Settings) -> int:
    upstream = settings.upstream_url
    if args.upstream:
        upstream = args.upstream
    if not upstream:
        raise ConfigError("VDM_UPSTREAM_URL: not set and no --upstream given")
    settings = dataclasses.replace(settings, upstream_url=upstream)
    # httpx logs every upstream request at INFO; a busy worker would flood its log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(settings, upstream=upstream)
    return serve(
        app,
        args.host,
        args.port,
        "worker",
        graceful_timeout=args.graceful_timeout,
        # Longer than the idle timeout of the load balancers in front of workers (AWS ALB: 60 s):
        # with Uvicorn's 5 s, a balancer can reuse a connection the worker is just closing,
        # and its client gets a 502 for a request the worker never saw.
        timeout_keep_alive=KEEP_ALIVE_S,
        # A worker takes no token: it is a proxy, and its /_vdm/ endpoints are open.
        exposed="anyone who can reach it can send requests through it to its upstream "
        "(keep workers on an internal network; docs/security.md)",
    )
