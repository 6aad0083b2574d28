"""The page skeleton: header, fleet overview, the Active Requests page and the Finished view.

A clientside callback on the URL shows one page, so moving between them costs no server round
trip and the grids keep their state. The Active Requests page is in the layout; the overview
and the Finished view are rendered the first time they are shown, from their component trees
handed to the page with it (`deferred_pages`, in dashboard/app.py's index): every AG Grid
mounted costs the page's first render ~0.1 s of main thread, so a page not shown costs
nothing until it is. Every value that changes is a placeholder here ("—", empty grids, empty
charts) filled in the browser; sizes are fixed up front so nothing jumps when data arrives.
"""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from vdm_hub.dashboard import grids

CHART_HEIGHT = 210
RECENT_BOX = "vdm-recent-box"
OVERVIEW_HREF = "/dashboard/"
METRICS_HREF = "/dashboard/metrics"
FINISHED_HREF = "/dashboard/finished"


ERRORS_HINT = "error + upstream_error over finished requests, last 60 s"
ABORTED_HINT = "requests cancelled by an operator · whose client went away, last 60 s"


def _kpi(label: str, value_id: str, hint: str = "") -> Any:
    return html.Div(
        [
            html.Div(label, className="vdm-kpi-label"),
            html.Div("—", id=value_id, className="vdm-kpi-value"),
            html.Div(hint, className="vdm-kpi-hint"),
        ],
        className="vdm-kpi",
        title=hint or None,
    )


def _card(title: Any, *children: Any, extra: Any = None, class_name: str = "") -> Any:
    head = [html.H2(title, className="vdm-card-title")]
    if extra is not None:
        head.extend(extra if isinstance(extra, list) else [extra])
    return html.Section(
        [html.Div(head, className="vdm-card-head"), *children],
        className=f"vdm-card {class_name}".strip(),
    )


def _chart(title: str, graph_id: str) -> Any:
    # An empty box of the chart's height ("waiting for data" until then, from vdm.css):
    # assets/04_vdm_charts.js draws the figure into it with plotly.js once there is data.
    return html.Div(
        [
            html.Div(title, className="vdm-chart-title"),
            html.Div(
                id=graph_id, className="vdm-chart-plot", style={"height": f"{CHART_HEIGHT}px"}
            ),
        ],
        className="vdm-chart",
    )


def header(stream_label: str) -> Any:
    return html.Header(
        [
            html.Span("⚫", id="vdm-header-emoji", className="vdm-header-emoji", title="live"),
            html.Div(
                [
                    html.Span("vdm-hub", className="vdm-brand"),
                    html.Span("fleet live metrics", className="vdm-tagline"),
                ],
                className="vdm-title",
            ),
            html.Nav(
                [
                    dcc.Link(
                        "Fleet overview",
                        href=OVERVIEW_HREF,
                        id="vdm-nav-overview",
                        className="vdm-nav-link",
                    ),
                    dcc.Link(
                        "Active requests",
                        href=METRICS_HREF,
                        id="vdm-nav-metrics",
                        className="vdm-nav-link",
                    ),
                    dcc.Link(
                        "Finished",
                        href=FINISHED_HREF,
                        id="vdm-nav-finished",
                        className="vdm-nav-link",
                    ),
                ],
                className="vdm-nav",
            ),
            html.Span(stream_label, className="vdm-stream-label", title="stream service"),
        ],
        className="vdm-header",
    )


def overview_page() -> Any:
    return html.Div(
        [
            html.Div(
                [
                    _kpi("Workers up", "vdm-kpi-workers"),
                    _kpi("Stale", "vdm-kpi-stale"),
                    _kpi("In flight", "vdm-kpi-inflight"),
                    _kpi("Requests / s", "vdm-kpi-rate"),
                    _kpi("p95 latency", "vdm-kpi-p95"),
                    _kpi("Error rate", "vdm-kpi-errors", ERRORS_HINT),
                    _kpi("Cancelled · closed", "vdm-kpi-aborted", ABORTED_HINT),
                ],
                className="vdm-kpis",
            ),
            _card(
                "Workers",
                grids.workers_grid(),
                extra=[
                    html.Span("", className="vdm-spacer"),
                    html.Span(
                        "connecting…", id="vdm-overview-status", className="vdm-overview-status"
                    ),
                ],
            ),
            html.Div(
                [
                    _chart("Fleet in flight", "vdm-ov-chart-inflight"),
                    _chart("Fleet requests per second", "vdm-ov-chart-rate"),
                ],
                className="vdm-charts vdm-charts-pair",
            ),
            html.Div(
                dcc.Link(
                    "Open Active Requests →",
                    href=METRICS_HREF,
                    className="vdm-button",
                ),
                className="vdm-actions",
            ),
        ],
        id="vdm-page-overview",
        className="vdm-page",
    )


def metrics_page() -> Any:
    indicator = html.Span(
        "○ Reconnecting...", id="vdm-sse-indicator", className="vdm-indicator vdm-reconnecting"
    )
    return html.Div(
        [
            html.Div(
                [
                    _kpi("In flight", "vdm-m-kpi-inflight"),
                    _kpi("Workers up", "vdm-m-kpi-workers"),
                    _kpi("Requests / s", "vdm-m-kpi-rate"),
                    _kpi("p95 latency", "vdm-m-kpi-p95"),
                    _kpi("TTFT p95", "vdm-m-kpi-ttft", "time to first token"),
                    _kpi("Error rate", "vdm-m-kpi-errors", ERRORS_HINT),
                    _kpi("Cancelled · closed", "vdm-m-kpi-aborted", ABORTED_HINT),
                ],
                className="vdm-kpis",
            ),
            _card(
                "Active Requests",
                html.Div("", id="vdm-sse-banner", className="vdm-banner", role="status"),
                grids.active_grid(),
                extra=[
                    html.Span("0", id="vdm-active-count", className="vdm-badge"),
                    html.Span("", className="vdm-spacer"),
                    indicator,
                ],
                class_name="vdm-card-active",
            ),
            html.Div(
                [
                    _chart("In flight", "vdm-chart-inflight"),
                    _chart("Finished per second", "vdm-chart-rate"),
                    _chart("Duration p50 / p95 / p99 · TTFT", "vdm-chart-latency"),
                    _chart("Error rate", "vdm-chart-errors"),
                ],
                className="vdm-charts",
            ),
            # Below the fold: its grid is mounted once the live grid has its rows (RECENT).
            _card(
                "Recently finished",
                html.Div(id=RECENT_BOX, style={"minHeight": f"{grids.RECENT_HEIGHT}px"}),
            ),
        ],
        id="vdm-page-metrics",
        className="vdm-page",
    )


def finished_page() -> Any:
    # The search form and the "Load more" button are built by assets/08_vdm_finished.js into
    # these placeholders (plain inputs, outside React: the page reads and writes their values,
    # and the URL, itself).
    return html.Div(
        _card(
            "Finished requests",
            html.Div(id="vdm-finished-form", className="vdm-finished-form"),
            html.Div("", id="vdm-finished-status", className="vdm-finished-status", role="status"),
            grids.finished_grid(),
            html.Div(id="vdm-finished-actions", className="vdm-actions vdm-finished-actions"),
            extra=[
                html.Span("", className="vdm-spacer"),
                html.Span(
                    "the last VDM_COMPLETED_MAXLEN finished requests, newest first",
                    className="vdm-card-note",
                ),
            ],
        ),
        id="vdm-page-finished",
        className="vdm-page",
    )


def build(stream_label: str) -> Any:
    return html.Div(
        [
            dcc.Location(id="vdm-url", refresh=False),
            # Drives the indicator's clientside callback; never reaches the server.
            dcc.Interval(id="vdm-indicator-tick", interval=500),
            header(stream_label),
            html.Main(
                [
                    html.Div(id="vdm-page-overview", className="vdm-page"),
                    metrics_page(),
                    html.Div(id="vdm-page-finished", className="vdm-page"),
                ],
                className="vdm-main",
            ),
        ],
        className="vdm-app",
    )


def deferred_pages() -> dict[str, Any]:
    """What the layout leaves empty, rendered later in the browser: the children of the pages
    not in it (on their first showing), and the Recently finished grid (``recent``, into
    RECENT_BOX, by assets/03_vdm_sse.js once the live grid holds its first snapshot)."""
    return {
        "overview": overview_page().children,
        "finished": finished_page().children,
        "recent": grids.recent_grid(),
    }
