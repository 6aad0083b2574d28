"""The dashboard in headless Chromium against a real system: two workers in front of the demo
upstream, the stream service, the dashboard. Requests are held open through the workers with
``x-demo-delay-ms`` so the grid has something true to show."""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import DashboardPage, Holder, System, start_system
from tests.procs import Proc, vdm_hub, wait_for
from vdm_hub.services.stream.table import row_key

pytestmark = [pytest.mark.browser, pytest.mark.system]


@pytest.fixture(scope="module")
def system(module_redis: str, holder: Holder) -> Iterator[System]:
    # Depends on `holder` so the system stops first and held requests end at once.
    started = start_system(module_redis)
    try:
        yield started
    finally:
        started.stop()


def _backoff_base(attempt: int) -> float:
    return float(min(30000.0, 750 * 1.6**attempt))


@pytest.mark.timeout(60)
def test_rows_appear_when_requests_start_and_vanish_when_they_end(
    system: System, holder: Holder, new_page: Any
) -> None:
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live()
    # Held long enough that the rows are still there for the duration check below even on a
    # loaded machine (a 4 s hold could end before it under a CPU hog).
    held = [
        holder.hold(system.workers["w1"], 8000, model="gpt-4o"),
        holder.hold(system.workers["w2"], 8000, model="claude-sonnet-4-0"),
    ]
    ids = {rid for rid, _ in held}

    rows = page.wait_rows_with_models(ids, message="held requests to appear with their models")
    assert rows[held[0][0]]["worker_id"] == "w1"
    assert rows[held[1][0]]["worker_id"] == "w2"
    assert rows[held[1][0]]["model"] == "claude-sonnet-4-0"
    expect(page.page.locator("#vdm-active-count")).not_to_have_text("0")
    # The duration cell ticks in the browser between snapshots.
    key = row_key("w1", held[0][0])
    cell = page.page.locator(f'.ag-row[row-id="{key}"] [col-id="duration"]')
    first = cell.inner_text()
    expect(cell).not_to_have_text(first, timeout=5000)

    for _, done in held:
        assert done.result(timeout=20) == 200
    page.wait_rows(lambda shown: not (ids & shown), message="finished requests to vanish")
    # ...and they show up among the recently finished ones (fed by `stats` events).
    wait_for(
        lambda: ids <= set(page.row_ids("vdm-recent-grid")),
        15,
        0.1,
        "finished requests in the recent grid",
    )


@pytest.mark.timeout(60)
def test_user_sort_survives_updates(system: System, holder: Holder, new_page: Any) -> None:
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live()
    assert page.sort_state() == [("start_time", "desc")]  # newest first by default

    first = [holder.hold(system.workers["w1"], 8000, model=m) for m in ("m-charlie", "m-alpha")]
    page.wait_rows_with_models({r for r, _ in first}, message="first rows")
    grid = page.page.locator("#vdm-active-grid")
    grid.locator('.ag-header-cell[col-id="model"] .ag-header-cell-text').click()
    wait_for(lambda: page.sort_state() == [("model", "asc")], 5, 0.1, "sort by model")
    charlie = first[0][0]
    grid.locator(f'.ag-row[row-id="{row_key("w1", charlie)}"] [col-id="model"]').click()
    wait_for(lambda: page.selected_ids() == [charlie], 5, 0.1, "row selection")

    # More requests arrive (adds) and the first ones progress (updates): sort stays.
    second = [holder.hold(system.workers["w2"], 3500, model=m) for m in ("m-bravo", "m-delta")]
    all_ids = {r for r, _ in first + second}
    page.wait_rows_with_models(all_ids, message="second rows")
    ours = [r["model"] for r in page.grid_rows() if r["request_id"] in all_ids]
    assert ours == ["m-alpha", "m-bravo", "m-charlie", "m-delta"]
    models = [r["model"] for r in page.grid_rows()]
    assert models == sorted(models)
    assert page.sort_state() == [("model", "asc")]
    assert page.selected_ids() == [charlie]
    # The second pair ends (remove transactions): sort and selection are still the user's.
    for _, done in second:
        done.result(timeout=20)
    second_ids = {r for r, _ in second}
    page.wait_rows(lambda shown: not (second_ids & shown), message="second rows to end")
    assert page.sort_state() == [("model", "asc")]
    assert page.selected_ids() == [charlie]


@pytest.mark.timeout(60)
def test_stream_killed_reconnects_with_backoff_and_recovers_rows(
    system: System, holder: Holder, new_page: Any
) -> None:
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live()
    before = len(page.eventsources())

    system.kill_stream()
    expect(page.indicator).to_have_text("○ Reconnecting...", timeout=10000)
    expect(page.header_emoji).to_have_text("⚫")
    # Three failed retries, spaced by the contract's backoff.
    wait_for(lambda: len(page.eventsources()) >= before + 3, 20, 0.1, "three retries")
    created = [e["t"] for e in page.eventsources()[before - 1 :]]
    gaps = [b - a for a, b in itertools.pairwise(created[1:])]  # after attempts 1, 2
    for attempt, gap in enumerate(gaps[:2], start=1):
        # delay = base ± 25 %; the browser can only be late, never early.
        assert gap >= 0.75 * _backoff_base(attempt) - 50, (attempt, gaps)
    delays = page.debug()["delays"]
    for attempt, delay in enumerate(delays[:3]):
        base = _backoff_base(attempt)
        assert 0.75 * base - 1 <= delay <= 1.25 * base + 1, (attempt, delays)
    assert any("[vdm][sse] Connection error (will retry)" in line for line in page.console)

    # Requests that start while the stream service is down are there once it is back.
    held = [holder.hold(system.workers[w], 9000) for w in ("w1", "w2")]
    system.start_stream()
    page.wait_live(timeout=30000)
    assert page.debug()["attempt"] == 0  # reset on open
    ids = {rid for rid, _ in held}
    page.wait_rows(lambda shown: ids <= shown, message="the held rows after the restart")
    # Exactly the requests in flight, no ghosts (earlier tests' requests may still run).
    page.wait_rows(lambda shown: shown == holder.in_flight(), message="rows == in flight")


@pytest.mark.timeout(60)
def test_navigation_away_closes_and_coming_back_reopens(system: System, new_page: Any) -> None:
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live()
    opened = len(page.eventsources())

    page.page.evaluate("() => history.pushState({}, '', '/dashboard/')")
    wait_for(lambda: not page.is_connected(), 5, 0.05, "disconnect after pushState")
    assert all(e["closed"] for e in page.eventsources())
    expect(page.indicator).to_have_text("○ Reconnecting...")

    page.page.evaluate("() => history.pushState({}, '', '/dashboard/metrics')")
    page.wait_live()
    assert len(page.eventsources()) == opened + 1

    # The nav links (Dash's own pushState) and the back button (popstate) do the same.
    page.page.locator("#vdm-nav-overview").click()
    wait_for(lambda: not page.is_connected(), 5, 0.05, "disconnect after nav link")
    expect(page.page.locator("#vdm-page-overview")).to_be_visible()
    page.page.go_back()
    page.wait_live()
    expect(page.page.locator("#vdm-page-metrics")).to_be_visible()

    # The public switch: window.__vdmActiveRequestsSSE.disable() / enable().
    page.page.evaluate("() => window.__vdmActiveRequestsSSE.disable()")
    wait_for(lambda: not page.is_connected(), 5, 0.05, "disable()")
    page.page.evaluate("() => window.__vdmActiveRequestsSSE.enable()")
    page.wait_live()


@pytest.mark.timeout(60)
def test_hidden_tab_does_not_connect_until_shown(system: System, new_page: Any) -> None:
    page: DashboardPage = new_page(system.dashboard_url, hidden=True).open("/dashboard/metrics")
    # The page's first load (Dash's bundles, the grid) can take seconds on a loaded machine.
    expect(page.page.locator("#vdm-active-grid .ag-header-cell").first).to_be_visible(timeout=20000)
    # A bounded look for something that must not happen: no connection while hidden.
    with pytest.raises(TimeoutError):
        wait_for(lambda: page.eventsources(), 1.5, 0.1, "an EventSource while hidden")
    expect(page.indicator).to_have_text("○ Reconnecting...")

    page.page.evaluate("() => window.__vdmSetVisibility('visible')")
    page.wait_live()
    page.page.evaluate("() => window.__vdmSetVisibility('hidden')")
    wait_for(lambda: not page.is_connected(), 5, 0.05, "disconnect when hidden again")
    assert all(e["closed"] for e in page.eventsources())


@contextlib.contextmanager
def demo_load(system: System) -> Iterator[Proc]:
    """Real demo traffic through both workers (the load generator `vdm-hub up` runs): requests
    finish all the time, so rates, percentiles and the charts have something true to show."""
    targets = [arg for url in system.workers.values() for arg in ("--target", url)]
    load = vdm_hub(
        "load", *targets, "--rate", "3", "--concurrency", "16", "--duration", "0",
        "--hold", "0.3-3", "--stream-share", "0.5", "--seed", "7",
    )  # fmt: skip
    try:
        yield load
    finally:
        load.stop()


def _charted(page: DashboardPage, graph_id: str, points: int = 3) -> bool:
    script = """([id, n]) => { const g = document.querySelector('#' + id + ' .js-plotly-plot');
        return !!g && !!g.data && g.data.length > 0
            && g.data[0].y.filter((v) => v > 0).length >= n; }"""
    return bool(page.page.evaluate(script, [graph_id, points]))


@pytest.mark.timeout(120)
def test_overview_and_screenshots_under_load(system: System, holder: Holder, new_page: Any) -> None:
    models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-0", "claude-3-5-haiku-latest"]
    with demo_load(system):
        # Plain requests held before the first byte, and streams trickling tokens out.
        held = [
            holder.hold(system.workers[f"w{1 + i % 2}"], 9000 + 400 * i, model=models[i % 4])
            for i in range(4)
        ] + [
            holder.hold(system.workers[f"w{1 + i % 2}"], 0, models[i % 4], chunk_delay_ms=900)
            for i in range(4)
        ]
        page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/")
        expect(page.page.locator("#vdm-page-overview")).to_be_visible()
        wait_for(lambda: set(page.row_ids("vdm-workers-grid", "worker_id")) == {"w1", "w2"}, 15)
        workers = {r["worker_id"]: r for r in page.grid_rows("vdm-workers-grid")}
        assert workers["w1"]["status"] == "up"
        wait_for(
            lambda: sum(r["active"] for r in page.grid_rows("vdm-workers-grid")) >= 6,
            10,
            0.1,
            "in-flight counts on the overview",
        )
        assert not page.eventsources()  # the overview polls; only the metrics page streams
        # The overview polls: its header says so (it used to stay ⚫ forever).
        expect(page.header_emoji).to_have_text("📡", timeout=10000)
        # What the screenshot shows is what traffic does: a rate next to the percentiles.
        expect(page.page.locator("#vdm-kpi-rate")).not_to_have_text(
            re.compile(r"^(—|0\.0/s)$"), timeout=20000
        )
        wait_for(lambda: _charted(page, "vdm-ov-chart-rate"), 20, 0.2, "the rate chart")
        page.screenshot("overview.png")

        page.page.locator("#vdm-nav-metrics").click()
        page.wait_live()
        wait_for(lambda: len(page.row_ids()) >= 6, 10, 0.1, "rows under load")
        for graph in ("vdm-chart-inflight", "vdm-chart-rate", "vdm-chart-latency"):
            wait_for(lambda g=graph: _charted(page, g), 20, 0.2, f"data in {graph}")
        # Enough traffic on the charts that the screenshot shows what traffic looks like.
        wait_for(lambda: _charted(page, "vdm-chart-rate", 16), 30, 0.2, "a rate history")
        expect(page.page.locator("#vdm-m-kpi-rate")).not_to_have_text(re.compile(r"^(—|0\.0/s)$"))
        expect(page.page.locator("#vdm-m-kpi-p95")).not_to_have_text("—")
        wait_for(lambda: len(page.row_ids("vdm-recent-grid")) >= 5, 15, 0.2, "finished rows")
        # Ops screen: nothing spills past the viewport (it would scroll sideways on a wall).
        # (Charts drawn while their page was hidden re-measure once shown: allow them a moment.)
        try:
            wait_for(lambda: page.overflowing()["out"] == [], 5, 0.2, "charts to fit")
        except TimeoutError:
            assert page.overflowing()["out"] == []
        page.screenshot("metrics.png")
        # The requests still held end when the module's system stops.
        assert held


SCREENS = [(390, 844), (768, 1024), (1440, 900)]
# Page -> the nav link that shows it and its container.
PAGES = {
    "metrics": ("#vdm-nav-metrics", "vdm-page-metrics"),
    "overview": ("#vdm-nav-overview", "vdm-page-overview"),
    "finished": ("#vdm-nav-finished", "vdm-page-finished"),
}


@pytest.mark.timeout(240)
def test_every_page_fits_a_phone_a_tablet_and_a_wide_screen(
    system: System, holder: Holder, new_page: Any
) -> None:
    with demo_load(system):
        for i in range(4):
            holder.hold(system.workers["w1"], 20000, model=f"claude-3-5-haiku-latest-{i}")
        for width, height in SCREENS:
            page: DashboardPage = new_page(system.dashboard_url, width=width, height=height)
            page.open("/dashboard/metrics")
            page.wait_live(30000)
            wait_for(lambda p=page: len(p.row_ids()) >= 4, 20, 0.2, "rows")
            wait_for(lambda p=page: _charted(p, "vdm-chart-latency"), 30, 0.2, "a latency chart")
            for name, (link, container) in PAGES.items():
                page.page.locator(link).click()
                expect(page.page.locator(f"#{container}")).to_be_visible(timeout=15000)
                _fits(page, name, container, width)
                page.artifact(f"{name}-{width}.png")
            page.page.context.close()


def _fits(page: DashboardPage, name: str, container: str, width: int) -> None:
    """No horizontal page scroll, no element wider than the viewport (grids scroll their own
    columns), a header that wraps rather than spills, and legible charts."""
    try:
        wait_for(lambda: page.overflowing()["out"] == [], 5, 0.2, f"{name} to fit {width} px")
    except TimeoutError:
        report = page.overflowing()
        assert report["out"] == [], (name, width, report)
    assert page.page.evaluate("() => document.documentElement.scrollWidth") <= width, name
    header = page.page.locator(".vdm-header").bounding_box()
    assert header is not None and header["width"] <= width
    if name == "metrics":
        # The key columns are on screen at any width; the others scroll inside the grid.
        for col in ("duration", "model", "worker_id", "phase"):
            cell = page.page.locator(f'#vdm-active-grid [role=columnheader][col-id="{col}"]')
            box = cell.bounding_box()
            assert box is not None and box["x"] + box["width"] <= width + 1, (col, width, box)
        # Charts: clock times as x labels (never cut to "000"), the legend under the plot.
        ticks = page.page.locator("#vdm-chart-latency .xtick text").all_text_contents()
        assert ticks and all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in ticks), ticks
        legend = page.page.locator("#vdm-chart-latency .legend").bounding_box()
        plot = page.page.locator("#vdm-chart-latency .nsewdrag").first.bounding_box()
        assert legend is not None and plot is not None
        assert legend["y"] >= plot["y"] + plot["height"] - 1, (legend, plot)
    tiles = page.page.locator(f"#{container} .vdm-kpi").all()
    if width <= 400 and tiles:
        # A phone: tiles two to a row (they were one tile per screen), charts one.
        first, second = (t.bounding_box() for t in tiles[:2])
        assert first is not None and second is not None and first["y"] == second["y"]
