"""The cancel action on the Active Requests page, against a stream service that offers it
(``VDM_CANCEL_ENABLED=true``) and a fake worker that honours cancel requests on its channel the
way the reference worker does (its row ends with outcome ``cancelled``), and one real worker
for the whole path (TTFT and chunk rate of a real stream, then cancelling it). Also the stuck
mark following the service's ``VDM_STUCK_AFTER`` as ``GET /metrics/capabilities`` reports it."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import DashboardPage, FakeFleet, Holder, System, start_system
from tests.procs import wait_for
from vdm_hub.services.stream.table import row_key

pytestmark = [
    pytest.mark.browser,
    pytest.mark.system,
    pytest.mark.skipif(
        importlib.util.find_spec("vdm_hub.services.stream.cancel") is None,
        reason="needs the stream service's cancel endpoint and /metrics/capabilities",
    ),
]

STUCK = re.compile(r"\bvdm-row-stuck\b")
# A measured time to first token ("640 ms", "1.2 s" on a loaded machine), not the wait before it.
TTFT_SHOWN = re.compile(r"^\d+(\.\d)? (ms|s)$")


@pytest.fixture(scope="module")
def system(module_redis: str, holder: Holder) -> Iterator[System]:
    # Depends on `holder` so the system stops first and held requests end at once.
    started = start_system(
        module_redis,
        workers=("w1",),
        stream_extra_env={"VDM_CANCEL_ENABLED": "true", "VDM_STUCK_AFTER": "4"},
    )
    try:
        yield started
    finally:
        started.stop()


def _open(system: System, new_page: Any) -> DashboardPage:
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live()
    page.page.wait_for_function("() => window.__vdmCaps.cancelEnabled === true", timeout=15000)
    return page


@pytest.mark.timeout(90)
def test_cancel_asks_first_then_the_row_goes_and_a_notice_says_so(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    worker = fleet.add_worker("cx-1", 3, ("m-cancel",))
    fleet.listen_cancel("cx-1")
    rid, keep, _ = list(worker.rows)
    page = _open(system, new_page)
    page.wait_rows(lambda shown: set(worker.rows) <= shown, message="the worker's rows")
    page.cell(row_key("cx-1", rid), "model").click()
    cancel = page.page.locator("#vdm-detail-cancel")
    expect(cancel).to_be_visible()

    # Dismissing the confirmation sends nothing.
    asked: list[str] = []

    def dismiss(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.page.once("dialog", dismiss)
    cancel.click()
    wait_for(lambda: asked, 5, 0.05, "the confirmation")
    assert rid in asked[0] and "cx-1" in asked[0]
    with pytest.raises(TimeoutError):  # a bounded look for a POST that must not happen
        wait_for(lambda: fleet.cancels, 1.5, 0.1, "a cancel message after a dismissal")

    page.page.once("dialog", lambda dialog: dialog.accept())
    cancel.click()
    notice = page.page.locator("#vdm-notice")
    expect(notice).to_contain_text(f"Cancel requested for {rid} on cx-1", timeout=10000)
    assert notice.get_attribute("data-kind") == "ok"
    page.wait_rows(lambda shown: rid not in shown, message="the cancelled row to go")
    assert keep in set(page.row_ids())  # only that one
    assert fleet.cancels == [{"request_id": rid, "by": "anonymous"}]
    expect(page.page.locator("#vdm-detail-state")).to_have_text(
        "This request is no longer in flight.", timeout=10000
    )
    wait_for(
        lambda: any(
            r["request_id"] == rid and r["outcome"] == "cancelled"
            for r in page.grid_rows("vdm-recent-grid")
        ),
        15,
        0.2,
        "the cancelled request among the finished ones",
    )


@pytest.mark.timeout(60)
def test_a_row_becomes_stuck_after_the_services_threshold(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    worker = fleet.add_worker("cx-2", 1, ("m-slow",))
    (rid,) = worker.rows
    page = _open(system, new_page)
    assert page.page.evaluate("() => window.__vdmCaps.stuckAfterS") == 4
    page.wait_rows(lambda shown: rid in shown, message="the row")
    key = row_key("cx-2", rid)
    row = page.page.locator(f'.ag-row[row-id="{key}"]')
    # Unchanged rows are redrawn with the mark once they cross the threshold (4 s here).
    expect(row).to_have_class(STUCK, timeout=15000)
    expect(page.cell(key, "duration")).to_have_text(re.compile(r"^\d+\.\d s$"))


@pytest.mark.timeout(90)
@pytest.mark.skipif(
    importlib.util.find_spec("vdm_hub.services.proxy.cancel") is None,
    reason="needs the worker's side of cancel and its ttft_ms/chunks_out fields",
)
def test_a_real_stream_shows_ttft_and_chunk_rate_and_cancelling_it_ends_it(
    system: System, holder: Holder, new_page: Any
) -> None:
    page = _open(system, new_page)
    rid, done = holder.hold(system.workers["w1"], 200, "gpt-4o", chunk_delay_ms=400)
    page.wait_rows_with_models({rid}, message="the stream's row")
    key = row_key("w1", rid)
    expect(page.cell(key, "phase")).to_have_text("streaming", timeout=10000)
    expect(page.cell(key, "ttft_ms")).to_have_text(TTFT_SHOWN, timeout=10000)
    expect(page.cell(key, "chunk_rate")).to_have_text(re.compile(r"^\d+(\.\d)?/s$"), timeout=10000)

    page.cell(key, "model").click()
    expect(page.detail).to_be_visible()
    assert page.detail_value("Time to first token") != "—"
    page.page.once("dialog", lambda dialog: dialog.accept())
    page.page.locator("#vdm-detail-cancel").click()
    expect(page.page.locator("#vdm-notice")).to_contain_text(
        f"Cancel requested for {rid} on w1", timeout=10000
    )
    page.wait_rows(lambda shown: rid not in shown, message="the cancelled stream's row to go")
    # The client saw its stream cut, not a clean finish (well before its 16 chunks' 6 s).
    with pytest.raises(Exception):  # noqa: B017 - whatever httpx raises for a cut body
        done.result(timeout=10)
    wait_for(
        lambda: any(
            r["request_id"] == rid and r["outcome"] == "cancelled"
            for r in page.grid_rows("vdm-recent-grid")
        ),
        15,
        0.2,
        "the cancelled stream among the finished ones",
    )


@pytest.mark.timeout(90)
def test_one_request_id_on_two_workers_shows_two_rows_and_cancel_takes_the_clicked_one(
    system: System, fleet: FakeFleet, new_page: Any
) -> None:
    # A client's retry that landed on another worker: one X-Request-Id, two requests (issue 20).
    rid = fleet.new_id("retry")
    for wid in ("dx-1", "dx-2"):
        fleet.add_worker(wid, 0)
        fleet.listen_cancel(wid)
        fleet.start_rows(wid, rid, model="m-dup")
    fixed = fleet.add_worker("dx-3", 1, ("m-fixed",), cancellable=False)
    page = _open(system, new_page)

    def shown() -> list[tuple[str, str]]:
        return sorted(
            (r["worker_id"], r["key"]) for r in page.grid_rows() if r["request_id"] == rid
        )

    keys = [row_key("dx-1", rid), row_key("dx-2", rid)]
    both = [("dx-1", keys[0]), ("dx-2", keys[1])]
    wait_for(lambda: shown() == both, 15, 0.1, "both rows")

    page.cell(keys[1], "model").click()  # the second worker's row
    expect(page.detail).to_be_visible()
    assert page.detail_value("Request ID") == rid and page.detail_value("Worker") == "dx-2"
    posts: list[str] = []
    page.page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.page.once("dialog", lambda dialog: dialog.accept())
    page.page.locator("#vdm-detail-cancel").click()
    expect(page.page.locator("#vdm-notice")).to_contain_text(
        f"Cancel requested for {rid} on dx-2", timeout=10000
    )
    wait_for(lambda: shown() == [("dx-1", keys[0])], 15, 0.1, "only the clicked row to go")
    assert fleet.cancelled == [("dx-2", rid)]  # the other worker was never asked
    assert [u.split("/metrics/", 1)[1] for u in posts] == [
        f"active-requests/{rid}/cancel?worker_id=dx-2"
    ]

    # A worker that cannot stop its requests: its rows offer no Cancel.
    (held,) = fixed.rows
    page.wait_rows(lambda ids: held in ids, message="the row of the worker without cancel")
    page.cell(row_key("dx-3", held), "model").click()
    expect(page.detail).to_be_visible()
    wait_for(lambda: page.detail_value("Worker") == "dx-3", 10, 0.1, "the panel on dx-3's row")
    expect(page.page.locator("#vdm-detail-cancel")).to_be_hidden()
