"""The dashboard's Flask side, in-process: routes, redirects, the config handed to the page."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from vdm_hub.dashboard.app import client_config, create_app
from vdm_hub.shared.settings import Settings


@pytest.fixture
def client() -> Any:
    app = create_app(Settings.from_env({"VDM_STREAM_PUBLIC_URL": "http://stream.example:8090"}))
    return app.server.test_client()


def _config_in(html: str) -> dict[str, Any]:
    match = re.search(r"window\.__vdmConfig = (\{.*?\});</script>", html)
    assert match, html[:2000]
    return dict(json.loads(match.group(1)))


def test_root_and_bare_prefix_redirect_to_the_dashboard(client: Any) -> None:
    for path in ("/", "/dashboard"):
        response = client.get(path)
        assert response.status_code == 302
        assert response.headers["Location"].endswith("/dashboard/")


@pytest.mark.parametrize("path", ["/dashboard/", "/dashboard/metrics", "/dashboard/finished"])
def test_pages_are_served_with_the_stream_url_from_settings(client: Any, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert _config_in(html) == {
        "streamUrl": "http://stream.example:8090",
        "streamPort": None,
        "pollIntervalMs": 2000,
        "withCredentials": False,
        "loginUrl": "",
    }
    # The config script comes before the assets that read it.
    assert html.index("window.__vdmConfig") < html.index("01_vdm_core.js")


def test_assets_load_in_dependency_order(client: Any) -> None:
    html = client.get("/dashboard/").get_data(as_text=True)
    names = [
        "01_vdm_core.js",
        "01_vdm_opcore.js",
        "01_vdm_viewcore.js",
        "02_vdm_dom.js",
        "03_vdm_sse.js",
        "04_vdm_charts.js",
        "05_vdm_overview.js",
        "06_vdm_operator.js",
        "07_vdm_live_extras.js",
        "08_vdm_finished.js",
    ]
    positions = [html.index(name) for name in names]
    assert positions == sorted(positions)
    response = client.get("/dashboard/assets/03_vdm_sse.js")
    try:
        assert response.status_code == 200
    finally:
        response.close()  # a file response: close it, or the open file warns


def test_default_stream_url_is_same_origin() -> None:
    assert client_config(Settings.from_env({}))["streamUrl"] == ""
    assert client_config(Settings.from_env({}))["streamPort"] is None
    interval = Settings.from_env({"VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "0.5"})
    assert client_config(interval)["pollIntervalMs"] == 500
    token = Settings.from_env({"VDM_AUTH_TOKEN": "x" * 32})
    assert client_config(token)["withCredentials"] is True


def test_with_a_stream_port_the_page_derives_the_stream_from_its_own_host() -> None:
    assert client_config(Settings.from_env({}), 8090) == {
        **client_config(Settings.from_env({})),
        "streamPort": 8090,
    }
    # An explicit public URL wins: the port is not passed on.
    public = Settings.from_env({"VDM_STREAM_PUBLIC_URL": "https://hub.example/stream"})
    assert client_config(public, 8090)["streamPort"] is None
    client = create_app(Settings(), 8090).server.test_client()
    layout = client.get("/dashboard/_dash-layout").get_data(as_text=True)
    assert "stream: this host, port 8090" in layout


def test_config_cannot_break_out_of_its_script_tag() -> None:
    # A URL is validated by Settings, but the page must stay safe whatever it holds.
    settings = Settings.from_env({"VDM_STREAM_PUBLIC_URL": "http://x.example/</script><b>"})
    html = create_app(settings).server.test_client().get("/dashboard/").get_data(as_text=True)
    assert "</script><b>" not in html
    assert _config_in(html)["streamUrl"] == "http://x.example/</script><b>"


def _pages_in(html: str) -> dict[str, Any]:
    match = re.search(r"window\.__vdmPages = (\{.*?\});</script>", html)
    assert match, html[:2000]
    return dict(json.loads(match.group(1)))


def test_layout_has_the_contract_elements(client: Any) -> None:
    layout = json.dumps(client.get("/dashboard/_dash-layout").get_json())
    # The overview and the Finished view come with the page, rendered when first shown.
    pages = _pages_in(client.get("/dashboard/metrics").get_data(as_text=True))
    assert set(pages) == {"overview", "finished", "recent"}
    deferred = json.dumps(pages)
    for element_id in (
        "vdm-active-grid",
        "vdm-sse-indicator",
        "vdm-header-emoji",
        "vdm-recent-box",
        "vdm-chart-inflight",
        "vdm-chart-latency",
        "vdm-page-overview",
        "vdm-page-finished",
    ):
        assert f'"{element_id}"' in layout
    for element_id in (
        "vdm-workers-grid",
        "vdm-ov-chart-rate",
        "vdm-finished-grid",
        "vdm-recent-grid",
    ):
        assert f'"{element_id}"' in deferred
        assert f'"{element_id}"' not in layout
    assert "No requests in flight" in layout
    assert "No workers registered" in deferred
    assert '"rowData"' not in deferred
    assert "params.data.key" in layout  # getRowId: the row key, not the per-worker request id
    # No data at layout time, and no rowData prop at all: the browser fills the grids with
    # transactions (with a rowData prop dash-ag-grid copies every row back after each batch).
    assert '"rowData"' not in layout


def test_active_grid_takes_batched_deltas_and_marks_stuck_rows(client: Any) -> None:
    layout = client.get("/dashboard/_dash-layout").get_json()

    def find(node: Any, element_id: str) -> dict[str, Any] | None:
        if isinstance(node, dict):
            if node.get("props", {}).get("id") == element_id:
                return dict(node["props"])
            children = [*node.values()]
        elif isinstance(node, list):
            children = node
        else:
            return None
        for child in children:
            found = find(child, element_id)
            if found is not None:
                return found
        return None

    grid = find(layout, "vdm-active-grid")
    assert grid is not None
    options = grid["dashGridOptions"]
    # Deltas arrive as async transactions; a batch re-sorts only the rows it touched.
    assert options["deltaSort"] is True and options["asyncTransactionWaitMillis"] > 0
    assert grid["rowClassRules"] == {
        "vdm-row-stuck": "vdmIsStuck(params)",
        "vdm-row-stalled": "vdmIsStalled(params)",
    }
    columns = [c.get("colId") or c.get("field") for c in grid["columnDefs"]]
    assert {"duration", "ttft_ms", "chunk_rate", "request_id", "labels"} <= set(columns)
    # The key columns first: on a phone they are what shows, the rest scrolls in the grid.
    assert columns[:4] == ["duration", "model", "worker_id", "phase"]
    # Recently finished is rendered by the page once the live grid has its rows.
    recent = find(
        _pages_in(client.get("/dashboard/metrics").get_data(as_text=True)), "vdm-recent-grid"
    )
    assert recent is not None
    assert {"ttft_ms", "tokens_per_s"} <= {
        c.get("colId") or c.get("field") for c in recent["columnDefs"]
    }
    assert find(layout, "vdm-m-kpi-ttft") is not None


def test_healthz(client: Any) -> None:
    assert client.get("/healthz").status_code == 200


def test_the_viewport_meta_tag_is_there_once(client: Any) -> None:
    # Dash writes one itself; the page template had a second.
    html = client.get("/dashboard/metrics").get_data(as_text=True)
    assert html.count('name="viewport"') == 1


def test_the_layout_has_the_three_pages_and_their_nav_links(client: Any) -> None:
    layout = client.get("/dashboard/_dash-layout").get_data(as_text=True)
    for name in ("overview", "metrics", "finished"):
        assert f"vdm-page-{name}" in layout and f"vdm-nav-{name}" in layout
    assert "vdm-m-kpi-aborted" in layout
    page = client.get("/dashboard/finished").get_data(as_text=True)
    assert "vdm-finished-grid" in json.dumps(_pages_in(page)["finished"])
