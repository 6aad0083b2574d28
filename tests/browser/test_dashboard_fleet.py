"""The Active Requests page against a big fake fleet: thousands of rows written straight into
Redis through the protocol's own scripts (``FakeFleet``), with churn, so the grid's behaviour
at scale can be checked without thousands of HTTP requests. Also the operator's view of a
row: the detail panel, stuck rows, the view in the URL, no cancel unless the service offers it.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import DashboardPage, FakeFleet, System, start_system
from tests.procs import wait_for
from vdm_hub.services.stream.table import row_key

pytestmark = [pytest.mark.browser, pytest.mark.system]

_tags = itertools.count(1)
STUCK = re.compile(r"\bvdm-row-stuck\b")


@pytest.fixture(scope="module")
def system(module_redis: str) -> Iterator[System]:
    started = start_system(module_redis, workers=())  # the fleet below is all the workers
    try:
        yield started
    finally:
        started.stop()


def _tag() -> str:
    return f"t{next(_tags)}"


@pytest.mark.timeout(180)
def test_5000_rows_with_churn_keep_the_users_sort_filter_and_scroll(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    models = ("m-alpha", "m-bravo", "x-bravo")
    tag = _tag()
    fleet.add_worker(f"{tag}-a", 2500, models)
    fleet.add_worker(f"{tag}-b", 2500, models)
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live(30000)
    wait_for(lambda: page.count_text() == "5000", 60, 0.2, "the header count at 5000")
    # The count is the client's rows; the grid takes the snapshot in slices after it.
    wait_for(lambda: page.grid_size() == 5000, 60, 0.2, "the grid to hold 5000 rows")

    # The user sorts by model and filters to the two "bravo" models, then scrolls down.
    page.header("model").click()
    wait_for(lambda: page.sort_state() == [("model", "asc")], 10, 0.1, "sort by model")
    page.floating_filter("model").fill("bravo")
    wanted_filter = {"model": {"filterType": "text", "type": "contains", "filter": "bravo"}}
    wait_for(lambda: page.filter_model() == wanted_filter, 10, 0.1, "the model filter")
    page.scroll_top(3000)
    first_shown = set(page.row_ids())

    fleet.churn(200, models)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        shown = page.grid_rows()
        shown_models = [r["model"] for r in shown]
        assert all("bravo" in m for m in shown_models), set(shown_models)
        assert shown_models == sorted(shown_models)
        assert page.sort_state() == [("model", "asc")]
        assert page.filter_model() == wanted_filter
        time.sleep(0.5)
    # Rows came and went under the user's view (the churn reached the grid)...
    assert set(page.row_ids()) != first_shown
    assert page.scroll_top() == 3000  # ...and it did not scroll them away
    # Durations tick in the browser.
    rid = page.page.evaluate(
        "() => document.querySelector('#vdm-active-grid .ag-center-cols-container .ag-row')"
        ".getAttribute('row-id')"
    )
    first = page.cell(rid, "duration").inner_text()
    expect(page.cell(rid, "duration")).not_to_have_text(first, timeout=10000)

    fleet.stop_churn()
    truth = fleet.row_ids()
    assert len(truth) == 5000
    wait_for(lambda: set(page.row_ids_all()) == truth, 30, 0.3, "the grid to equal the truth")
    # The filter is still on: the badge counts what it shows, of all the rows.
    wait_for(lambda: page.count_text() == f"{len(page.row_ids())} of 5000", 10, 0.2, "the badge")
    expect(page.page.locator("#vdm-m-kpi-inflight")).to_have_text("5,000")
    debug = page.debug()
    assert debug["gaps"] == 0
    # The churn came as deltas on one stream, not as a snapshot per change.
    assert debug["deltas"] > 0 and debug["snapshots"] <= 2, debug


# The rows in view, each with its model drawn in its cell.
VISIBLE_MODELS = """() => Array.from(document.querySelectorAll(
    '#vdm-active-grid .ag-center-cols-container .ag-row [col-id="model"]'))
    .map((c) => c.textContent.trim())"""


@pytest.mark.timeout(180)
def test_a_10000_row_first_load_under_churn_ends_with_every_row_in_the_grid(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    """The first snapshot goes into the grid in slices (a main-thread task each, so the page
    never freezes on load); rows that come and go while the slices run must not be lost or
    left behind. How long it takes is the bench's business (`python -m bench --scenario
    browser`), not this test's."""
    models = ("m-alpha", "m-bravo")
    tag = _tag()
    for part in ("a", "b", "c", "d"):
        fleet.add_worker(f"{tag}-{part}", 2500, models)
    fleet.churn(200, models)  # the load runs under churn: deltas arrive between slices
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live(30000)
    wait_for(lambda: page.debug()["gridLoads"] >= 1, 60, 0.2, "the first snapshot in the grid")
    debug = page.debug()
    assert debug["gridSlices"] > 1, debug  # in slices, not one transaction of 10,000 rows
    assert debug["snapshots"] == 1 and debug["gaps"] == 0, debug
    shown = page.page.evaluate(VISIBLE_MODELS)
    assert len(shown) >= 5 and all(m in models for m in shown), shown

    fleet.stop_churn()
    truth = fleet.row_ids()
    assert len(truth) == 10_000
    wait_for(lambda: set(page.row_ids_all()) == truth, 30, 0.3, "the grid to equal the truth")
    assert page.grid_size() == 10_000  # nothing held twice
    wait_for(lambda: page.count_text() == "10000", 10, 0.2, "the badge at 10000")


@pytest.mark.timeout(90)
def test_a_tab_shown_again_resumes_with_a_delta_and_a_gap_resyncs_from_a_snapshot(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    tag = _tag()
    worker = fleet.add_worker(f"{tag}-w", 20, ("m-resume",))
    page: DashboardPage = new_page(system.dashboard_url, hidden=True).open("/dashboard/metrics")
    page.page.evaluate("() => window.__vdmSetVisibility('visible')")
    page.wait_live()
    page.wait_rows(lambda shown: set(worker.rows) <= shown, message="the first rows")
    assert page.debug()["snapshots"] == 1

    # Hidden: the stream closes. Requests start and end meanwhile.
    page.page.evaluate("() => window.__vdmSetVisibility('hidden')")
    wait_for(lambda: not page.is_connected(), 5, 0.05, "disconnect when hidden")
    gone = list(worker.rows)[:5]
    fleet.end_rows(f"{tag}-w", *gone)
    new = [fleet.new_id(tag) for _ in range(3)]
    fleet.start_rows(f"{tag}-w", *new, model="m-resume")

    # Shown again: the new stream resumes from the version held, so the changes come as one
    # delta instead of a second full snapshot.
    page.page.evaluate("() => window.__vdmSetVisibility('visible')")
    page.wait_live()
    truth = fleet.row_ids()
    wait_for(lambda: set(page.row_ids()) == truth, 15, 0.1, "the rows after the resume")
    assert "last_event_id=" in page.eventsources()[-1]["url"]
    assert page.debug()["snapshots"] == 1

    # A delta that does not follow on from the held version (the service never sends one):
    # the client drops its base, reconnects without it and takes a fresh snapshot.
    opened = len(page.eventsources())
    page.page.evaluate(
        """() => { const es = window.__esLog[window.__esLog.length - 1].es;
        es.dispatchEvent(new MessageEvent('delta', {data: JSON.stringify(
            {base: 1, version: 2, upsert: [], remove: [], timestamp: Date.now() / 1000})})); }"""
    )
    wait_for(lambda: len(page.eventsources()) > opened, 10, 0.1, "a reconnect after the gap")
    page.wait_live()
    wait_for(lambda: page.debug()["snapshots"] == 2, 10, 0.1, "a fresh snapshot")
    assert "last_event_id=" not in page.eventsources()[-1]["url"]
    assert any("Delta out of sequence" in line for line in page.console)
    assert page.debug()["gaps"] == 1
    wait_for(lambda: set(page.row_ids()) == fleet.row_ids(), 15, 0.1, "rows == truth")


@pytest.mark.timeout(60)
def test_row_click_opens_a_detail_panel_that_follows_the_row(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    tag = _tag()
    worker = fleet.add_worker(f"{tag}-w", 3, ("m-detail",))
    rid = next(iter(worker.rows))
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live()
    page.wait_rows(lambda shown: rid in shown, message="the fleet's rows")
    expect(page.detail).to_be_hidden()

    page.cell(row_key(f"{tag}-w", rid), "model").click()
    expect(page.detail).to_be_visible()
    assert page.detail_value("Request ID") == rid
    assert page.detail_value("Model") == "m-detail"
    assert page.detail_value("Method") == "POST"
    assert page.detail_value("Path") == "/v1/chat/completions"
    assert page.detail_value("Worker") == f"{tag}-w"
    assert page.detail_value("Host") == "fakehost"
    assert page.detail_value("PID") == "4242"
    running = page.detail_value("Running for")
    wait_for(lambda: page.detail_value("Running for") != running, 10, 0.2, "a live duration")
    # No cancel action unless the stream service says it is enabled (it is not here).
    expect(page.page.locator("#vdm-detail-cancel")).to_be_hidden()

    # The request ends: the panel keeps its fields and says so.
    fleet.end_rows(f"{tag}-w", rid)
    expect(page.page.locator("#vdm-detail-state")).to_have_text(
        "This request is no longer in flight.", timeout=10000
    )
    assert page.detail_value("Request ID") == rid
    page.page.keyboard.press("Escape")
    expect(page.detail).to_be_hidden()


@pytest.mark.timeout(60)
def test_rows_older_than_the_stuck_threshold_are_marked(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    tag = _tag()
    old = fleet.add_worker(f"{tag}-old", 2, ("m-stuck",), age=400)  # default threshold: 300 s
    fresh = fleet.add_worker(f"{tag}-new", 1, ("m-fresh",))
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live()
    ids = set(old.rows) | set(fresh.rows)
    page.wait_rows(lambda shown: ids <= shown, message="old and fresh rows")
    for rid in old.rows:
        # AG Grid adds its own classes; ours must be among them.
        key = row_key(f"{tag}-old", rid)
        expect(page.page.locator(f'.ag-row[row-id="{key}"]')).to_have_class(STUCK)
    (fresh_id,) = fresh.rows
    assert "vdm-row-stuck" not in (
        page.page.locator(f'.ag-row[row-id="{row_key(f"{tag}-new", fresh_id)}"]').get_attribute(
            "class"
        )
        or ""
    )


@pytest.mark.timeout(90)
def test_filters_and_sort_round_trip_through_the_url_without_reconnecting(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    tag = _tag()
    fleet.add_worker(f"{tag}-a", 6, (f"{tag}-model-x", f"{tag}-model-y"))
    fleet.add_worker(f"{tag}-b", 4, (f"{tag}-model-x",))
    xs = 3 + 4
    page: DashboardPage = new_page(system.dashboard_url)
    page.open(f"/dashboard/metrics?model={tag}-model-x&sort=worker")
    page.wait_live()

    def only_x() -> bool:
        rows = page.grid_rows()
        return len(rows) == xs and all(r["model"] == f"{tag}-model-x" for r in rows)

    wait_for(only_x, 15, 0.2, "only model x, from the URL's filter")
    expect(page.floating_filter("model")).to_have_value(f"{tag}-model-x")
    assert page.sort_state() == [("worker_id", "asc")]
    workers = [r["worker_id"] for r in page.grid_rows()]
    assert workers == sorted(workers)

    # Changing the view rewrites the URL in place; the stream is not reopened.
    opened = len(page.eventsources())
    page.header("model").click()
    wait_for(lambda: "sort=model" in page.url, 10, 0.1, "the sort in the URL")
    page.floating_filter("worker_id").fill(f"{tag}-b")
    wait_for(lambda: f"worker={tag}-b" in page.url, 10, 0.1, "the worker filter in the URL")
    assert f"model={tag}-model-x" in page.url
    assert len(page.eventsources()) == opened
    assert page.is_connected()

    # The link shows the same view in a fresh page.
    again: DashboardPage = new_page(system.dashboard_url)
    again.open(page.url.removeprefix(system.dashboard_url))
    again.wait_live()

    def same_view() -> bool:
        rows = again.grid_rows()
        return len(rows) == 4 and {r["worker_id"] for r in rows} == {f"{tag}-b"}

    wait_for(same_view, 15, 0.2, "only worker b's model-x rows")
    assert again.sort_state() == [("model", "asc")]
