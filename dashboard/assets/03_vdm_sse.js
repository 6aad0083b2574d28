/*
 * vdm-hub dashboard: the Active Requests live client.
 *
 * One EventSource to `<stream base>/metrics/active-requests/stream?delta=1`, open only while
 * the tab is visible and the path contains `/dashboard/metrics`. The client keeps the rows in
 * a Map by `key` and the version they stand for: an `update` (full snapshot) replaces
 * the map and the grid is brought in line with it in slices, a main-thread task each (10,000
 * rows in one transaction froze the page on every load); a `delta` whose `base` is the held version
 * is applied to the map and its upserts/removes go to AG Grid as async transactions, so what
 * the page does grows with the changes, not with the rows (docs/protocol.md, SSE v2). A delta
 * that does not follow on (a gap, which the server never sends) closes the stream and the
 * reconnect's first `update` resynchronises. Every other reconnect (after an error, a hidden
 * tab, navigation) resumes with `last_event_id=<held version>`, so it costs a delta, not a
 * snapshot, when the service still has the changes. A stream service without deltas ignores
 * both parameters and sends snapshots only, which works exactly as before. `stats` feeds the
 * charts; `disabled` switches to polling the JSON endpoint. Every `update` and `delta` says
 * whether the hub's view is in sync with Redis (`sync`); while it is "stale" the indicator
 * says so instead of `● Live`, the rows are dimmed and their durations stop at the last
 * confirmed moment.
 *
 * Reconnects: a browser EventSource retries by itself after a network error (readyState
 * CONNECTING) but gives up for good on a non-200 answer (readyState CLOSED). To have ONE retry
 * policy for both, every error closes the source — readyState is then CLOSED — and the
 * reconnect is scheduled here with base = min(30000, 750·1.6^attempt), jitter
 * base·0.25·(rand·2−1), delay max(250, base+jitter); `attempt` resets on open.
 *
 * Public: window.__vdmActiveRequestsSSE = {enable, disable, isConnected}; the extra read-only
 * `debug()` reports attempt/delays for tests and curious operators.
 */
(function () {
  "use strict";
  const core = window.VdmCore;
  const dom = window.VdmDom;
  const cfg = window.__vdmConfig || {};
  // Where the stream service is may depend on where this page came from (core.streamBase):
  // settled once, here, for every reader of cfg.streamUrl (this client, the overview, cancel;
  // their assets load after this one).
  cfg.streamUrl = core.streamBase(cfg, window.location);
  const GRID_ID = "vdm-active-grid";
  const RECENT_GRID_ID = "vdm-recent-grid";
  const POLL_MS = Math.max(500, Number(cfg.pollIntervalMs) || 2000);
  const KEY = core.ROW_KEY; // rows by `key`: a request id is unique per worker only
  // Columns whose value depends on the clock, redrawn once a second (visible rows only:
  // AG Grid renders only the rows in view, so this costs the same at 10 or 10,000 rows).
  const CLOCK_COLUMNS = ["duration", "chunk_rate"];

  let source = null; // the EventSource, when one exists
  let attempt = 0;
  let reconnectTimer = null;
  let enabled = true;
  let disabledInfo = null; // set after a `disabled` event: {message, suggestion}
  let pollTimer = null;
  const debug = {
    opens: 0,
    errors: 0,
    delays: [],
    polls: 0,
    snapshots: 0,
    deltas: 0,
    gaps: 0,
    syncChanges: 0,
    gridLoads: 0, // sliced passes that brought the grid in line with a snapshot
    gridSlices: 0, // transactions the last of them took
  };

  // What the client holds: the rows by id, the version they stand for, the worker list.
  let rows = new Map();
  let version = null;
  let workers = [];
  let haveData = false;
  let sync = core.SYNC_OK; // the hub's word on its view (update/delta/snapshot `sync` fields)
  // The grid follows `rows`: after a snapshot in slices (a task each), then delta by delta.
  const loadedListeners = [renderRecentGrid];
  const gridSync = dom.slicedSync(GRID_ID, KEY, () => rows, function (slices) {
    debug.gridLoads += 1;
    debug.gridSlices = slices;
    for (const fn of loadedListeners) {
      try {
        fn();
      } catch (err) {
        console.debug("[vdm] grid-loaded listener failed:", err);
      }
    }
  });
  let paintPending = false;
  let paintedAt = 0;
  let paintTimer = null;
  const paintListeners = [];
  // The header count and KPIs are Dash components: each write re-renders them through React,
  // so under churn they are written at most this often (the grid itself is not held back).
  const PAINT_MS = 250;

  function wanted() {
    return enabled && core.shouldConnect(document.visibilityState, window.location.pathname);
  }

  function isConnected() {
    return !!source && source.readyState === 1; // EventSource.OPEN
  }

  // Every (re)connect resumes from the version held, if any: the service answers with a delta
  // from there while it still has the changes (about a minute), else with a snapshot.
  function streamUrl() {
    return core.liveStreamUrl(cfg.streamUrl, version);
  }

  // ---- connection lifecycle -------------------------------------------------------------

  function connect() {
    if (source || reconnectTimer || disabledInfo) return;
    let es;
    try {
      es = cfg.withCredentials
        ? new EventSource(streamUrl(), { withCredentials: true })
        : new EventSource(streamUrl());
    } catch (err) {
      console.error("[vdm][sse] Failed to create EventSource:", err);
      scheduleReconnect();
      return;
    }
    source = es;
    es.onopen = function () {
      if (source !== es) return;
      attempt = 0;
      debug.opens += 1;
    };
    es.addEventListener("update", function (ev) {
      if (source === es) onUpdate(ev);
    });
    es.addEventListener("delta", function (ev) {
      if (source === es) onDelta(ev, es);
    });
    es.addEventListener("stats", function (ev) {
      if (source === es) onStats(ev);
    });
    es.addEventListener("disabled", function (ev) {
      if (source === es) onDisabled(ev);
    });
    es.onerror = function () {
      if (source !== es) return;
      debug.errors += 1;
      console.warn("[vdm][sse] Connection error (will retry)");
      // CLOSED: the browser gave up (non-200). CONNECTING: it would retry on its own
      // schedule; close it so both cases follow the one backoff below.
      es.close();
      source = null;
      scheduleReconnect();
      probeSession();
    };
  }

  // An EventSource cannot see status codes. With access control on, ask the JSON endpoint:
  // a 401 means the session is gone, so go to the login page rather than retry forever.
  function probeSession() {
    if (!cfg.loginUrl) return;
    fetch(core.joinUrl(cfg.streamUrl, core.SNAPSHOT_PATH), {
      cache: "no-store",
      credentials: "include",
    })
      .then(function (r) {
        if (r.status === 401) {
          const next = window.location.pathname + window.location.search;
          window.location.assign(cfg.loginUrl + "?next=" + encodeURIComponent(next));
        }
      })
      .catch(function () {
        /* the stream service is down: the backoff above handles it */
      });
  }

  function scheduleReconnect() {
    if (reconnectTimer || !wanted()) return;
    const delay = core.backoffDelay(attempt);
    attempt += 1;
    debug.delays.push(Math.round(delay));
    if (debug.delays.length > 50) debug.delays.shift();
    reconnectTimer = window.setTimeout(function () {
      reconnectTimer = null;
      evaluate();
    }, delay);
  }

  function teardown() {
    if (source) {
      source.close();
      source = null;
    }
    if (reconnectTimer) {
      window.clearTimeout(reconnectTimer);
      reconnectTimer = null;
    }
    stopPolling();
  }

  /** Bring the connection in line with visibility, path and enable/disable. */
  function evaluate() {
    if (!wanted()) {
      teardown();
      return;
    }
    if (disabledInfo) {
      startPolling();
      return;
    }
    connect();
  }

  // ---- data -------------------------------------------------------------------------------

  function parse(ev) {
    try {
      return JSON.parse(ev.data);
    } catch (_err) {
      return null; // a malformed frame is skipped, never fatal
    }
  }

  function onUpdate(ev) {
    const snap = parse(ev);
    if (!snap || typeof snap !== "object") return;
    if (snap.disabled) {
      onDisabled(ev);
      return;
    }
    acceptSnapshot(snap);
  }

  /** A full snapshot (stream `update` or a poll): it replaces what the client holds. */
  function acceptSnapshot(snap) {
    debug.snapshots += 1;
    dom.observeServerTime(snap.timestamp);
    noteSync(snap);
    rows = core.rowMapFrom(snap.active_requests, KEY);
    const v = Number(snap.version);
    version = snap.version !== undefined && Number.isFinite(v) ? v : null;
    workers = Array.isArray(snap.workers) ? snap.workers : [];
    dom.noteChunks(rows.values());
    dom.forgetChunks(null, rows);
    haveData = true;
    // Latest wins: a burst of snapshots becomes one pass, which reads the map as it goes.
    gridSync.start();
    schedulePaint();
  }

  function onDelta(ev, es) {
    const delta = parse(ev);
    if (!delta || typeof delta !== "object") return; // skipped; the next base will not match
    if (!core.deltaFollows(version, delta)) {
      debug.gaps += 1;
      console.warn(
        "[vdm][sse] Delta out of sequence (holding version " + version + ", delta base " +
          delta.base + "): reconnecting for a fresh snapshot",
      );
      es.close();
      source = null;
      version = null; // drop the base: the reconnect asks for a fresh snapshot
      scheduleReconnect();
      return;
    }
    debug.deltas += 1;
    dom.observeServerTime(delta.timestamp);
    noteSync(delta);
    const tx = core.applyDelta(rows, delta, KEY);
    version = Number(delta.version);
    if (Array.isArray(delta.workers)) workers = delta.workers;
    dom.noteChunks(tx.add);
    dom.noteChunks(tx.update);
    dom.forgetChunks(tx.remove);
    if (!core.isEmptyTransaction(tx) && !gridSync.touch(tx)) {
      const api = dom.gridApi(GRID_ID);
      if (api) dom.queueTransaction(api, tx, rows.size);
      else gridSync.start(); // grid not mounted yet: it gets the whole map once it is
    }
    schedulePaint();
  }

  /**
   * Follow the hub's sync state. A change shows at once: the indicator's next tick reads it,
   * the rows are dimmed or restored, and durations stop (or resume) without waiting for the
   * once-a-second redraw.
   */
  function noteSync(frame) {
    sync = core.syncFrom(frame, sync);
    if (dom.observeSync(sync)) {
      debug.syncChanges += 1;
      if (haveData) dom.refreshClockColumns(GRID_ID, CLOCK_COLUMNS);
    }
  }

  function schedulePaint() {
    if (paintPending) return;
    paintPending = true;
    let ran = false;
    const run = function () {
      if (ran) return;
      ran = true;
      paintPending = false;
      paint();
    };
    if (document.visibilityState === "visible") {
      window.requestAnimationFrame(run);
      // A frame that never comes (a renderer that produces none for a while) must not hold
      // every later paint back: the timer paints anyway.
      window.setTimeout(run, 500);
    } else {
      window.setTimeout(run, 0);
    }
  }

  function paint() {
    const wait = paintedAt + PAINT_MS - Date.now();
    if (wait > 0) {
      if (!paintTimer) {
        paintTimer = window.setTimeout(function () {
          paintTimer = null;
          schedulePaint();
        }, wait);
      }
      return;
    }
    paintedAt = Date.now();
    const n = rows.size;
    const up = workers.filter((w) => w && w.status === "up").length;
    dom.setProps("vdm-m-kpi-inflight", { children: core.formatCount(n) });
    dom.setProps("vdm-m-kpi-workers", {
      children: workers.length ? up + " / " + workers.length : "0",
    });
    for (const fn of paintListeners) {
      try {
        fn();
      } catch (err) {
        console.debug("[vdm] paint listener failed:", err);
      }
    }
  }

  // The Recently finished grid is below the fold: it is mounted (an AG Grid costs ~0.1 s of
  // main thread) once the live grid holds its first snapshot, or after RECENT_LATEST_MS
  // whatever happens, so that it never waits on a stream that does not answer.
  const RECENT_LATEST_MS = 5000;

  function renderRecentGrid() {
    dom.renderDeferred("recent", "vdm-recent-box");
  }
  window.setTimeout(function latest() {
    // The layout may not be rendered yet on a slow machine: then again shortly.
    if (!dom.renderDeferred("recent", "vdm-recent-box") && "recent" in (window.__vdmPages || {})) {
      window.setTimeout(latest, 500);
    }
  }, RECENT_LATEST_MS);

  function onStats(ev) {
    const stats = parse(ev);
    if (!stats || typeof stats !== "object") return;
    if (window.VdmCharts) window.VdmCharts.render(stats);
    if (Array.isArray(stats.recent)) {
      dom.applyRows(RECENT_GRID_ID, core.recentRows(stats.recent), KEY, []).catch(function () {});
    }
  }

  function onDisabled(ev) {
    const info = parse(ev) || {};
    disabledInfo = {
      message: info.message || "Request metrics are disabled on the stream service.",
      suggestion: info.suggestion || "Set LOG_REQUEST_METRICS=true and restart it.",
    };
    console.warn("[vdm][sse] Metrics disabled, falling back to polling");
    if (source) {
      source.close();
      source = null;
    }
    showBanner();
    evaluate();
  }

  function showBanner() {
    if (disabledInfo) {
      dom.setProps("vdm-sse-banner", {
        children: disabledInfo.message + " " + disabledInfo.suggestion,
        className: "vdm-banner vdm-banner-shown",
      });
    } else {
      dom.setProps("vdm-sse-banner", { children: "", className: "vdm-banner" });
    }
  }

  // ---- polling fallback (after `disabled`) ------------------------------------------------

  function startPolling() {
    if (pollTimer) return;
    const tick = function () {
      pollTimer = window.setTimeout(tick, POLL_MS);
      pollOnce();
    };
    tick();
  }

  function stopPolling() {
    if (pollTimer) {
      window.clearTimeout(pollTimer);
      pollTimer = null;
    }
  }

  function pollOnce() {
    debug.polls += 1;
    fetch(core.joinUrl(cfg.streamUrl, core.SNAPSHOT_PATH), {
      cache: "no-store",
      credentials: cfg.withCredentials ? "include" : "same-origin",
    })
      .then((r) => (r.ok ? r.json() : null))
      .then(function (snap) {
        if (!snap || typeof snap !== "object") return;
        if (snap.disabled) {
          disabledInfo = {
            message: snap.message || disabledInfo.message,
            suggestion: snap.suggestion || disabledInfo.suggestion,
          };
          showBanner();
          return;
        }
        // Metrics were switched back on: show the rows and return to the live stream.
        acceptSnapshot(snap);
        disabledInfo = null;
        showBanner();
        stopPolling();
        evaluate();
      })
      .catch(function () {
        /* the next poll retries */
      });
  }

  // ---- triggers: visibility, SPA navigation, load -----------------------------------------

  // Dash's dcc.Link navigates with history.pushState, which fires no event: wrap it (and
  // replaceState) once, and announce every change as `vdm:locationchange`.
  ["pushState", "replaceState"].forEach(function (name) {
    const original = window.history[name];
    if (typeof original !== "function" || original.__vdmWrapped) return;
    const wrapped = function () {
      const result = original.apply(this, arguments);
      window.dispatchEvent(new Event("vdm:locationchange"));
      return result;
    };
    wrapped.__vdmWrapped = true;
    window.history[name] = wrapped;
  });

  document.addEventListener("visibilitychange", evaluate);
  window.addEventListener("popstate", evaluate);
  window.addEventListener("vdm:locationchange", evaluate);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", evaluate);
  } else {
    evaluate();
  }

  // Durations (and chunk rates, stuck marks) tick client-side: once a second, visible rows.
  window.setInterval(function () {
    if (document.visibilityState === "visible" && haveData) {
      dom.refreshClockColumns(GRID_ID, CLOCK_COLUMNS);
      dom.refreshStuck(GRID_ID);
    }
  }, 1000);

  // Read-only view of what the client holds, for the detail panel (06_vdm_operator.js).
  window.VdmLive = {
    row: (key) => rows.get(String(key)),
    worker: (id) => workers.find((w) => w && w.worker_id === id) || null,
    size: () => rows.size,
    onPaint: (fn) => paintListeners.push(fn),
    // Whether the grid is taking a snapshot in (other work waits: the charts), and a
    // listener for when it is done.
    loading: () => gridSync.running(),
    onLoaded: (fn) => loadedListeners.push(fn),
  };

  window.__vdmActiveRequestsSSE = {
    enable: function () {
      enabled = true;
      evaluate();
    },
    disable: function () {
      enabled = false;
      evaluate();
    },
    isConnected: isConnected,
    isDisabled: function () {
      return !!disabledInfo;
    },
    debug: function () {
      return {
        attempt: attempt,
        opens: debug.opens,
        errors: debug.errors,
        delays: debug.delays.slice(),
        polls: debug.polls,
        snapshots: debug.snapshots,
        deltas: debug.deltas,
        gaps: debug.gaps,
        sync: Object.assign({}, sync),
        syncChanges: debug.syncChanges,
        gridLoads: debug.gridLoads,
        gridSlices: debug.gridSlices,
        gridLoading: gridSync.running(),
        version: version,
        rows: rows.size,
        connecting: !!source && source.readyState === 0,
        reconnectPending: !!reconnectTimer,
        url: streamUrl(),
      };
    },
  };

  // The clientside callback behind the `● Live` / `◐ Stale — …` / `○ Reconnecting...`
  // indicator and the header emoji; it runs on a short dcc.Interval and only writes when
  // something changed.
  let lastIndicator = null;
  window.dash_clientside = Object.assign({}, window.dash_clientside);
  window.dash_clientside.vdm = Object.assign({}, window.dash_clientside.vdm, {
    syncIndicator: function () {
      const state = core.indicatorState(isConnected(), !!disabledInfo, sync);
      // The header emoji follows the page shown (the overview polls, it does not stream).
      const emoji = window.VdmHeader ? window.VdmHeader.emoji(state.emoji) : state.emoji;
      const key = state.text + "|" + state.className + "|" + emoji;
      if (key === lastIndicator) return window.dash_clientside.no_update;
      lastIndicator = key;
      return [state.text, state.className, emoji];
    },
  });
})();
