"""The dashboard's Dash app: ``create_app(settings) -> Dash``, served under ``/dashboard/``.

Pages: ``/dashboard/`` (fleet overview), ``/dashboard/metrics`` (Active Requests) and
``/dashboard/finished`` (search the finished requests); ``/`` redirects to ``/dashboard/``.
The page learns the stream service's base URL from the server (``VDM_STREAM_PUBLIC_URL``;
else, with ``--stream-port``, that port on the host the page came from; else the same origin)
through ``window.__vdmConfig``, rendered into the HTML before any asset runs; the browser
client appends the endpoint paths. Live data never passes through this process or a Python
callback: the browser talks to the stream service. Dash writes the viewport meta tag itself
(the template had a second one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dash import ClientsideFunction, Dash, Input, Output
from flask import Flask, Response, redirect
from plotly.utils import PlotlyJSONEncoder

from vdm_hub.dashboard import layout
from vdm_hub.shared.settings import Settings

PREFIX = "/dashboard/"
ASSETS = Path(__file__).resolve().parent / "assets"

_INDEX = """<!DOCTYPE html>
<html lang="en">
  <head>
    {%metas%}
    <meta name="color-scheme" content="dark">
    <title>{%title%}</title>
    {%favicon%}
    {%css%}
    <script id="vdm-config">window.__vdmConfig = __CONFIG__;</script>
    <script id="vdm-pages">window.__vdmPages = __PAGES__;</script>
  </head>
  <body>
    {%app_entry%}
    <footer>
      {%config%}
      {%scripts%}
      {%renderer%}
    </footer>
  </body>
</html>
"""

# Shows the page the URL names, rendering it the first time (see dashboard/layout.py).
_ROUTE_JS = """
function (pathname) {
    const page = window.VdmViewCore.pageOf(pathname);
    const deferred = window.__vdmPages || {};
    const render = (name) => {
        if (page !== name || !(name in deferred)) return window.dash_clientside.no_update;
        const children = deferred[name];
        delete deferred[name];  // rendered once; it stays while hidden
        return children;
    };
    const on = "vdm-nav-link vdm-nav-active", off = "vdm-nav-link";
    // Charts drawn while their page was hidden have no width to fit: re-measure once shown.
    window.setTimeout(function () {
        if (window.VdmCharts) window.VdmCharts.fitAll();
    }, 50);
    const show = (name) => ({display: page === name ? "block" : "none"});
    return [
        show("overview"),
        show("metrics"),
        show("finished"),
        page === "overview" ? on : off,
        page === "metrics" ? on : off,
        page === "finished" ? on : off,
        render("overview"),
        render("finished"),
    ];
}
"""


def client_config(settings: Settings, stream_port: int | None = None) -> dict[str, Any]:
    """What the browser client needs from the server, nothing secret."""
    return {
        "streamUrl": settings.stream_public_url or "",  # "" = same origin, unless streamPort
        # Without VDM_STREAM_PUBLIC_URL and with --stream-port, the page connects to that port
        # of the host it was loaded from (03_vdm_sse.js): what the browser calls this machine
        # is known only in the browser (a remote viewer of `vdm-hub up --host 0.0.0.0`).
        "streamPort": None if settings.stream_public_url else stream_port,
        "pollIntervalMs": round(settings.sse_interval * 1000),
        # With VDM_AUTH_TOKEN the stream service takes a session cookie (an EventSource cannot
        # send headers); cross-origin, the browser sends it only on credentialed requests.
        # Never with '*' CORS (Settings refuses '*' with a token; browsers refuse it too).
        "withCredentials": settings.auth_token is not None,
        # With a token, a stream error may mean the session ran out: the client probes and
        # sends the browser here (shared/auth.py's login page) instead of retrying forever.
        "loginUrl": "/dashboard/login" if settings.auth_token else "",
    }


def _script_json(value: object) -> str:
    # Safe inside <script>: no "</script>" or HTML comment can be formed by the data. Dash
    # components encode as the layout endpoint encodes them (plotly's encoder).
    text = json.dumps(value, separators=(",", ":"), cls=PlotlyJSONEncoder)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _add_routes(server: Flask) -> None:
    def root() -> Any:
        return redirect(PREFIX, code=302)

    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    server.add_url_rule("/", "vdm_root", root)
    server.add_url_rule("/dashboard", "vdm_dashboard_slash", root)
    server.add_url_rule("/healthz", "vdm_healthz", healthz)


def stream_label(settings: Settings, stream_port: int | None = None) -> str:
    if settings.stream_public_url:
        return f"stream: {settings.stream_public_url}"
    return f"stream: this host, port {stream_port}" if stream_port else "stream: same origin"


def create_app(settings: Settings, stream_port: int | None = None) -> Dash:
    app = Dash(
        __name__,
        requests_pathname_prefix=PREFIX,
        routes_pathname_prefix=PREFIX,
        assets_folder=str(ASSETS),
        title="vdm-hub · live fleet metrics",
        update_title="",  # no "Updating..." flicker in the tab title
        serve_locally=True,  # works offline and behind strict egress
        # Served, but not loaded with the page: 04_vdm_charts.js loads plotly.js when it can.
        assets_path_ignore=["^vendor$"],
    )
    config = client_config(settings, stream_port)
    app.index_string = _INDEX.replace("__CONFIG__", _script_json(config)).replace(
        "__PAGES__", _script_json(layout.deferred_pages())
    )
    app.layout = layout.build(stream_label(settings, stream_port))

    app.clientside_callback(  # type: ignore[no-untyped-call]
        _ROUTE_JS,
        Output("vdm-page-overview", "style"),
        Output("vdm-page-metrics", "style"),
        Output("vdm-page-finished", "style"),
        Output("vdm-nav-overview", "className"),
        Output("vdm-nav-metrics", "className"),
        Output("vdm-nav-finished", "className"),
        Output("vdm-page-overview", "children"),
        Output("vdm-page-finished", "children"),
        Input("vdm-url", "pathname"),
    )
    # `● Live` / `○ Reconnecting...` and the header emoji, kept in sync with the client.
    app.clientside_callback(  # type: ignore[no-untyped-call]
        ClientsideFunction(namespace="vdm", function_name="syncIndicator"),
        Output("vdm-sse-indicator", "children"),
        Output("vdm-sse-indicator", "className"),
        Output("vdm-header-emoji", "children"),
        Input("vdm-indicator-tick", "n_intervals"),
    )
    _add_routes(app.server)
    return app
