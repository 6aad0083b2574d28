/*
 * vdm-hub dashboard: what the Active Requests grid shows beyond the rows themselves.
 *
 * - Grid functions (window.dashAgGridFunctions): the Phase column says "stalled" for a stream
 *   silent longer than the stream service's VDM_STALL_AFTER after its first token, and its row
 *   is marked (distinct from stuck); TTFT shows how long a row has waited for its first token
 *   until it has one; labels as `k=v` chips, filtered as text (the column shows once a row
 *   carries labels); tokens per second of a
 *   finished request (Recently finished, the Finished view), labelled when it is over the
 *   whole duration. The decisions are pure functions in 01_vdm_viewcore.js.
 * - The count badge: "8", or "3 of 8" while a filter is on.
 * - The header emoji for whatever page is shown (VdmHeader, read by the indicator callback).
 * - On a phone the key columns (duration, model, worker, phase) share the grid's width, on a
 *   tablet they keep readable widths; the other columns scroll inside the grid, never the page.
 */
(function () {
  "use strict";
  const core = window.VdmCore;
  const op = window.VdmOpCore;
  const view = window.VdmViewCore;
  const dom = window.VdmDom;
  const GRID_ID = "vdm-active-grid";
  // Shares of the grid's width for the key columns on a phone (they add up to 1)...
  const KEY_SHARES = { duration: 0.22, model: 0.28, worker_id: 0.22, phase: 0.28 };
  const NARROW_PX = 640;
  // ...and their widths on a tablet, where flex would squeeze them to their minimum.
  const TABLET_WIDTHS = { duration: 100, model: 170, worker_id: 110, phase: 105 };
  const TABLET_PX = 1100;

  function offsetMs() {
    return window.__vdmClock ? window.__vdmClock.offsetMs : 0;
  }

  /** The local time the clock-driven cells are computed at: held while the view is stale,
   * like the durations (02_vdm_dom.js), so no row turns stalled because nothing arrives. */
  function nowMs() {
    const clock = window.__vdmClock || {};
    return core.shownNowMs(Date.now(), clock.offsetMs, clock.sync);
  }

  function stallAfterS() {
    return window.__vdmCaps ? window.__vdmCaps.stallAfterS : view.DEFAULT_STALL_AFTER_S;
  }

  function data(params) {
    return (params && params.data) || null;
  }

  window.dashAgGridFunctions = Object.assign(window.dashAgGridFunctions || {}, {
    vdmPhase(params) {
      const d = data(params);
      return d ? view.phaseShown(d, nowMs(), offsetMs(), stallAfterS()) : null;
    },
    vdmIsStalled(params) {
      const d = data(params);
      return !!d && view.stalled(d, nowMs(), offsetMs(), stallAfterS()) !== null;
    },
    vdmTtftText(params) {
      if (params && params.value !== null && params.value !== undefined) {
        return core.formatDuration(params.value);
      }
      const waited = view.waitingMs(data(params), nowMs(), offsetMs());
      return waited === null ? "—" : "wait " + core.formatDuration(waited);
    },
    vdmLabels(params) {
      const d = data(params);
      return op.labelsText(d && d.labels);
    },
    vdmTokensPerS(params) {
      const rate = view.tokensPerS(data(params));
      return rate ? rate.value : null;
    },
    vdmTokensPerSText(params) {
      return view.tokensPerSText(view.tokensPerS(data(params)), core.formatRate);
    },
  });

  // Cell renderers are React components in dash-ag-grid.
  window.dashAgGridComponentFunctions = Object.assign(window.dashAgGridComponentFunctions || {}, {
    VdmLabelChips(props) {
      const React = window.React;
      const d = props && props.data;
      const chips = op.labelPairs(d && d.labels).map(([k, v]) =>
        React.createElement("span", { key: k, className: "vdm-chip", title: k + "=" + v }, k + "=" + v),
      );
      return React.createElement("span", { className: "vdm-chips" }, chips);
    },
  });

  // ---- the count badge ----------------------------------------------------------------------

  let badgeTimer = null;

  function writeBadge() {
    badgeTimer = null;
    const live = window.VdmLive;
    if (!live) return;
    const api = dom.gridApi(GRID_ID);
    const filtered = !!api && api.isAnyFilterPresent();
    let total = live.size();
    let shown = total;
    if (filtered) {
      // Both from the grid, so they describe the same rows.
      total = 0;
      api.forEachNode(() => (total += 1));
      shown = api.getDisplayedRowCount();
    }
    dom.setProps("vdm-active-count", { children: view.countBadge(total, shown, filtered) });
  }

  /** Rows arrive many times a second: the badge (a Dash component) is written at most every 250 ms. */
  function scheduleBadge() {
    if (!badgeTimer) badgeTimer = window.setTimeout(writeBadge, 250);
  }

  // ---- stalled rows, and cells that follow the clock ------------------------------------------

  // Rows (by AG Grid row id) last drawn as stalled: rowClassRules apply when a row is drawn or
  // its data changes, and a stalled row's data by definition does not change.
  const drawnStalled = new Set();
  let stalledKey = "";

  function tick() {
    if (document.visibilityState !== "visible") return;
    showLabelsWhenUsed();
    if (view.pageOf(window.location.pathname) === "metrics") refreshStalled();
  }

  function refreshStalled() {
    const api = dom.gridApi(GRID_ID);
    if (!api) return;
    const isStalled = window.dashAgGridFunctions.vdmIsStalled;
    const changed = [];
    const rendered = new Set();
    for (const node of api.getRenderedNodes()) {
      if (!node.data) continue;
      rendered.add(node.id);
      const stalled = isStalled({ data: node.data });
      if (stalled !== drawnStalled.has(node.id)) {
        changed.push(node);
        if (stalled) drawnStalled.add(node.id);
        else drawnStalled.delete(node.id);
      }
    }
    for (const id of drawnStalled) if (!rendered.has(id)) drawnStalled.delete(id);
    if (changed.length) api.redrawRows({ rowNodes: changed });
    api.refreshCells({ columns: ["phase", "ttft_ms"], force: true });
    refilterPhase(api, isStalled);
  }

  /** A filter on Phase (?phase=stalled) runs when data changes, not when the clock turns a row
   * stalled: run it again whenever the set of stalled rows changed. */
  function refilterPhase(api, isStalled) {
    const model = api.getFilterModel();
    if (!model || !model.phase) return;
    const ids = [];
    api.forEachNode((node) => {
      if (node.data && isStalled({ data: node.data })) ids.push(node.id);
    });
    const key = ids.join("\n");
    if (key !== stalledKey) {
      stalledKey = key;
      api.onFilterChanged();
    }
  }

  // ---- the Labels column, once there are labels ----------------------------------------------

  // Hidden until a row carries labels (in the live grid, Recently finished and the Finished
  // view): a fleet whose apps set none gets no empty column that squeezes the others. Once
  // shown it stays.
  const LABEL_GRIDS = [GRID_ID, "vdm-recent-grid", "vdm-finished-grid"];
  const labelsShown = new Set();

  function showLabelsWhenUsed() {
    for (const gridId of LABEL_GRIDS) {
      const api = labelsShown.has(gridId) ? null : dom.gridApi(gridId);
      if (!api) continue;
      let found = false;
      api.forEachNode((node) => {
        if (!found && node.data && op.labelPairs(node.data.labels).length) found = true;
      });
      if (found) {
        labelsShown.add(gridId);
        api.applyColumnState({ state: [{ colId: "labels", hide: false }] });
      }
    }
  }

  // ---- the key columns on a narrow screen ---------------------------------------------------

  let wideState = null; // the key columns' widths and flex as defined, to restore
  let compact = false;

  function fitKeyColumns() {
    const api = dom.gridApi(GRID_ID);
    const box = document.getElementById(GRID_ID);
    if (!api || !box || box.clientWidth === 0) return; // hidden: fitted when shown
    if (!wideState) {
      wideState = api
        .getColumnState()
        .filter((c) => c.colId in KEY_SHARES)
        .map((c) => ({ colId: c.colId, width: c.width, flex: c.flex }));
    }
    if (window.innerWidth < TABLET_PX) {
      const width = box.clientWidth - 4; // the grid's borders
      const narrow = window.innerWidth < NARROW_PX;
      const state = Object.keys(KEY_SHARES).map((colId) => ({
        colId: colId,
        width: narrow ? Math.floor(width * KEY_SHARES[colId]) : TABLET_WIDTHS[colId],
        flex: null,
      }));
      api.applyColumnState({ state: state });
      compact = true;
    } else if (compact) {
      api.applyColumnState({ state: wideState });
      compact = false;
    }
  }

  // ---- the header emoji -----------------------------------------------------------------------

  window.VdmHeader = {
    /** The emoji for the page shown; `streamEmoji`: what the live page's stream says. */
    emoji(streamEmoji) {
      return view.headerEmoji(view.pageOf(window.location.pathname), {
        streamEmoji: streamEmoji,
        overviewOk: !!(window.VdmOverview && window.VdmOverview.fresh()),
        finishedOk: !!(window.VdmFinished && window.VdmFinished.fresh()),
      });
    },
  };

  // ---- wiring ---------------------------------------------------------------------------------

  function attach() {
    const dag = window.dash_ag_grid;
    if (!dag || !document.getElementById(GRID_ID)) {
      window.setTimeout(attach, 100);
      return;
    }
    dag.getApiAsync(GRID_ID).then(function (api) {
      api.addEventListener("filterChanged", writeBadge);
      api.addEventListener("modelUpdated", scheduleBadge);
      // The grid's box changes size when its page is shown (it has none while hidden) and
      // when the window is resized or turned: fit the key columns then.
      let timer = null;
      new ResizeObserver(function () {
        window.clearTimeout(timer);
        timer = window.setTimeout(fitKeyColumns, 50);
      }).observe(document.getElementById(GRID_ID));
      fitKeyColumns();
    });
  }

  if (window.VdmLive) window.VdmLive.onPaint(scheduleBadge);
  // Half a second: a stream is marked within VDM_STALL_AFTER + 1 s of its last output.
  window.setInterval(tick, 500);
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", attach);
  else attach();
})();
