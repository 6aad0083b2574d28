"""What the dashboard says, in Chromium against a real system: numbers that are right (tokens
per second of a response that came at once, a cancel that does not move the error rate, the
badge under a filter), stalled streams and the wait for a first token, and the Finished view
finding a request that finished a minute ago among many newer ones."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import expect

from tests.browser.conftest import DashboardPage, FakeFleet, Holder, System, start_system
from tests.procs import wait_for
from vdm_hub.services.stream.table import row_key
from vdm_hub.shared import schema
from vdm_hub.shared.keys import Keys

pytestmark = [pytest.mark.browser, pytest.mark.system]

STALL_AFTER = 2.0
STALLED = re.compile(r"\bvdm-row-stalled\b")
# The row field the stall is judged by: until the wire schema carries it, the hub drops it.
HAS_LAST_OUTPUT = "last_output_at" in schema.Row.__annotations__
# Records (Date.now()) when the row with the given id is first drawn as stalled.
MARK_WATCH = """(rid) => {
  window.__vdmStalledAt = null;
  const seen = () => {
    const row = document.querySelector('#vdm-active-grid .ag-row[row-id="' + rid + '"]');
    if (!window.__vdmStalledAt && row && row.classList.contains('vdm-row-stalled')) {
      window.__vdmStalledAt = Date.now();
    }
  };
  new MutationObserver(seen).observe(document.getElementById('vdm-active-grid'),
    {subtree: true, attributes: true, attributeFilter: ['class'], childList: true});
  seen();
}"""
# A request that failed a minute ago (see `system`).
OLD_ID = f"old-{uuid.uuid4().hex[:10]}"


def _record_minute_old_failure(system: System) -> None:
    """A completed entry whose stream id (when it was recorded) is a minute old. Stream ids
    only grow, so it goes in before anything else reaches this system's fresh stream."""
    now = time.time()
    entry = schema.CompletedEntry(
        request_id=OLD_ID, worker_id="w-gone", model="gpt-4o", method="POST",
        path="/v1/chat/completions", status=502, outcome="upstream_error",
        start_time=now - 62, duration_ms=1500.0, input_tokens=12, output_tokens=None,
        bytes_out=0, ttft_ms=None,
    )  # fmt: skip
    fields = dict(zip(schema.COMPLETED_FIELDS, schema.completed_values(entry), strict=True))
    client = redis.Redis.from_url(system.redis_url)
    try:
        stream_id = f"{int((now - 60) * 1000)}-0"
        client.xadd(Keys(system.prefix).completed, fields, id=stream_id)  # type: ignore[arg-type]
    finally:
        client.close()


@pytest.fixture(scope="module")
def system(module_redis: str, holder: Holder) -> Iterator[System]:
    # Depends on `holder` so the system stops first and held requests end at once.
    started = start_system(
        module_redis, workers=("w1",), stream_extra_env={"VDM_STALL_AFTER": str(STALL_AFTER)}
    )
    try:
        _record_minute_old_failure(started)
        yield started
    finally:
        started.stop()


def _open(system: System, new_page: Any, path: str = "/dashboard/metrics") -> DashboardPage:
    page: DashboardPage = new_page(system.dashboard_url).open(path)
    if "metrics" in path:
        page.wait_live()
    return page


def _summary(system: System) -> dict[str, Any]:
    return dict(httpx.get(f"{system.stream_url}/metrics/summary", timeout=10).json())


def _fleet_once(system: System, ready: Any) -> dict[str, Any] | None:
    """The summary's fleet totals once ``ready`` holds for them, else None (to poll with)."""
    fleet_stats: dict[str, Any] = _summary(system)["fleet"]
    return fleet_stats if ready(fleet_stats) else None


def _rate(text: str) -> float:
    return float(text.split("/s")[0].replace(",", ""))


@pytest.mark.timeout(90)
def test_tokens_per_second_of_a_response_that_came_at_once_are_over_its_duration(
    system: System, holder: Holder, new_page: Any
) -> None:
    page = _open(system, new_page)
    plain, plain_done = holder.hold(system.workers["w1"], 1500)
    streamed, streamed_done = holder.hold(system.workers["w1"], 0, chunk_delay_ms=150)
    assert plain_done.result(timeout=30) == 200 and streamed_done.result(timeout=30) == 200
    wait_for(
        lambda: {plain, streamed} <= set(page.row_ids("vdm-recent-grid")),
        20,
        0.1,
        "both requests among the recently finished",
    )
    rows = {r["request_id"]: r for r in page.grid_rows("vdm-recent-grid")}

    def cell(rid: str) -> str:
        """The Tok/s cell's text, as the grid formats it (found by the row's data, whatever
        the grid's row id)."""
        script = """(rid) => { const api = window.dash_ag_grid.getApi('vdm-recent-grid');
            let node = null;
            api.forEachNode((n) => { if (n.data && n.data.request_id === rid) node = n; });
            return api.getCellValue({rowNode: node, colKey: 'tokens_per_s', useFormatter: true});
        }"""
        return str(page.page.evaluate(script, rid))

    # The body came at once (its first byte within a millisecond of its end): tokens over the
    # whole duration, marked so. Dividing by the time after the first byte gave 51,282/s.
    entry = rows[plain]
    assert entry["output_tokens"] > 0
    text = cell(plain)
    assert text.endswith("/s avg"), text
    expected = entry["output_tokens"] / (entry["duration_ms"] / 1000)
    assert _rate(text) == pytest.approx(expected, abs=0.06)
    assert _rate(text) < 100  # a few tokens over 1.5 s
    # A stream trickled out over ~2 s after its first byte: its generation speed, unmarked.
    entry = rows[streamed]
    text = cell(streamed)
    assert not text.endswith("avg"), text
    span_s = (entry["duration_ms"] - entry["ttft_ms"]) / 1000
    assert span_s > 1.0
    assert _rate(text) == pytest.approx(entry["output_tokens"] / span_s, rel=0.05)


@pytest.mark.timeout(90)
def test_a_cancelled_request_does_not_move_the_error_rate(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    worker = fleet.add_worker("nx", 7, ("m-outcomes",))
    page = _open(system, new_page)
    ids = list(worker.rows)
    fleet.end_rows("nx", *ids[:3])
    fleet.end_rows("nx", *ids[3:5], outcome="cancelled")
    fleet.end_rows("nx", ids[5], outcome="client_closed")
    errors = page.page.locator("#vdm-m-kpi-errors")
    aborted = page.page.locator("#vdm-m-kpi-aborted")
    expect(aborted).to_have_text("2 · 1", timeout=15000)
    expect(errors).to_have_text("0.0%")
    # The summary is rebuilt at most once a second: wait for it to count the aborts too.
    fleet_stats = wait_for(
        lambda: _fleet_once(system, lambda f: (f["cancelled"], f["client_closed"]) == (2, 1)),
        10,
        0.1,
        "the summary to count 2 cancelled and 1 client closed",
    )
    assert (fleet_stats["errors"], fleet_stats["error_rate"]) == (0, 0.0)

    # An upstream error does move it: the split, not a rate that ignores everything.
    fleet.end_rows("nx", ids[6], outcome="upstream_error")
    expect(errors).not_to_have_text("0.0%", timeout=15000)
    fleet_stats = wait_for(
        lambda: _fleet_once(system, lambda f: f["errors"] > 0),
        10,
        0.1,
        "the summary to count the upstream error",
    )
    assert fleet_stats["errors"] == 1
    assert fleet_stats["error_rate"] == round(1 / fleet_stats["completed"], 4)
    expect(errors).to_have_text(f"{fleet_stats['error_rate'] * 100:.1f}%")
    expect(aborted).to_have_text("2 · 1")


@pytest.mark.timeout(90)
def test_the_badge_follows_the_grids_filter(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    a, b = "m-badge-a", "m-badge-b"
    models = (a, b, b, a, b, b, a, b)
    worker = fleet.add_worker("bx", 8, models)
    page = _open(system, new_page)
    page.wait_rows(lambda shown: set(worker.rows) <= shown, message="the fleet's rows")
    wait_for(lambda: page.count_text() == str(page.grid_size()), 10, 0.1, "the plain count")

    page.floating_filter("model").fill(a)
    wait_for(lambda: len(page.row_ids()) == 3, 10, 0.1, "the filter to show 3 rows")
    wait_for(
        lambda: page.count_text() == f"3 of {page.grid_size()}", 10, 0.1, "the badge: 3 of all"
    )
    # The rows change under the filter: the badge follows them.
    first_a = next(rid for rid, m in zip(worker.rows, models, strict=True) if m == a)
    fleet.end_rows("bx", first_a)
    wait_for(
        lambda: page.count_text() == f"2 of {page.grid_size()}", 10, 0.1, "the badge: 2 of all"
    )
    page.floating_filter("model").fill("")
    wait_for(lambda: page.count_text() == str(page.grid_size()), 10, 0.1, "the plain count again")


@pytest.mark.skipif(
    not HAS_LAST_OUTPUT,
    reason="the wire schema has no row field last_output_at yet (the 'edge' branch adds it); "
    "without it the hub drops the field and no stream can be judged stalled",
)
@pytest.mark.timeout(90)
def test_a_stalled_stream_is_marked_within_the_stall_threshold_plus_a_second(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    worker = fleet.add_worker("sx", 2, ("m-stall",))
    silent, waiting = list(worker.rows)
    page = _open(system, new_page)
    page.wait_rows(lambda shown: {silent, waiting} <= shown, message="the rows")
    stream = {"is_streaming": True, "phase": "streaming", "chunks_out": 3, "bytes_out": 300}
    t0 = time.time()
    fleet.update_rows(
        "sx",
        {
            silent: {**stream, "ttft_ms": 180.0, "last_output_at": t0},
            waiting: {"is_streaming": True},  # no first token yet
        },
    )
    silent_key, waiting_key = row_key("sx", silent), row_key("sx", waiting)
    row = page.page.locator(f'#vdm-active-grid .ag-row[row-id="{silent_key}"]')
    # When the mark appears, by the browser's clock (the same host's as t0): a Python poll
    # would add its own delay to what is measured.
    page.page.evaluate(MARK_WATCH, silent_key)
    seen = wait_for(lambda: page.page.evaluate("() => window.__vdmStalledAt"), 15, 0.1, "a mark")
    assert STALL_AFTER <= seen / 1000 - t0 <= STALL_AFTER + 1.0, seen / 1000 - t0
    expect(row).to_have_class(STALLED)
    expect(page.cell(silent_key, "phase")).to_have_text("stalled")
    # Stuck is another thing (merely old): this row is seconds old.
    assert "vdm-row-stuck" not in (row.get_attribute("class") or "")
    # Before its first token a row is never stalled; it shows how long it has waited.
    waited = page.cell(waiting_key, "ttft_ms")
    expect(waited).to_have_text(re.compile(r"^wait \d"))
    first = waited.inner_text()
    expect(waited).not_to_have_text(first, timeout=5000)  # it ticks
    assert "vdm-row-stalled" not in (
        page.page.locator(f'.ag-row[row-id="{waiting_key}"]').get_attribute("class") or ""
    )

    # Filterable like any phase, and counted for Prometheus.
    filtered = _open(system, new_page, "/dashboard/metrics?phase=stalled")
    wait_for(lambda: filtered.row_ids() == [silent], 15, 0.1, "only the stalled row")
    text = httpx.get(f"{system.stream_url}/metrics", timeout=10).text
    assert 'vdm_requests_stalled{worker="sx"} 1.0' in text
    # Output again: no longer stalled.
    fleet.update_rows("sx", {silent: {"chunks_out": 4, "last_output_at": time.time()}})
    expect(page.cell(silent_key, "phase")).to_have_text("streaming", timeout=5000)


@pytest.mark.timeout(120)
def test_the_finished_view_finds_a_request_that_failed_a_minute_ago_by_an_id_prefix(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    # 55 requests finish after it: it is no longer among the 50 recently finished.
    worker = fleet.add_worker("fx", 55, ("m-later",))
    fleet.end_rows("fx", *list(worker.rows))
    live = _open(system, new_page)
    wait_for(lambda: len(live.row_ids("vdm-recent-grid")) == 50, 20, 0.2, "50 recent rows")
    assert OLD_ID not in live.row_ids("vdm-recent-grid")

    page = _open(system, new_page, "/dashboard/finished")
    expect(page.page.locator("#vdm-page-finished")).to_be_visible()
    field = page.page.locator("#vdm-finished-field-request")
    field.fill(OLD_ID[:9])
    field.press("Enter")
    wait_for(lambda: page.row_ids("vdm-finished-grid") == [OLD_ID], 15, 0.1, "only the old request")
    assert f"request={OLD_ID[:9]}" in page.url  # the search is in the URL, like the grid's view
    expect(page.page.locator("#vdm-finished-status")).to_have_text(re.compile(r"^1 request"))
    expect(page.header_emoji).to_have_text("📡")

    # Its row opens the same detail panel as a live row.
    page.page.locator('#vdm-finished-grid .ag-center-cols-container [col-id="outcome"]').click()
    expect(page.detail).to_be_visible()
    assert page.detail_value("Request ID") == OLD_ID
    assert page.detail_value("Outcome") == "upstream_error"
    assert page.detail_value("Status") == "502"
    assert page.detail_value("Duration") == "1.5 s"
    state = page.page.locator("#vdm-detail-state")
    expect(state).to_have_text("Finished: upstream_error, HTTP 502.")
    expect(page.page.locator("#vdm-detail-cancel")).to_be_hidden()

    # The link shows the same search; filters combine (the API's worker and outcome).
    again = _open(system, new_page, "/dashboard/finished?worker=w-gone&outcome=upstream_error")
    # (A first page load on a busy machine takes a while: the grid must be there to fill.)
    wait_for(lambda: again.row_ids("vdm-finished-grid") == [OLD_ID], 30, 0.1, "the same row")
    expect(again.page.locator("#vdm-finished-field-outcome")).to_have_value("upstream_error")
    none = _open(system, new_page, f"/dashboard/finished?request={OLD_ID}&outcome=ok")
    expect(none.page.locator("#vdm-finished-status")).to_have_text(
        "No finished request matches.", timeout=30000
    )


@pytest.mark.skipif(
    "labels" not in schema.Row.__annotations__,
    reason="the wire schema has no row field labels yet (the 'embed' branch adds it); without "
    "it the hub drops the field",
)
@pytest.mark.timeout(120)
def test_labels_show_as_chips_filter_like_a_column_and_fill_the_detail_panel(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    worker = fleet.add_worker("lx", 3, ("m-labels",))
    ada, web, bare = list(worker.rows)
    fleet.update_rows(
        "lx",
        {ada: {"labels": {"user": "ada", "team": "ml"}}, web: {"labels": {"team": "web"}}},
    )
    page = _open(system, new_page)
    page.wait_rows(lambda shown: {ada, web, bare} <= shown, message="the labelled rows")
    chips = page.page.locator(f'#vdm-active-grid .ag-row[row-id="{row_key("lx", ada)}"] .vdm-chip')
    expect(chips).to_have_text(["team=ml", "user=ada"], timeout=10000)
    # Filtered like any column, from the URL too.
    filtered = _open(system, new_page, "/dashboard/metrics?labels=team%3Dml")
    wait_for(lambda: filtered.row_ids() == [ada], 15, 0.1, "only the team=ml row")
    # The detail panel lists them.
    page.cell(row_key("lx", ada), "model").click()
    expect(page.detail).to_be_visible()
    assert page.detail_value("team") == "ml" and page.detail_value("user") == "ada"
    # ...and a finished request's entry carries them too (written as a worker's end writes it).
    entry = schema.CompletedEntry(
        request_id=f"{ada}-done", worker_id="lx", model="m-labels", method="POST", path="/v1/x",
        status=200, outcome="ok", start_time=time.time() - 2, duration_ms=2000.0,
        input_tokens=1, output_tokens=2, bytes_out=3,
    )  # fmt: skip
    entry["labels"] = {"user": "ada", "team": "ml"}  # type: ignore[typeddict-unknown-key]
    fields = dict(zip(schema.COMPLETED_FIELDS, schema.completed_values(entry), strict=True))
    client = redis.Redis.from_url(system.redis_url)
    try:
        client.xadd(Keys(system.prefix).completed, fields)  # type: ignore[arg-type]
    finally:
        client.close()
    done = _open(system, new_page, f"/dashboard/finished?request={ada}-done")
    finished_chips = done.page.locator("#vdm-finished-grid .vdm-chip")
    expect(finished_chips).to_have_text(["team=ml", "user=ada"], timeout=30000)
