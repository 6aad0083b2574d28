/*
 * vdm-hub dashboard: the Grafana-style charts on the metrics page, fed by `stats` events.
 * Figures are built by VdmCore.statsFigures (pure, tested in Node) and handed to the dcc.Graph
 * components with set_props, so no Python callback runs per event. Each figure keeps a fixed
 * height and `uirevision`, so data arriving never moves the page or resets a zoom.
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

  function render(stats) {
    const figures = core.statsFigures(stats);
    for (const [name, id] of Object.entries(GRAPHS)) {
      dom.setProps(id, { figure: figures[name] });
    }
    const fleet = (stats && stats.fleet) || {};
    dom.setProps("vdm-m-kpi-rate", { children: core.formatRate(fleet.requests_per_s) });
    dom.setProps("vdm-m-kpi-p95", {
      children: fleet.p95_ms === null || fleet.p95_ms === undefined
        ? "—" : core.formatDuration(fleet.p95_ms),
    });
    dom.setProps("vdm-m-kpi-errors", { children: core.formatPercent(fleet.error_rate) });
  }

  window.VdmCharts = { render };
})();
