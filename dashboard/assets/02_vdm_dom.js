/*
 * vdm-hub dashboard: small browser helpers shared by the live client, the charts and the
 * overview poller — AG Grid value functions, grid transactions, and Dash prop updates.
 *
 * Everything on the data path stays in the browser: rows go into AG Grid as transactions
 * by their `key` (a snapshot in slices, a task each; deltas through AG Grid's async
 * batching), text goes through `dash_clientside.set_props`; no Python callback runs per
 * update.
 */
(function () {
  "use strict";
  const core = window.VdmCore;
  const op = window.VdmOpCore;

  // Server clock minus browser clock, estimated from snapshots' `timestamp`s; and the hub's
  // sync state, which stops the clock-driven cells at the last confirmed moment while stale.
  window.__vdmClock = window.__vdmClock || { offsetMs: 0, samples: [], sync: core.SYNC_OK };
  // What the stream service says it can do (GET /metrics/capabilities, read by
  // 06_vdm_operator.js); until it answers: no cancel, the default stuck threshold.
  window.__vdmCaps = window.__vdmCaps || op.capabilitiesFrom(null);
  // Recent chunks_out observations per streaming row (by row key), for the chunks/s column.
  const chunkHistory = new Map();

  /** Record the chunk counts of rows that arrived or changed (streaming rows only). */
  function noteChunks(rows) {
    const t = now();
    for (const row of rows) {
      const id = core.rowId(row);
      if (id === null || row.is_streaming !== true || row.chunks_out == null) continue;
      chunkHistory.set(id, op.noteChunks(chunkHistory.get(id), row.chunks_out, t));
    }
  }

  /** Drop the history of rows that are gone (`keep`: a Map of the rows still held, or ids). */
  function forgetChunks(removed, keep) {
    if (keep) {
      for (const id of chunkHistory.keys()) if (!keep.has(id)) chunkHistory.delete(id);
      return;
    }
    for (const r of removed) chunkHistory.delete(core.rowId(r));
  }

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

  /** The local time clock-driven cells are computed at (held while the view is stale). */
  function shownNow() {
    const clock = window.__vdmClock;
    return core.shownNowMs(Date.now(), clock.offsetMs, clock.sync);
  }

  /**
   * Record the hub's sync state. While stale the active grid's rows are dimmed (a body
   * attribute: React never re-renders <body>, so nothing resets it) and their clocks stop.
   * Returns true when it changed.
   */
  function observeSync(sync) {
    const clock = window.__vdmClock;
    if (core.sameSync(clock.sync, sync)) return false;
    clock.sync = sync;
    if (sync.stale) document.body.setAttribute("data-vdm-sync", "stale");
    else document.body.removeAttribute("data-vdm-sync");
    return true;
  }

  // Functions the grids' column definitions call by name (dash-ag-grid looks them up here).
  window.dashAgGridFunctions = Object.assign(window.dashAgGridFunctions || {}, {
    vdmLiveDuration(params) {
      const d = params && params.data;
      if (!d) return null;
      return core.liveDurationMs(d.start_time, shownNow(), window.__vdmClock.offsetMs);
    },
    vdmAge(params) {
      const d = params && params.data;
      if (!d) return null;
      return core.ageSeconds(d.last_seen, shownNow(), window.__vdmClock.offsetMs);
    },
    vdmChunkRate(params) {
      const d = params && params.data;
      if (!d) return null;
      const history = chunkHistory.get(core.rowId(d));
      return op.chunkRate(history, d, shownNow(), window.__vdmClock.offsetMs);
    },
    vdmIsStuck(params) {
      const d = params && params.data;
      if (!d) return false;
      return op.isStuck(d.start_time, shownNow(), window.__vdmClock.offsetMs, window.__vdmCaps.stuckAfterS);
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

  /**
   * Render into element `id` the component tree the layout deferred under `name`
   * (window.__vdmPages, from dashboard/layout.py's deferred_pages), once: set_props takes
   * Dash components as children like a callback's output. False while `id` is not there.
   */
  function renderDeferred(name, id) {
    const deferred = window.__vdmPages || {};
    if (!(name in deferred) || !document.getElementById(id)) return false;
    const ds = window.dash_clientside;
    if (!ds || typeof ds.set_props !== "function") return false;
    const children = deferred[name];
    delete deferred[name];
    ds.set_props(id, { children: children });
    return true;
  }

  /** The grid's API now, or null while it is not mounted (no waiting: callers retry). */
  function gridApi(gridId) {
    const dag = window.dash_ag_grid;
    if (!dag || !document.getElementById(gridId)) return null;
    try {
      const api = dag.getApi(gridId);
      return api && !api.isDestroyed() ? api : null;
    } catch (_err) {
      return null; // not mounted yet
    }
  }

  // A macrotask without setTimeout's 4 ms clamp (it applies from the fifth nested timer on):
  // the page may paint, and SSE frames and clicks run, between two slices.
  const yieldChannel = new MessageChannel();
  const yielded = [];
  yieldChannel.port1.onmessage = function () {
    const fn = yielded.shift();
    if (fn) fn();
  };
  function nextTask(fn) {
    yielded.push(fn);
    yieldChannel.port2.postMessage(null);
  }

  /**
   * Make grid `gridId` hold exactly the rows of `rows()` (a Map id -> row) in slices, one
   * main-thread task each, instead of one transaction of every row: 10,000 rows in one
   * transaction froze the page for most of a second on every load. `start()` after a snapshot
   * queues every id the map or the grid holds (the map's first: the newest rows, those in
   * view under the default sort, are in the first slice); each slice reconciles the next ids
   * (VdmCore.reconcileRows) in one synchronous transaction and sizes the next slice to the
   * time budget from what this one cost (VdmCore.nextSliceSize). While it runs, a delta's
   * changes are queued with `touch(tx)` rather than sent to the grid: a slice reads the map
   * as it is then, so whatever a delta did, the grid ends on the map. Waits for the grid to
   * be mounted; `onDone(slices)` runs when the grid holds the map.
   */
  function slicedSync(gridId, key, rows, onDone) {
    let queue = null; // ids still to reconcile, in order; null while idle
    let fresh = false; // start() asked for a new pass: (re)build the queue first
    let scheduled = false;
    let size = core.SLICE_FIRST_ROWS;
    let slices = 0; // transactions of this pass

    function schedule(delayMs) {
      if (scheduled) return;
      scheduled = true;
      const run = function () {
        scheduled = false;
        step();
      };
      if (delayMs) window.setTimeout(run, delayMs);
      else nextTask(run);
    }

    function build(api) {
      api.flushAsyncTransactions(); // deltas queued before this pass are in the grid first
      const map = rows();
      const ids = new Set(map.keys());
      api.forEachNode((node) => {
        if (node.data) ids.add(String(node.data[key]));
      });
      queue = ids;
      fresh = false;
      size = core.SLICE_FIRST_ROWS;
      slices = 0;
    }

    function step() {
      const api = gridApi(gridId);
      if (!api) {
        schedule(100); // not mounted yet
        return;
      }
      if (fresh) build(api);
      if (queue === null) return;
      const t0 = performance.now();
      const ids = [];
      for (const id of queue) {
        queue.delete(id);
        ids.push(id);
        if (ids.length >= size) break;
      }
      const held = (id) => {
        const node = api.getRowNode(id);
        return node ? node.data : undefined;
      };
      const tx = core.reconcileRows(ids, rows(), held, key);
      if (!core.isEmptyTransaction(tx)) {
        api.applyTransaction(tx);
        slices += 1;
      }
      size = core.nextSliceSize(ids.length, performance.now() - t0, core.SLICE_BUDGET_MS);
      if (queue.size > 0) {
        schedule(0);
        return;
      }
      queue = null;
      if (onDone) onDone(slices);
    }

    return {
      start() {
        fresh = true;
        schedule(0);
      },
      /** While a pass runs: queue the ids a delta's transaction touched; false when idle. */
      touch(tx) {
        if (queue === null && !fresh) return false;
        if (queue !== null) {
          for (const r of tx.add) queue.add(String(r[key]));
          for (const r of tx.update) queue.add(String(r[key]));
          for (const r of tx.remove) queue.add(String(r[key]));
        }
        return true; // a pass that has not built its queue yet reads the map anyway
      },
      running: () => queue !== null || fresh,
    };
  }

  /**
   * Hand a delta's transaction to the grid's async batching: AG Grid applies every queued
   * transaction together after `asyncTransactionWaitMillis` (50 ms, longer at thousands of
   * rows: VdmCore.batchWaitMs), one sort, filter and redraw per batch instead of per frame.
   */
  function queueTransaction(api, tx, rowCount) {
    if (core.isEmptyTransaction(tx)) return;
    const wait = core.batchWaitMs(rowCount);
    if (api.getGridOption("asyncTransactionWaitMillis") !== wait) {
      api.setGridOption("asyncTransactionWaitMillis", wait); // read when a batch starts
    }
    api.applyTransactionAsync(tx);
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

  // Ids of rendered rows last drawn as stuck. AG Grid applies rowClassRules when a row is
  // drawn or its data changes, not when the clock moves on, so a row that quietly crosses the
  // threshold is redrawn once (a handful of rows in view, never all of them).
  const drawnStuck = new Set();

  function refreshStuck(gridId) {
    const api = gridApi(gridId);
    if (!api) return;
    const fns = window.dashAgGridFunctions;
    const changed = [];
    const rendered = new Set();
    for (const node of api.getRenderedNodes()) {
      const id = core.rowId(node.data);
      if (id === null) continue;
      rendered.add(id);
      const stuck = fns.vdmIsStuck({ data: node.data });
      if (stuck !== drawnStuck.has(id)) {
        changed.push(node);
        if (stuck) drawnStuck.add(id);
        else drawnStuck.delete(id);
      }
    }
    for (const id of drawnStuck) if (!rendered.has(id)) drawnStuck.delete(id);
    if (changed.length) api.redrawRows({ rowNodes: changed });
  }

  window.VdmDom = {
    refreshStuck,
    setProps,
    applyRows,
    gridApi,
    slicedSync,
    renderDeferred,
    queueTransaction,
    refreshClockColumns,
    observeServerTime,
    observeSync,
    noteChunks,
    forgetChunks,
  };
})();
