"""The dashboard in headless Chromium under load: main-thread long tasks per window.

A ``PerformanceObserver`` for ``longtask`` entries (tasks over 50 ms, the browser's own
definition) is installed before the page's scripts run. :func:`long_tasks` waits for the
grid to show the rows, resets the counters and reads them back ``seconds`` later: their
total (ms of the window the page could not respond), the longest, and how many, with the
grid's displayed row count. :class:`Browser` measures a whole navigation (:class:`PageLoad`):
the first paint, from navigation to the grid complete (every row in the grid, the rows in
view drawn with their model); then a few seconds in which the page settles (what it puts
off until the grid is complete runs then: below-the-fold grids, the first chart draws), its
long tasks reported on their own; then a churn window, the steady state.
Playwright drives Debian's Chromium (``VDM_CHROMIUM`` [/usr/bin/chromium]); without either
the result says why instead of failing the run.
"""

from __future__ import annotations

import contextlib
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


# First paint: every long task with its start (ms since navigation), and, polled every 20 ms
# from the page's own clock, when the grid first showed rows with their model and when it
# was complete: holding at least `want` rows (every row in flight, up to the few a churn
# moves between two frames) with the rows in view drawn with their model. Installed before
# the page's scripts, so it sees the whole load; it reads the grid through dash-ag-grid's
# API only, so it measures any commit of the dashboard alike.
PAINT_OBSERVE = """
((want) => {
  const p = window.__vdmPaint = { tasks: [], firstRows: null, complete: null };
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) p.tasks.push([e.startTime, e.duration]);
  }).observe({ type: "longtask", buffered: true });
  const shownWithModels = () => {
    const cells = document.querySelectorAll(
      '#vdm-active-grid .ag-center-cols-container .ag-row [col-id="model"]');
    return cells.length >= 5 && Array.from(cells).every((c) => c.textContent.trim() !== "");
  };
  const poll = () => {
    let api = null;
    try { api = window.dash_ag_grid && window.dash_ag_grid.getApi("vdm-active-grid"); }
    catch (e) { /* not mounted yet */ }
    if (api && p.firstRows === null && shownWithModels()) p.firstRows = performance.now();
    if (api && p.firstRows !== null) {
      let held = 0;
      api.forEachNode(() => { held += 1; });
      if (held >= want && shownWithModels()) { p.complete = performance.now(); return; }
    }
    setTimeout(poll, 20);
  };
  setTimeout(poll, 20);
})
"""


@dataclass
class PageLoad:
    """One navigation: the first paint (navigation -> grid complete) and then a churn window."""

    complete_ms: float = 0.0  # navigation -> every row in the grid, the rows in view drawn
    first_rows_ms: float = 0.0  # navigation -> the first rows in view, with their model
    load_max_ms: float = 0.0  # longest task before complete
    load_count: int = 0  # tasks over 50 ms before complete
    load_total_ms: float = 0.0
    settle_max_ms: float = 0.0  # longest task between complete and the churn window
    settle_count: int = 0
    churn_s: float = 0.0
    churn_max_ms: float = 0.0
    churn_count: int = 0
    churn_total_ms: float = 0.0
    grid_rows: int = -1  # rows the grid holds at the end of the churn window
    error: str = ""


class Browser:
    """One headless Chromium for a scenario, pinned to ``cpus`` (it and every process it
    starts: the affinity of the thread that launches Playwright is inherited); a fresh
    context (no cache, no storage) per navigation. Use from one thread."""

    def __init__(self, cpus: list[int] | None = None) -> None:
        self.error = ""
        self._playwright: Any = None
        self._browser: Any = None
        if not os.path.exists(CHROMIUM):
            self.error = f"no Chromium at {CHROMIUM} (set VDM_CHROMIUM)"
            return
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as exc:
            self.error = f"playwright not installed: {exc}"
            return
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {c for c in cpus if c < (os.cpu_count() or 1)})
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)

    def close(self) -> None:
        if self._browser is not None:
            self._browser.close()
        if self._playwright is not None:
            self._playwright.stop()

    def load(
        self, url: str, *, want_rows: int, settle_s: float, churn_s: float, timeout: float = 60
    ) -> PageLoad:
        """Open ``url`` in a fresh context; wait (bounded) for the grid to be complete, then
        ``settle_s`` and ``churn_s`` seconds more."""
        if self.error:
            return PageLoad(error=self.error)
        from playwright.sync_api import Error

        context = self._browser.new_context(viewport={"width": 1400, "height": 900})
        try:
            page = context.new_page()
            page.add_init_script(f"{PAINT_OBSERVE}({int(want_rows)});")
            page.goto(url, timeout=timeout * 1000, wait_until="commit")
            try:
                page.wait_for_function(
                    "() => window.__vdmPaint && window.__vdmPaint.complete !== null",
                    timeout=timeout * 1000,
                    polling=100,
                )
            except Error:
                shown = page.evaluate(GRID_ROWS)
                return PageLoad(error=f"the grid showed {shown} of {want_rows} rows")
            marks: dict[str, Any] = page.evaluate("() => window.__vdmPaint")
            complete = float(marks["complete"])
            page.wait_for_timeout(settle_s * 1000)
            t0 = float(page.evaluate("() => performance.now()"))
            page.wait_for_timeout(churn_s * 1000)
            after: list[Any] = page.evaluate(
                "() => [window.__vdmPaint, performance.now(),"
                " (() => { let n = 0; window.dash_ag_grid.getApi('vdm-active-grid')"
                ".forEachNode(() => { n += 1; }); return n; })()]"
            )
            tasks = [(float(s), float(d)) for s, d in after[0]["tasks"]]
            loading = [d for s, d in tasks if s < complete]
            settling = [d for s, d in tasks if complete <= s < t0]
            churning = [d for s, d in tasks if s >= t0]
            return PageLoad(
                complete_ms=complete,
                first_rows_ms=float(marks["firstRows"]),
                load_max_ms=max(loading, default=0.0),
                load_count=len(loading),
                load_total_ms=sum(loading),
                settle_max_ms=max(settling, default=0.0),
                settle_count=len(settling),
                churn_s=(float(after[1]) - t0) / 1000,
                churn_max_ms=max(churning, default=0.0),
                churn_count=len(churning),
                churn_total_ms=sum(churning),
                grid_rows=int(after[2]),
            )
        except Error as exc:
            return PageLoad(error=f"browser: {str(exc).splitlines()[0][:200]}")
        finally:
            context.close()
