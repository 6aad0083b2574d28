"""``vdm-hub up --host 0.0.0.0`` seen from another machine (issue 21, "remote viewing").

Chromium resolves ``remote.test`` to 127.0.0.1 (``--host-resolver-rules``), so the page is
loaded under a name that is not loopback, as a browser elsewhere on the network would load it:
it must find the stream service on that host (not on the ``127.0.0.1`` the server side knows),
pass CORS, reach ``● Live`` and show the demo traffic's rows. The same run checks the safe
defaults of a hub open to the network without a token: cancel off, one start-up line per
service saying so, and the embedded Redis on loopback only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.browser.conftest import CHROMIUM_ARGS, TRACK_EVENTSOURCE, DashboardPage
from tests.browser.conftest import _chromium_or_skip as chromium_or_skip
from tests.uprun import Up

pytestmark = [pytest.mark.browser, pytest.mark.system]

REMOTE = "remote.test"


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.fixture
def remote_browser() -> Any:
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    rules = f"--host-resolver-rules=MAP {REMOTE} 127.0.0.1"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=[*CHROMIUM_ARGS, rules]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.timeout(180)
def test_a_browser_on_another_machine_sees_live_rows_and_the_defaults_are_safe(
    up_factory: list[Up], tmp_path: Path, key_prefix: str, remote_browser: Any
) -> None:
    up = Up(tmp_path, key_prefix, "--host", "0.0.0.0", "--ports", "auto", "--workers", "2")
    up_factory.append(up)
    dashboard = up.url("dashboard", timeout=90)
    stream = up.url("prometheus").removesuffix("/metrics")
    redis = up.url("redis")

    context = remote_browser.new_context(viewport={"width": 1600, "height": 1200})
    try:
        context.add_init_script(TRACK_EVENTSOURCE)
        base = f"http://{REMOTE}:{urlsplit(dashboard).port}"
        page = DashboardPage(context.new_page(), base).open()
        page.wait_live(timeout=30000)
        page.wait_rows(lambda ids: len(ids) > 0, timeout=30, message="demo rows on the page")
        stream_port = urlsplit(stream).port
        sources = {urlsplit(e["url"])[1] for e in page.eventsources()}
        assert sources == {f"{REMOTE}:{stream_port}"}, sources
        assert not [line for line in page.console if "CORS" in line]
    finally:
        context.close()

    # Open to the network without a token: cancel is off, and every part says it is open.
    capabilities = httpx.get(f"{stream}/metrics/capabilities", timeout=5).json()
    assert capabilities["cancel_enabled"] is False
    out = up.proc.output
    assert "cancel: off, as the hub is open to the network without VDM_AUTH_TOKEN" in out
    for part in ("stream", "dashboard", "worker", "demo-upstream"):
        assert f"{part} is open to the network on http://0.0.0.0:" in out, part
    # The embedded Redis stays on loopback whatever --host says.
    redis_port = urlsplit(redis).port or 0
    assert urlsplit(redis).hostname == "127.0.0.1"
    assert listening_addresses(redis_port) == {"0100007F"}  # 127.0.0.1, and nothing else
