/*
 * vdm-hub dashboard: the fleet overview page. It needs workers and rates only every couple of
 * seconds, so it polls the stream service's JSON endpoints (`/metrics/active-requests`,
 * `/metrics/summary`) while the tab is visible and the overview is shown; the SSE stream
 * stays reserved for the metrics page (the live client connects only on that path).
 */
(function () {
  "use strict";
  const core = window.VdmCore;
  const dom = window.VdmDom;
  const cfg = window.__vdmConfig || {};
  const GRID_ID = "vdm-workers-grid";
  const POLL_MS = Math.max(500, Number(cfg.pollIntervalMs) || 2000);
  let timer = null;
  let inFlight = false;
  let haveData = false;
  let answeredAt = 0; // when the stream service last answered a poll (Date.now())

  function getJson(path) {
    const init = {
      cache: "no-store",
      credentials: cfg.withCredentials ? "include" : "same-origin",
    };
    return fetch(core.joinUrl(cfg.streamUrl, path), init).then(function (r) {
      if (!r.ok) throw new Error(path + ": HTTP " + r.status);
      return r.json();
    });
  }

  function status(text, ok) {
    dom.setProps("vdm-overview-status", {
      children: text,
      className: ok ? "vdm-overview-status vdm-ok" : "vdm-overview-status vdm-bad",
    });
  }

  function pollOnce() {
    if (inFlight) return;
    inFlight = true;
    Promise.all([getJson(core.SNAPSHOT_PATH), getJson(core.SUMMARY_PATH).catch(() => null)])
      .then(function (results) {
        const snap = results[0] || {};
        const stats = results[1];
        if (snap.disabled) {
          status("Metrics disabled on the stream service: " + (snap.suggestion || ""), false);
          return;
        }
        dom.observeServerTime(snap.timestamp);
        haveData = true;
        dom.applyRows(GRID_ID, core.workerRows(snap, stats), "worker_id", [])
          .catch(function () {});
        const t = core.fleetTotals(snap, stats);
        dom.setProps("vdm-kpi-workers", { children: String(t.workersUp) });
        dom.setProps("vdm-kpi-stale", { children: String(t.workersStale) });
        dom.setProps("vdm-kpi-inflight", { children: core.formatCount(t.inFlight) });
        dom.setProps("vdm-kpi-rate", { children: core.formatRate(t.requestsPerS) });
        dom.setProps("vdm-kpi-errors", { children: core.formatPercent(t.errorRate) });
        dom.setProps("vdm-kpi-aborted", {
          children: window.VdmViewCore.abortedText(t.cancelled, t.clientClosed),
        });
        dom.setProps("vdm-kpi-p95", {
          children: t.p95Ms === null ? "—" : core.formatDuration(t.p95Ms),
        });
        if (stats) {
          const figures = core.statsFigures(stats);
          window.VdmCharts.show("vdm-ov-chart-inflight", figures.inflight);
          window.VdmCharts.show("vdm-ov-chart-rate", figures.rate);
        }
        status("Updated " + core.formatClock(snap.timestamp), true);
        answeredAt = Date.now();
      })
      .catch(function (err) {
        answeredAt = 0;
        status("Stream service unreachable (" + err.message + "); retrying", false);
      })
      .finally(function () {
        inFlight = false;
      });
  }

  function evaluate() {
    const want = core.shouldPollOverview(document.visibilityState, window.location.pathname);
    if (want && !timer) {
      const tick = function () {
        timer = window.setTimeout(tick, POLL_MS);
        pollOnce();
      };
      tick();
    } else if (!want && timer) {
      window.clearTimeout(timer);
      timer = null;
    }
  }

  document.addEventListener("visibilitychange", evaluate);
  window.addEventListener("popstate", evaluate);
  window.addEventListener("vdm:locationchange", evaluate); // from the wrapped history API
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", evaluate);
  } else {
    evaluate();
  }

  // For the header emoji: fresh while the last poll answered within three poll intervals.
  window.VdmOverview = {
    fresh: () => timer !== null && answeredAt > 0 && Date.now() - answeredAt < 3 * POLL_MS,
  };

  // Heartbeat ages tick client-side between polls.
  window.setInterval(function () {
    if (timer && haveData) dom.refreshClockColumns(GRID_ID, ["age"]);
  }, 1000);
})();
