/*
 * vdm-hub dashboard: small browser helpers shared by the live client, the charts and the
 * overview poller — AG Grid value functions, grid transactions, and Dash prop updates.
 *
 * Everything on the data path stays in the browser: rows go into AG Grid as transactions
 * (`applyTransaction` by `request_id`), text and figures go through
 * `dash_clientside.set_props`; no Python callback runs per update.
 */
(function () {
  "use strict";
  const core = window.VdmCore;

  // Server clock minus browser clock, estimated from snapshots' `timestamp`s.
  window.__vdmClock = window.__vdmClock || { offsetMs: 0, samples: [] };

  /** Feed one snapshot timestamp (epoch s) into the clock estimate. */
  function observeServerTime(timestampS) {
    const t = Number(timestampS);
    if (!Number.isFinite(t) || t <= 0) return;
    const folded = core.foldClockSample(window.__vdmClock.samples, core.clockOffsetMs(t, now()));
    window.__vdmClock.samples = folded.samples;
    window.__vdmClock.offsetMs = folded.offsetMs;
  }

  function now() {
    return Date.now();
  }

  // Functions the grids' column definitions call by name (dash-ag-grid looks them up here).
  window.dashAgGridFunctions = Object.assign(window.dashAgGridFunctions || {}, {
    vdmLiveDuration(params) {
      const d = params && params.data;
      if (!d) return null;
      return core.liveDurationMs(d.start_time, now(), window.__vdmClock.offsetMs);
    },
    vdmAge(params) {
      const d = params && params.data;
      if (!d) return null;
      return core.ageSeconds(d.last_seen, now(), window.__vdmClock.offsetMs);
    },
    vdmDuration: (ms) => core.formatDuration(ms),
    vdmAgeText: (s) => (s === null || s === undefined ? "—" : core.formatDuration(s * 1000)),
    vdmBytes: (n) => core.formatBytes(n),
    vdmCount: (n) => core.formatCount(n),
    vdmRate: (n) => core.formatRate(n),
    vdmPercent: (n) => core.formatPercent(n),
    vdmClock: (t) => core.formatClock(t),
    vdmMs: (n) => (n === null || n === undefined ? "—" : core.formatDuration(n)),
  });

  const lastProps = new Map();

  /** Set a Dash component's props from JS, skipping no-op writes (each one re-renders). */
  function setProps(id, props) {
    const ds = window.dash_clientside;
    if (!ds || typeof ds.set_props !== "function" || !document.getElementById(id)) return;
    const key = JSON.stringify(props);
    if (lastProps.get(id) === key) return;
    lastProps.set(id, key);
    ds.set_props(id, props);
  }

  /**
   * Make grid `gridId` hold exactly `rows` (by `key`) with one transaction: adds, updates,
   * removes; never a rowData reset, so sort, filter, selection and scroll survive.
   * The diff is taken against what the grid really holds, so a grid that was re-created, or a
   * reconnect after missed updates, converges on the next snapshot.
   */
  async function applyRows(gridId, rows, key, ignore) {
    const dag = window.dash_ag_grid;
    if (!dag || !document.getElementById(gridId)) return null;
    const api = await dag.getApiAsync(gridId);
    const current = new Map();
    api.forEachNode((node) => {
      if (node.data) current.set(String(node.data[key]), node.data);
    });
    const tx = core.diffRows(current, rows, key, ignore);
    if (!core.isEmptyTransaction(tx)) api.applyTransaction(tx);
    return tx;
  }

  /** Re-render the cells whose values depend on the clock (durations, heartbeat ages). */
  function refreshClockColumns(gridId, columns) {
    const dag = window.dash_ag_grid;
    if (!dag || !document.getElementById(gridId)) return;
    let api;
    try {
      api = dag.getApi(gridId);
    } catch (_err) {
      return; // grid not mounted yet
    }
    if (api && !api.isDestroyed()) api.refreshCells({ columns: columns, force: true });
  }

  window.VdmDom = { setProps, applyRows, refreshClockColumns, observeServerTime };
})();
