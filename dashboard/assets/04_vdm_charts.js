/*
 * vdm-hub dashboard: the Grafana-style charts (metrics page, fed by `stats` events; the
 * overview's pair, fed by its polls). Figures are built by VdmCore.statsFigures (pure, tested
 * in Node) and drawn here with Plotly's own API (`Plotly.newPlot`, then `Plotly.react`) into
 * the chart boxes of the layout. Each figure keeps a fixed height and `uirevision`, so data
 * arriving never moves the page or resets a zoom.
 *
 * Why not dcc.Graph: it mounts and plots every chart of every page (hidden ones included) in
 * the page's first React commit, one task of 0.4-0.7 s on this project's test machine, and
 * without a global `Plotly` it loads the full 4.8 MB plotly.js bundle (a 2 s script
 * evaluation there). Here the charts use the basic partial bundle (scatter, bar, pie:
 * `vendor/plotly-basic.min.js`, a quarter of the size), loaded (async: it never blocks the
 * page's parsing) when there is a figure to draw and no grid loading, and draw
 * - nothing while the Active Requests grid takes a snapshot in (VdmLive.loading()): the
 *   grid comes first, plotly.js's evaluation (~0.2 s of main thread) after it;
 * - only charts that are shown (a chart on a hidden page keeps its newest figure and is
 *   drawn when its page is shown);
 * - one chart per task: a Plotly redraw takes tens of milliseconds, so four in one go was
 *   the page's longest main-thread task under churn. Newer figures replace older ones in flight.
 */
(function () {
  "use strict";
  const core = window.VdmCore;
  const dom = window.VdmDom;
  const GRAPHS = {
    inflight: "vdm-chart-inflight",
    rate: "vdm-chart-rate",
    latency: "vdm-chart-latency",
    errors: "vdm-chart-errors",
  };
  const CONFIG = { displayModeBar: false, responsive: true };
  // Next to this file, in the assets folder, but not loaded by Dash itself (assets_path_ignore in
  // dashboard/app.py): this file loads it, asynchronously.
  const PLOTLY_SRC = new URL("vendor/plotly-basic.min.js", document.currentScript.src).href;

  let plotly = null; // window.Plotly once the bundle has run
  let requested = false; // the bundle's script element is in the page
  const pending = new Map(); // box id -> newest figure not yet drawn
  let drawing = false;

  function gridLoading() {
    return !!(window.VdmLive && window.VdmLive.loading());
  }

  function loadPlotly() {
    if (window.Plotly) {
      plotly = window.Plotly;
      return;
    }
    requested = true;
    const script = document.createElement("script");
    script.src = PLOTLY_SRC;
    script.async = true;
    script.onload = function () {
      plotly = window.Plotly || null;
      schedule();
    };
    script.onerror = function () {
      console.warn("[vdm] charts: could not load " + PLOTLY_SRC);
    };
    document.head.appendChild(script);
  }

  /** Whether a chart box can be drawn now: Plotly is there, the grid is not loading, and
   * the box is shown (a box on a hidden page has no width). */
  function drawable(box) {
    return !!plotly && !gridLoading() && !!box && box.clientWidth > 0;
  }

  function nextDrawable() {
    for (const id of pending.keys()) {
      if (drawable(document.getElementById(id))) return id;
    }
    return null;
  }

  function schedule() {
    if (!plotly && !requested && pending.size > 0 && !gridLoading()) loadPlotly();
    if (drawing || nextDrawable() === null) return;
    drawing = true;
    window.setTimeout(drawNext, 0);
  }

  function drawNext() {
    const id = nextDrawable();
    if (id === null) {
      drawing = false;
      return;
    }
    const figure = pending.get(id);
    pending.delete(id);
    draw(document.getElementById(id), figure);
    // The next chart after the browser has had a frame (and the stream its events).
    window.setTimeout(function () {
      window.requestAnimationFrame(drawNext);
    }, 0);
  }

  /** Plotly draws into a div of its own inside the layout's box (React owns the box). */
  function draw(box, figure) {
    let gd = box.querySelector(".js-plotly-plot");
    try {
      if (gd) {
        plotly.react(gd, figure.data, figure.layout, CONFIG);
      } else {
        gd = document.createElement("div");
        box.appendChild(gd);
        plotly.newPlot(gd, figure.data, figure.layout, CONFIG);
      }
    } catch (err) {
      console.warn("[vdm] charts: a figure could not be drawn:", err);
    }
  }

  /** Show `figure` in the chart box `id`: drawn as soon as it can be (see drawable). */
  function show(id, figure) {
    pending.set(id, figure);
    schedule();
  }

  function renderFigures(stats) {
    const figures = core.statsFigures(stats);
    for (const name of Object.keys(GRAPHS)) show(GRAPHS[name], figures[name]);
    const fleet = (stats && stats.fleet) || {};
    dom.setProps("vdm-m-kpi-rate", { children: core.formatRate(fleet.requests_per_s) });
    dom.setProps("vdm-m-kpi-p95", {
      children: fleet.p95_ms === null || fleet.p95_ms === undefined
        ? "—" : core.formatDuration(fleet.p95_ms),
    });
    dom.setProps("vdm-m-kpi-errors", { children: core.formatPercent(fleet.error_rate) });
    dom.setProps("vdm-m-kpi-aborted", {
      children: window.VdmViewCore.abortedText(fleet.cancelled, fleet.client_closed),
    });
    // Only stream services that measure time to first token report it.
    dom.setProps("vdm-m-kpi-ttft", {
      children: fleet.ttft_p95_ms === null || fleet.ttft_p95_ms === undefined
        ? "—" : core.formatDuration(fleet.ttft_p95_ms),
    });
  }

  /**
   * Make every drawn, visible chart as wide as its box (`responsive` only re-measures on a
   * window resize), and draw the figures that waited for their box to be shown.
   */
  function fitAll() {
    if (plotly && plotly.Plots) {
      document.querySelectorAll(".vdm-chart .js-plotly-plot").forEach(function (gd) {
        const box = gd.parentElement;
        const full = gd._fullLayout;
        if (!box || !full || box.clientWidth === 0) return; // hidden: fit when shown
        if (Math.abs(full.width - box.clientWidth) > 2) plotly.Plots.resize(gd);
      });
    }
    schedule();
  }

  // A chart's box changes size when its page is shown or the window resizes: re-measure then,
  // whatever caused it (navigation, the page toggle callback, a wall screen's resolution).
  if (window.ResizeObserver) {
    const observer = new ResizeObserver(() => fitAll());
    const watch = () =>
      document.querySelectorAll(".vdm-chart").forEach((box) => observer.observe(box));
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", () => window.setTimeout(watch, 0));
    }
    window.setTimeout(watch, 0);
    window.addEventListener("vdm:locationchange", () => window.setTimeout(watch, 0));
  }

  window.addEventListener("vdm:locationchange", () => window.setTimeout(fitAll, 60));
  window.addEventListener("popstate", () => window.setTimeout(fitAll, 60));
  // The grid's snapshot is in: the charts that waited for it may be drawn.
  if (window.VdmLive) window.VdmLive.onLoaded(schedule);

  window.VdmCharts = { render: renderFigures, show, fitAll };
})();
