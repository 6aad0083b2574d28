"""Redis frozen under a live page: the page leaves `● Live` for `◐ Stale — …`, dims the rows and
stops their durations; when Redis answers again it is `● Live` and ticking again.

Before, the stream kept flowing (the stream service itself was fine) and the page showed
`● Live` over rows whose durations ticked past anything real. This module has its own Redis:
freezing the session's would stall every other test."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import DashboardPage, Holder, System, start_system
from vdm_hub.services.stream.table import row_key
from vdm_hub.shared.embedded_redis import EmbeddedRedis

pytestmark = [pytest.mark.browser, pytest.mark.system]

STALE = re.compile(r"^◐ Stale — Redis (not answering|unreachable) since \d\d:\d\d:\d\d$")


@pytest.fixture(scope="module")
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def system(own_redis: EmbeddedRedis, holder: Holder) -> Iterator[System]:
    started = start_system(own_redis.url, workers=("w1",))
    try:
        yield started
    finally:
        own_redis.resume()  # whatever happened, never leave a stopped process behind
        started.stop()


def _dimmed(page: DashboardPage, key: str) -> float:
    script = """(id) => { const row = document.querySelector(
        '#vdm-active-grid .ag-row[row-id="' + id + '"]');
        return row ? Number(getComputedStyle(row).opacity) : -1; }"""
    return float(page.page.evaluate(script, key))


def _steady_text(cell: Any, seconds: float) -> str:
    """The cell's text, checked to stay the same for ``seconds`` (polled, not slept)."""
    first = cell.inner_text()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert cell.inner_text() == first, "a stale row's duration kept ticking"
        time.sleep(0.1)
    return str(first)


@pytest.mark.timeout(90)
def test_a_frozen_redis_turns_the_page_stale_and_back_to_live(
    system: System, own_redis: EmbeddedRedis, holder: Holder, new_page: Any
) -> None:
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    page.wait_live()
    rid, done = holder.hold(system.workers["w1"], 20000)
    page.wait_rows(lambda shown: rid in shown, message="the held request's row")
    key = row_key("w1", rid)  # the grid's row id
    cell = page.cell(key, "duration")
    assert _dimmed(page, key) == 1.0

    own_redis.pause()  # SIGSTOP: the stream service is fine, its Redis answers nothing
    try:
        expect(page.indicator).to_have_text(STALE, timeout=15000)
        expect(page.indicator).to_have_class(re.compile("vdm-stale"))
        expect(page.header_emoji).not_to_have_text("📡")
        assert page.is_connected(), "the stream itself is up: stale is not reconnecting"
        expect(page.page.locator("body")).to_have_attribute("data-vdm-sync", "stale")
        assert 0 < _dimmed(page, key) < 1.0
        held = _steady_text(cell, 2.5)  # durations stop at the last confirmed moment
        assert page.debug()["sync"]["stale"] is True
    finally:
        own_redis.resume()

    page.wait_live(timeout=20000)
    expect(page.page.locator("body")).not_to_have_attribute("data-vdm-sync", "stale")
    expect(cell).not_to_have_text(held, timeout=5000)  # ticking again
    assert _dimmed(page, key) == 1.0
    assert rid in page.row_ids(), "the live worker's row survived the freeze"
    assert done.result(timeout=40) == 200
