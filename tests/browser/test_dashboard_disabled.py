"""A stream service with LOG_REQUEST_METRICS=false answers with a `disabled` event: the page
says so, stops streaming, and polls the JSON snapshot endpoint instead."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import DashboardPage, System, start_system
from tests.procs import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.system]


@pytest.fixture(scope="module")
def system(module_redis: str) -> Iterator[System]:
    started = start_system(
        module_redis, workers=(), stream_extra_env={"LOG_REQUEST_METRICS": "false"}
    )
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.timeout(60)
def test_disabled_event_shows_the_reason_and_falls_back_to_polling(
    system: System, new_page: Any
) -> None:
    page: DashboardPage = new_page(system.dashboard_url).open("/dashboard/metrics")
    banner = page.page.locator("#vdm-sse-banner")
    expect(banner).to_be_visible(timeout=15000)
    expect(banner).to_contain_text("LOG_REQUEST_METRICS")
    expect(page.indicator).to_contain_text("disabled")
    assert any(
        "[vdm][sse] Metrics disabled, falling back to polling" in line for line in page.console
    )
    # No further streaming attempts; the JSON endpoint is polled instead, repeatedly.
    snapshot_url = f"{system.stream_url}/metrics/active-requests"
    wait_for(lambda: page.requests.count(snapshot_url) >= 2, 10, 0.1, "two polls of the snapshot")
    assert len(page.eventsources()) == 1
    assert page.eventsources()[0]["closed"]
    assert not page.is_connected()
