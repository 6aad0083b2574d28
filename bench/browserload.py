"""The dashboard in headless Chromium under load: main-thread long tasks per window.

A ``PerformanceObserver`` for ``longtask`` entries (tasks over 50 ms, the browser's own
definition) is installed before the page's scripts run; once the grid shows the rows, the
counters are reset and ``seconds`` later read back: their total (ms of the window the page
could not respond), the longest, and how many, with the grid's displayed row count.
Playwright drives Debian's Chromium (``VDM_CHROMIUM`` [/usr/bin/chromium]); without either
the result says why instead of failing the run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

CHROMIUM = os.environ.get("VDM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
OBSERVE = """
(() => {
  window.__vdmLong = { total: 0, max: 0, count: 0 };
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      const s = window.__vdmLong;
      s.total += e.duration; s.count += 1; s.max = Math.max(s.max, e.duration);
    }
  }).observe({ type: "longtask", buffered: true });
})();
"""
GRID_ROWS = """() => {
  try { return window.dash_ag_grid.getApi("vdm-active-grid").getDisplayedRowCount(); }
  catch (e) { return -1; }
}"""


@dataclass
class LongTasks:
    seconds: float = 0.0
    total_ms: float = 0.0
    max_ms: float = 0.0
    count: int = 0
    grid_rows: int = -1
    error: str = ""


def long_tasks(url: str, *, want_rows: int, seconds: float, timeout: float = 60) -> LongTasks:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:
        return LongTasks(error=f"playwright not installed: {exc}")
    if not os.path.exists(CHROMIUM):
        return LongTasks(error=f"no Chromium at {CHROMIUM} (set VDM_CHROMIUM)")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.add_init_script(OBSERVE)
                page.goto(url, timeout=timeout * 1000)
                deadline = time.monotonic() + timeout
                shown = -1
                while time.monotonic() < deadline:
                    shown = int(page.evaluate(GRID_ROWS))
                    if shown >= want_rows * 0.95:
                        break
                    page.wait_for_timeout(250)
                else:
                    return LongTasks(error=f"the grid showed {shown} of {want_rows} rows")
                page.evaluate("() => { window.__vdmLong = { total: 0, max: 0, count: 0 }; }")
                t0 = time.monotonic()
                page.wait_for_timeout(seconds * 1000)
                stats: dict[str, Any] = page.evaluate("() => window.__vdmLong")
                return LongTasks(
                    seconds=time.monotonic() - t0,
                    total_ms=float(stats["total"]),
                    max_ms=float(stats["max"]),
                    count=int(stats["count"]),
                    grid_rows=int(page.evaluate(GRID_ROWS)),
                )
            finally:
                browser.close()
    except Error as exc:
        return LongTasks(error=f"browser: {str(exc).splitlines()[0][:200]}")
