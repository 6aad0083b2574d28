"""The dashboard's four AG Grids: column definitions and the shared dark theme.

Grids start empty (no data at import or layout time, no ``rowData`` prop at all); the browser
client fills them with transactions keyed by ``getRowId``. Value getters and formatters are
named functions from ``window.dashAgGridFunctions`` (``dashboard/assets/02_vdm_dom.js``).
"""

from __future__ import annotations

from typing import Any

import dash_ag_grid as dag

# AG Grid 33+ Theming API (dash-ag-grid passes `theme` through dashGridOptions). Palette
# matches assets/vdm.css; large type because this is read from across a room.
THEME = {
    "function": (
        "themeQuartz.withParams({"
        "backgroundColor: '#0f141b', foregroundColor: '#d6dee8', "
        "headerBackgroundColor: '#161d26', headerTextColor: '#9fb0c2', "
        "borderColor: '#232d3a', rowHoverColor: '#1a2430', "
        "selectedRowBackgroundColor: '#1f3a5c', accentColor: '#58a6ff', "
        "oddRowBackgroundColor: '#111820', chromeBackgroundColor: '#161d26', "
        "fontSize: 15, headerFontSize: 13, rowHeight: 38, headerHeight: 40, "
        "browserColorScheme: 'dark', wrapperBorderRadius: 6, spacing: 6})"
    )
}


def _fn(expr: str) -> dict[str, str]:
    return {"function": expr}


def _options(empty_text: str, **extra: Any) -> dict[str, Any]:
    return {
        "theme": THEME,
        "animateRows": False,  # rows sliding around on every update is noise on a wall screen
        "localeText": {"noRowsToShow": empty_text},
        "suppressCellFocus": True,
        "rowSelection": {"mode": "singleRow", "checkboxes": False, "enableClickSelection": True},
        # No `rowData` prop (see _grid): without this AG Grid would say "Loading..." until the
        # first transaction; an empty grid is an answer, not a wait.
        "loading": False,
        **extra,
    }


# Labels an app attached to the request (user, team, key_alias, deployment...): shown as k=v
# chips, filtered as the text "k=v k=v" (?labels=team=ml).
LABELS_COLUMN: dict[str, Any] = {
    "colId": "labels",
    "headerName": "Labels",
    "valueGetter": _fn("vdmLabels(params)"),
    "cellRenderer": "VdmLabelChips",
    "filter": "agTextColumnFilter",
    "minWidth": 130,
    "flex": 1,
}

# The key columns come first (duration, model, worker, phase): on a narrow screen they are what
# shows, and the rest scrolls inside the grid (assets/07_vdm_live_extras.js fits their widths).
ACTIVE_COLUMNS: list[dict[str, Any]] = [
    {
        "colId": "duration",
        "headerName": "Duration",
        "valueGetter": _fn("vdmLiveDuration(params)"),
        "valueFormatter": _fn("vdmDuration(params.value)"),
        "type": "rightAligned",
        "filter": "agNumberColumnFilter",
        "cellClass": "vdm-mono vdm-strong",
        "width": 110,
    },
    # Small minimum widths: a phone gives the four key columns ~340 px between them.
    {"field": "model", "headerName": "Model", "minWidth": 90, "flex": 2},
    {"field": "worker_id", "headerName": "Worker", "minWidth": 70, "flex": 1},
    {
        # "stalled" for a stream silent longer than VDM_STALL_AFTER after its first token
        # (01_vdm_viewcore.js): filterable like the other phases (?phase=stalled).
        "colId": "phase",
        "headerName": "Phase",
        "valueGetter": _fn("vdmPhase(params)"),
        "headerTooltip": "upstream: waiting for the first byte; streaming: sending; "
        "stalled: a stream silent for longer than VDM_STALL_AFTER",
        "width": 105,
        "cellClassRules": {
            "vdm-phase-streaming": "params.value === 'streaming'",
            "vdm-phase-upstream": "params.value === 'upstream'",
            "vdm-phase-stalled": "params.value === 'stalled'",
        },
    },
    {
        "field": "ttft_ms",
        "headerName": "TTFT",
        "headerTooltip": "Time to first token (first byte for a response that is not a "
        "stream); until then, how long the request has waited for it",
        "type": "rightAligned",
        "width": 124,
        "valueFormatter": _fn("vdmTtftText(params)"),
        "filter": "agNumberColumnFilter",
        "cellClass": "vdm-mono",
        "cellClassRules": {"vdm-waiting": "params.value == null"},
    },
    {
        "field": "is_streaming",
        "headerName": "Stream",
        "width": 82,
        "cellDataType": False,  # text, not AG Grid's checkbox renderer for booleans
        "valueFormatter": _fn("params.value ? 'yes' : 'no'"),
        "cellClassRules": {"vdm-phase-streaming": "params.value === true"},
    },
    {
        # Live, from the chunk counts seen over the last seconds (01_vdm_opcore.js chunkRate).
        "colId": "chunk_rate",
        "headerName": "Chunks/s",
        "headerTooltip": "SSE chunks forwarded per second over the last few seconds",
        "valueGetter": _fn("vdmChunkRate(params)"),
        "valueFormatter": _fn("vdmRate(params.value)"),
        "type": "rightAligned",
        "width": 96,
        "filter": False,
        "cellClass": "vdm-mono",
    },
    {"field": "method", "headerName": "Method", "width": 84},
    {"field": "path", "headerName": "Path", "minWidth": 130, "flex": 2, "cellClass": "vdm-mono"},
    {
        "field": "bytes_out",
        "headerName": "Bytes",
        "type": "rightAligned",
        "width": 90,
        "valueFormatter": _fn("vdmBytes(params.value)"),
        "filter": "agNumberColumnFilter",
    },
    {
        "field": "input_tokens",
        "headerName": "Tok in",
        "type": "rightAligned",
        "width": 82,
        "valueFormatter": _fn("vdmCount(params.value)"),
    },
    {
        "field": "output_tokens",
        "headerName": "Tok out",
        "type": "rightAligned",
        "width": 88,
        "valueFormatter": _fn("vdmCount(params.value)"),
    },
    {**LABELS_COLUMN, "hide": True},  # shown once a row carries labels (07_vdm_live_extras.js)
    {
        "field": "start_time",
        "headerName": "Started",
        "width": 100,
        "sort": "desc",  # newest first by default; any column the user picks replaces it
        "valueFormatter": _fn("vdmClock(params.value)"),
        "cellClass": "vdm-mono",
    },
    {
        "field": "request_id",
        "headerName": "Request ID",
        "minWidth": 120,
        "flex": 1,
        "cellClass": "vdm-mono vdm-dim",
    },
]

WORKER_COLUMNS: list[dict[str, Any]] = [
    {"field": "worker_id", "headerName": "Worker", "minWidth": 130, "flex": 1, "sort": "asc"},
    {"field": "host", "headerName": "Host", "minWidth": 120, "flex": 1},
    {"field": "pid", "headerName": "PID", "width": 90, "type": "rightAligned"},
    {
        "field": "status",
        "headerName": "Status",
        "width": 105,
        "cellClassRules": {
            "vdm-status-up": "params.value === 'up'",
            "vdm-status-stale": "params.value === 'stale'",
        },
    },
    {
        "colId": "age",
        "headerName": "Heartbeat",
        "valueGetter": _fn("vdmAge(params)"),
        "valueFormatter": _fn("vdmAgeText(params.value) + ' ago'"),
        "type": "rightAligned",
        "width": 130,
    },
    {"field": "active", "headerName": "In flight", "type": "rightAligned", "width": 110},
    {
        "field": "requests_per_s",
        "headerName": "Req/s",
        "type": "rightAligned",
        "width": 100,
        "valueFormatter": _fn("vdmRate(params.value)"),
    },
    {
        "field": "p95_ms",
        "headerName": "p95",
        "type": "rightAligned",
        "width": 100,
        "valueFormatter": _fn("vdmMs(params.value)"),
    },
    {
        "field": "error_rate",
        "headerName": "Errors",
        "type": "rightAligned",
        "width": 100,
        "valueFormatter": _fn("vdmPercent(params.value)"),
    },
    {
        "field": "started_at",
        "headerName": "Started",
        "width": 110,
        "valueFormatter": _fn("vdmClock(params.value)"),
    },
]

# Several columns repeat ACTIVE_COLUMNS' fields with other widths (this grid has fewer
# columns) and without the live grid's tooltips: declared per grid, as AG Grid column
# definitions usually are, rather than built by a helper taking a width for every field.
RECENT_COLUMNS: list[dict[str, Any]] = [
    {
        "field": "start_time",
        "headerName": "Started",
        "width": 110,
        "sort": "desc",
        "valueFormatter": _fn("vdmClock(params.value)"),
        "cellClass": "vdm-mono",
    },
    {
        "field": "status",
        "headerName": "Status",
        "width": 95,
        "type": "rightAligned",
        "cellClassRules": {
            "vdm-status-up": "params.value >= 200 && params.value < 400",
            "vdm-status-stale": "params.value >= 400 || params.value === 0",
        },
    },
    {
        "field": "outcome",
        "headerName": "Outcome",
        "width": 140,
        "cellClassRules": {"vdm-status-stale": "params.value !== 'ok'"},
    },
    {
        "field": "duration_ms",
        "headerName": "Duration",
        "type": "rightAligned",
        "width": 115,
        "valueFormatter": _fn("vdmDuration(params.value)"),
        "filter": "agNumberColumnFilter",
    },
    {
        "field": "ttft_ms",
        "headerName": "TTFT",
        "type": "rightAligned",
        "width": 100,
        "valueFormatter": _fn("vdmMs(params.value)"),
        "filter": "agNumberColumnFilter",
    },
    {"field": "model", "headerName": "Model", "minWidth": 150, "flex": 2},
    {"field": "worker_id", "headerName": "Worker", "minWidth": 100, "flex": 1},
    {"field": "method", "headerName": "Method", "width": 95},
    {"field": "path", "headerName": "Path", "minWidth": 150, "flex": 2, "cellClass": "vdm-mono"},
    {
        "field": "output_tokens",
        "headerName": "Tok out",
        "type": "rightAligned",
        "width": 100,
        "valueFormatter": _fn("vdmCount(params.value)"),
    },
    {
        "colId": "tokens_per_s",
        "headerName": "Tok/s",
        "headerTooltip": "Output tokens per second. A stream: from the first token to the end "
        "(its generation speed). Marked avg: a response that came at once, tokens over its "
        "whole duration",
        "valueGetter": _fn("vdmTokensPerS(params)"),
        "valueFormatter": _fn("vdmTokensPerSText(params)"),
        "type": "rightAligned",
        "width": 110,
        "filter": False,
    },
    {**LABELS_COLUMN, "hide": True},
    {
        "field": "request_id",
        "headerName": "Request ID",
        "minWidth": 150,
        "flex": 1,
        "cellClass": "vdm-mono vdm-dim",
    },
]

# Filters live in a row under the headers (floating filters) rather than behind an icon on
# every header, which is clutter at wall-screen distance.
_DEFAULT_COL = {
    "sortable": True,
    "filter": True,
    "floatingFilter": True,
    "suppressHeaderFilterButton": True,
    "suppressHeaderMenuButton": True,
    "resizable": True,
}
_DEFAULT_COL_NO_FILTER = {**_DEFAULT_COL, "filter": False, "floatingFilter": False}


def _grid(
    grid_id: str,
    columns: list[dict[str, Any]],
    key: str,
    empty: str,
    height: int,
    *,
    filters: bool = True,
    options: dict[str, Any] | None = None,
    **props: Any,
) -> Any:
    # No `rowData` prop at all, not even []: with one, dash-ag-grid copies every row back into
    # Dash props (`rowData` and `virtualRowData`) after each transaction batch and then diffs
    # the grid against that copy — twice O(rows) work every 50 ms, which at 10,000 rows was
    # most of the page's main-thread time. Rows only ever arrive as transactions from the
    # browser client, and nothing on the Python side reads them back.
    return dag.AgGrid(
        id=grid_id,
        columnDefs=columns,
        defaultColDef=_DEFAULT_COL if filters else _DEFAULT_COL_NO_FILTER,
        getRowId=f"params.data.{key}",
        dashGridOptions=_options(empty, **(options or {})),
        # Fixed height: rows arriving never push the charts below around.
        style={"height": f"{height}px", "width": "100%"},
        className="vdm-grid",
        **props,
    )


# The live grid takes deltas as async transactions (AG Grid batches them, one sort and
# redraw per batch); with `deltaSort` a batch re-sorts only the rows it touched instead of
# all 10,000. Rows running longer than the stream service's stuck threshold are marked.
ACTIVE_OPTIONS: dict[str, Any] = {
    "deltaSort": True,
    "asyncTransactionWaitMillis": 50,
    "tooltipShowDelay": 300,
}
ACTIVE_ROW_CLASS_RULES = {
    "vdm-row-stuck": "vdmIsStuck(params)",
    "vdm-row-stalled": "vdmIsStalled(params)",
}


def active_grid() -> Any:
    return _grid(
        "vdm-active-grid",
        ACTIVE_COLUMNS,
        "key",  # the stream's name of a row: request ids are unique per worker only
        "No requests in flight",
        480,
        options=ACTIVE_OPTIONS,
        rowClassRules=ACTIVE_ROW_CLASS_RULES,
    )


def workers_grid() -> Any:
    return _grid(
        "vdm-workers-grid", WORKER_COLUMNS, "worker_id", "No workers registered", 240, filters=False
    )


RECENT_HEIGHT = 330


def recent_grid() -> Any:
    # `key` is added by the page (VdmCore.recentRows): worker, request id and start time.
    return _grid(
        "vdm-recent-grid", RECENT_COLUMNS, "key", "No finished requests yet", RECENT_HEIGHT
    )


def finished_grid() -> Any:
    # Rows are completed entries, keyed by their stream entry id (unique, unlike request ids
    # across workers). The search is the server's (the form above the grid), so no floating
    # filters here that would only filter the page already fetched.
    return _grid(
        "vdm-finished-grid",
        RECENT_COLUMNS,
        "id",
        "Search the finished requests: an id prefix, a worker, a model, an outcome, a time",
        560,
        filters=False,
    )
