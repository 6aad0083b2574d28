/*
 * vdm-hub dashboard: the Grafana-style charts on the metrics page, fed by `stats` events.
 * Figures are built by VdmCore.statsFigures (pure, tested in Node) and handed to the dcc.Graph
 * components with set_props, so no Python callback runs per event. Each figure keeps a fixed
 * height and `uirevision`, so data arriving never moves the page or resets a zoom.
 *
 * One chart is redrawn per task: a Plotly redraw of a chart takes tens of milliseconds, so
 * four in one go was the page's longest main-thread task (over 100 ms on a busy machine),
 * while the grid's own batches stay well under it. Newer stats replace older ones in flight.
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

  let pending = null; // {figures, queue: [name…]} being drawn, one chart per task
  let drawing = false;

  function drawNext() {
    const job = pending;
    const name = job && job.queue.shift();
    if (!name) {
      drawing = false;
      pending = null;
      window.setTimeout(fitAll, 0);
      return;
    }
    dom.setProps(GRAPHS[name], { figure: job.figures[name] });
    // The next chart after the browser has had a frame (and the stream its events).
    window.setTimeout(function () {
      window.requestAnimationFrame(drawNext);
    }, 0);
  }

  function renderFigures(stats) {
    pending = { figures: core.statsFigures(stats), queue: Object.keys(GRAPHS) };
    if (!drawing) {
      drawing = true;
      drawNext();
    }
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
   * Make every visible chart as wide as its box. A chart first drawn while its page was hidden
   * (display: none) falls back to Plotly's default 700 px and would spill out of its grid
   * cell; `responsive` only re-measures on a window resize, so check after each change.
   */
  function fitAll() {
    const Plotly = window.Plotly;
    if (!Plotly || !Plotly.Plots) return;
    document.querySelectorAll(".vdm-chart .js-plotly-plot").forEach(function (gd) {
      const box = gd.parentElement;
      const full = gd._fullLayout;
      if (!box || !full || box.clientWidth === 0) return; // hidden: fit when shown
      if (Math.abs(full.width - box.clientWidth) > 2) Plotly.Plots.resize(gd);
    });
  }

  function render(stats) {
    renderFigures(stats);
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

  window.VdmCharts = { render, fitAll };
})();
