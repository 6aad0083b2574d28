/*
 * vdm-hub dashboard: the decision logic, as small pure functions.
 *
 * No DOM, no timers, no globals read: everything the browser client decides (when to connect,
 * how long to wait before a retry, what grid transaction a snapshot means, how a number is
 * shown) is a function of its arguments, so `node --test tests/js/` checks it directly.
 * Loaded first by Dash (assets load in file-name order) and exposed as `window.VdmCore`; in
 * Node it is a CommonJS module.
 */
(function (root, factory) {
  "use strict";
  const api = factory();
  if (typeof module === "object" && module && module.exports) {
    module.exports = api;
  }
  if (root && typeof root === "object") {
    root.VdmCore = api;
  }
})(typeof globalThis !== "undefined" ? globalThis : this, function () {
  "use strict";

  const METRICS_PATH = "/dashboard/metrics";
  const FINISHED_PATH = "/dashboard/finished";
  const STREAM_PATH = "/metrics/active-requests/stream";
  const SNAPSHOT_PATH = "/metrics/active-requests";
  const SUMMARY_PATH = "/metrics/summary";
  // What names a row: the stream service's `key`, unique in the fleet. A request id alone
  // does not: ids are unique per worker only, and a client's retry can put one id on two
  // workers at once (docs/protocol.md, SSE v2).
  const ROW_KEY = "key";

  // Reconnect backoff: the formula the README and docs/troubleshooting.md give operators.
  const BACKOFF_FACTOR_MS = 750;
  const BACKOFF_GROWTH = 1.6;
  const BACKOFF_CAP_MS = 30000;
  const BACKOFF_FLOOR_MS = 250;
  const BACKOFF_JITTER = 0.25;

  /** base = min(30000, 750 * 1.6^attempt) */
  function backoffBase(attempt) {
    const n = Math.max(0, Number(attempt) || 0);
    return Math.min(BACKOFF_CAP_MS, BACKOFF_FACTOR_MS * Math.pow(BACKOFF_GROWTH, n));
  }

  /** jitter = base * 0.25 * (rand * 2 - 1); delay = max(250, base + jitter). rand in [0, 1). */
  function backoffDelay(attempt, rand) {
    const base = backoffBase(attempt);
    const r = typeof rand === "number" ? rand : Math.random();
    const jitter = base * BACKOFF_JITTER * (r * 2 - 1);
    return Math.max(BACKOFF_FLOOR_MS, base + jitter);
  }

  /** Connect only when the tab is visible and the path is the metrics page. */
  function shouldConnect(visibilityState, pathname) {
    return visibilityState === "visible" && String(pathname || "").includes(METRICS_PATH);
  }

  /** The overview page polls the JSON endpoints instead: visible, neither metrics nor finished. */
  function shouldPollOverview(visibilityState, pathname) {
    const path = String(pathname || "");
    const other = path.includes(METRICS_PATH) || path.includes(FINISHED_PATH);
    return visibilityState === "visible" && !other;
  }

  /** Base URL from the server (may be "" = same origin) + an endpoint path. */
  function joinUrl(base, path) {
    const b = String(base || "").replace(/\/+$/, "");
    return b + path;
  }

  /**
   * The stream service's base URL for this page: `streamUrl` (VDM_STREAM_PUBLIC_URL) when set;
   * else, with `streamPort` (the dashboard's --stream-port), that port on the host this page
   * was loaded from, which only the browser knows (a remote viewer of `vdm-hub up --host
   * 0.0.0.0` names the machine its own way); else "" (the same origin).
   */
  function streamBase(config, location) {
    const url = String((config && config.streamUrl) || "");
    const port = Number(config && config.streamPort);
    if (url || !location || !Number.isInteger(port) || port < 1 || port > 65535) return url;
    return location.protocol + "//" + location.hostname + ":" + port;
  }

  /**
   * The stream the page opens: the delta stream (`?delta=1`: one snapshot, then only what
   * changed). A stream service that predates deltas ignores the parameter and sends snapshots
   * only, which the client handles exactly as before. `resumeFrom`, the version the client
   * holds, asks for a delta from there instead of a fresh snapshot: a new EventSource cannot
   * send `Last-Event-ID`, so it goes in the query (the service falls back to a snapshot when
   * it no longer has the changes since then).
   */
  function liveStreamUrl(base, resumeFrom) {
    const url = joinUrl(base, STREAM_PATH) + "?delta=1";
    const v = Number(resumeFrom);
    if (resumeFrom === null || resumeFrom === undefined || !Number.isSafeInteger(v) || v < 0) {
      return url;
    }
    return url + "&last_event_id=" + v;
  }

  // Fields that change on every snapshot without the request changing: the grid computes
  // durations itself (they tick client-side), so these never cause an update transaction.
  const VOLATILE_FIELDS = ["duration_ms"];

  function sameValue(a, b) {
    if (a === b) return true;
    // null and undefined both mean "unknown" on the wire.
    return a == null && b == null;
  }

  /** True when any field except the volatile ones differs between two rows. */
  function rowChanged(before, after, ignore) {
    const skip = new Set(ignore || VOLATILE_FIELDS);
    const names = new Set([...Object.keys(before || {}), ...Object.keys(after || {})]);
    for (const name of names) {
      if (skip.has(name)) continue;
      if (!sameValue(before ? before[name] : undefined, after ? after[name] : undefined)) {
        return true;
      }
    }
    return false;
  }

  /**
   * The grid transaction that turns what the grid holds into the snapshot.
   * `current`: Map (or plain object) id -> row as the grid holds it; `rows`: the snapshot.
   * `key`: the field that names a row (`key` unless given: `worker_id` for workers).
   * Rows without an id, and repeats of an id within the snapshot, are skipped (untrusted input).
   * Never a reset: only the rows that came, changed, or went.
   */
  function diffRows(current, rows, key, ignore) {
    const idKey = key || ROW_KEY;
    const have = current instanceof Map ? current : new Map(Object.entries(current || {}));
    const seen = new Set();
    const add = [];
    const update = [];
    for (const row of rows || []) {
      if (!row || typeof row !== "object") continue;
      const id = row[idKey];
      if (id === undefined || id === null || id === "") continue;
      const sid = String(id);
      if (seen.has(sid)) continue;
      seen.add(sid);
      if (!have.has(sid)) {
        add.push(row);
      } else if (rowChanged(have.get(sid), row, ignore)) {
        update.push(row);
      }
    }
    const remove = [];
    for (const id of have.keys()) {
      if (!seen.has(String(id))) remove.push({ [idKey]: id });
    }
    return { add, update, remove };
  }

  /** A row's id as a string, or null for a row that has none (skipped as untrusted input). */
  function rowId(row, key) {
    if (!row || typeof row !== "object") return null;
    const id = row[key || ROW_KEY];
    if (id === undefined || id === null || id === "") return null;
    return String(id);
  }

  /** The client's row map (id -> row) from a snapshot's rows; a repeated id keeps its first row. */
  function rowMapFrom(rows, key) {
    const map = new Map();
    for (const row of Array.isArray(rows) ? rows : []) {
      const id = rowId(row, key);
      if (id !== null && !map.has(id)) map.set(id, row);
    }
    return map;
  }

  /**
   * Whether a `delta` frame follows on from the version the client holds: only a delta whose
   * `base` is exactly that version may be applied. Anything else is a gap (the server never
   * sends one; if it happens the client resynchronises from a fresh snapshot).
   */
  function deltaFollows(heldVersion, delta) {
    if (!delta || typeof delta !== "object") return false;
    if (heldVersion === null || heldVersion === undefined) return false;
    const base = Number(delta.base);
    return Number.isFinite(base) && base === Number(heldVersion) && Number.isFinite(Number(delta.version));
  }

  /**
   * Apply a delta's `upsert` and `remove` (row keys) to the client's row map IN PLACE (a copy
   * of 10,000 rows per frame is the cost deltas exist to avoid) and return the grid transaction
   * that makes the grid follow: an upsert of a new id is an add, of a held id an update (only when
   * something besides the volatile fields changed), a remove of a held id a remove. Removes
   * apply before upserts (the protocol's order), so an id in both lists ends with its upserted
   * row; one transaction never holds a remove and an add of one id. Rows without an id are
   * skipped.
   */
  function applyDelta(map, delta, key, ignore) {
    const idKey = key || ROW_KEY;
    const add = [];
    const update = [];
    const remove = [];
    const upserts = new Map();
    for (const row of Array.isArray(delta && delta.upsert) ? delta.upsert : []) {
      const id = rowId(row, idKey);
      if (id !== null && !upserts.has(id)) upserts.set(id, row);
    }
    for (const raw of Array.isArray(delta && delta.remove) ? delta.remove : []) {
      if (raw === undefined || raw === null || raw === "") continue;
      const id = String(raw);
      if (upserts.has(id) || !map.has(id)) continue; // re-inserted below / never held
      map.delete(id);
      remove.push({ [idKey]: id });
    }
    for (const [id, row] of upserts) {
      const before = map.get(id);
      map.set(id, row);
      if (before === undefined) add.push(row);
      else if (rowChanged(before, row, ignore)) update.push(row);
    }
    return { add, update, remove };
  }

  /**
   * The grid transaction that brings the rows named by `ids` in line with the client's map:
   * an id the map holds and the grid does not is an add, one both hold is an update when it
   * changed (volatile fields aside), one only the grid holds is a remove. `held(id)` is the
   * grid's row for an id, or undefined. One slice of a sliced grid load (VdmDom.slicedSync):
   * it looks at the map as it is now, so an id queued twice, or changed by a delta while the
   * load runs, ends the same as if it had been reconciled once, at the end.
   */
  function reconcileRows(ids, map, held, key, ignore) {
    const idKey = key || ROW_KEY;
    const add = [];
    const update = [];
    const remove = [];
    for (const raw of ids || []) {
      const id = String(raw);
      const row = map.get(id);
      const before = held(id);
      if (row === undefined) {
        if (before !== undefined) remove.push({ [idKey]: id });
      } else if (before === undefined) {
        add.push(row);
      } else if (before !== row && rowChanged(before, row, ignore)) {
        update.push(row);
      }
    }
    return { add, update, remove };
  }

  // A sliced grid load: rows per slice to start with (about a screenful, so the rows in view
  // come first), the bounds of a slice, and the main-thread time one slice aims at. AG Grid's
  // cost of a transaction grows with the rows it adds plus a pass over the rows it holds, so
  // slices too small waste that pass; 25 ms keeps each task well under the 50 ms that makes a
  // "long task" on a quiet machine and under 200 ms on a loaded one.
  const SLICE_FIRST_ROWS = 200;
  const SLICE_MIN_ROWS = 100;
  const SLICE_MAX_ROWS = 5000;
  const SLICE_BUDGET_MS = 25;

  /**
   * Rows for the next slice, scaled from what the last one cost (`size` rows in `elapsedMs`)
   * to `budgetMs`, grown at most fourfold at a time (a cheap slice may have been all
   * no-op updates) and kept within the bounds above.
   */
  function nextSliceSize(size, elapsedMs, budgetMs) {
    const budget = Number(budgetMs) > 0 ? Number(budgetMs) : SLICE_BUDGET_MS;
    const n = Math.max(SLICE_MIN_ROWS, Number(size) || SLICE_FIRST_ROWS);
    const ms = Math.max(1, Number(elapsedMs) || 0);
    const scaled = Math.min(n * 4, Math.floor((n * budget) / ms));
    return Math.max(SLICE_MIN_ROWS, Math.min(SLICE_MAX_ROWS, scaled));
  }

  /**
   * The recently finished requests (`stats.recent`, newest first), each with a `key` for the
   * grid: a finished entry has no key of the stream's, and neither its request id (per worker)
   * nor (worker, request id) is unique among finished ones (a client may reuse an id on the
   * same worker later), so the key also holds its start time. Copies; entries that lack a
   * request id or worker are skipped (untrusted input).
   */
  function recentRows(entries) {
    const out = [];
    for (const e of Array.isArray(entries) ? entries : []) {
      if (!e || typeof e !== "object" || e.request_id == null || e.worker_id == null) continue;
      const key = JSON.stringify([String(e.worker_id), String(e.request_id), e.start_time]);
      out.push(Object.assign({}, e, { key: key }));
    }
    return out;
  }

  /**
   * How long AG Grid gathers async transactions before applying them together. Each batch
   * costs a pass over all rows (sort/filter/flatten) plus a redraw of the rows in view, so
   * at fleet scale fewer, larger batches are far cheaper for the same changes; a few rows
   * keep AG Grid's own 50 ms. 1,000 rows -> 50 ms, 5,000 -> 200 ms, 10,000+ -> 300 ms.
   */
  function batchWaitMs(rowCount) {
    const n = Math.max(0, Number(rowCount) || 0);
    return Math.round(Math.min(300, Math.max(50, n / 25)));
  }

  function isEmptyTransaction(tx) {
    return !tx || (tx.add.length === 0 && tx.update.length === 0 && tx.remove.length === 0);
  }

  /** Server clock minus browser clock, from a snapshot's `timestamp` (epoch seconds). */
  function clockOffsetMs(serverTimestampS, localNowMs) {
    const t = Number(serverTimestampS);
    if (!Number.isFinite(t) || t <= 0) return 0;
    return t * 1000 - localNowMs;
  }

  /**
   * Fold one clock sample into the running estimate. A snapshot's `timestamp` is when it was
   * built, and a cached snapshot can be re-sent unchanged later, so one sample can understate
   * the server clock by up to an interval; it never overstates it (bar network jitter). The
   * estimate is therefore the largest of the last `keep` samples: stale re-sends cannot drag
   * it back (durations would freeze), and a real clock change is followed within `keep`.
   * Returns the new sample list (newest last) and the offset to use.
   */
  function foldClockSample(samples, sampleMs, keep) {
    const limit = keep || 20;
    const next = (samples || []).concat(Number.isFinite(sampleMs) ? [sampleMs] : []);
    while (next.length > limit) next.shift();
    return { samples: next, offsetMs: next.length ? Math.max.apply(null, next) : 0 };
  }

  /** How long a request has run now, in server time, so a skewed browser clock does not lie. */
  function liveDurationMs(startTimeS, localNowMs, offsetMs) {
    const start = Number(startTimeS);
    if (!Number.isFinite(start) || start <= 0) return null;
    return Math.max(0, localNowMs + (offsetMs || 0) - start * 1000);
  }

  function ageSeconds(epochS, localNowMs, offsetMs) {
    const ms = liveDurationMs(epochS, localNowMs, offsetMs);
    return ms === null ? null : ms / 1000;
  }

  function pad2(n) {
    return n < 10 ? "0" + n : String(n);
  }

  /** 850 ms · 12.3 s · 4m 05s · 1h 02m */
  function formatDuration(ms) {
    if (ms === null || ms === undefined || !Number.isFinite(Number(ms))) return "—";
    const v = Math.max(0, Number(ms));
    if (v < 1000) return Math.round(v) + " ms";
    if (v < 60000) return (v / 1000).toFixed(1) + " s";
    const totalS = Math.floor(v / 1000);
    if (totalS < 3600) return Math.floor(totalS / 60) + "m " + pad2(totalS % 60) + "s";
    const totalM = Math.floor(totalS / 60);
    return Math.floor(totalM / 60) + "h " + pad2(totalM % 60) + "m";
  }

  /** 0 B · 512 B · 1.5 KB · 2.0 MB (1024-based) */
  function formatBytes(n) {
    if (n === null || n === undefined || !Number.isFinite(Number(n))) return "—";
    let v = Math.max(0, Number(n));
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return i === 0 ? Math.round(v) + " B" : v.toFixed(1) + " " + units[i];
  }

  /** 1234567 -> "1,234,567"; null -> "—" (unknown, e.g. tokens before usage arrives). */
  function formatCount(n) {
    if (n === null || n === undefined || !Number.isFinite(Number(n))) return "—";
    const s = String(Math.round(Number(n)));
    return s.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  function formatRate(perSecond) {
    if (perSecond === null || perSecond === undefined || !Number.isFinite(Number(perSecond))) {
      return "—";
    }
    const v = Number(perSecond);
    return (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + "/s";
  }

  /** error_rate is a fraction (0..1) */
  function formatPercent(fraction) {
    if (fraction === null || fraction === undefined || !Number.isFinite(Number(fraction))) {
      return "—";
    }
    return (Number(fraction) * 100).toFixed(1) + "%";
  }

  /** Epoch seconds -> local HH:MM:SS. */
  function formatClock(epochS) {
    const t = Number(epochS);
    if (!Number.isFinite(t) || t <= 0) return "—";
    const d = new Date(t * 1000);
    return pad2(d.getHours()) + ":" + pad2(d.getMinutes()) + ":" + pad2(d.getSeconds());
  }

  // The hub's word on its view (`sync` in every update, delta and JSON snapshot): while it is
  // "stale" the stream still flows, but the view may be out of date (Redis unreachable,
  // frozen, refusing writes...), so the page says so rather than `● Live`.
  const SYNC_OK = Object.freeze({ stale: false, sinceS: null, reason: null });
  const MAX_REASON_CHARS = 120;

  /**
   * The sync state a frame announces, or `previous` when it says nothing (a stream service
   * that predates the field is taken to be in sync). Untrusted input: only a frame that says
   * exactly "stale" is stale; `sync_since` (epoch s) and `sync_reason` are checked.
   */
  function syncFrom(frame, previous) {
    if (!frame || typeof frame !== "object" || frame.sync === undefined) {
      return previous || SYNC_OK;
    }
    const since = Number(frame.sync_since);
    const stale = frame.sync === "stale";
    const reason = frame.sync_reason;
    return {
      stale: stale,
      sinceS: Number.isFinite(since) && since > 0 ? since : null,
      reason: stale && typeof reason === "string" && reason ? reason.slice(0, MAX_REASON_CHARS) : null,
    };
  }

  function sameSync(a, b) {
    const x = a || SYNC_OK;
    const y = b || SYNC_OK;
    return x.stale === y.stale && x.sinceS === y.sinceS && x.reason === y.reason;
  }

  /**
   * The local time (ms) at which clock-driven cells (durations, ages, stuck marks) are
   * computed: now, or while the view is stale no later than the last moment the hub confirmed
   * it (`sinceS`, server clock, brought to the local clock with the offset) — a frozen view
   * must not show its requests growing older than anything real.
   */
  function shownNowMs(localNowMs, offsetMs, sync) {
    if (!sync || !sync.stale || sync.sinceS === null || sync.sinceS === undefined) {
      return localNowMs;
    }
    return Math.min(localNowMs, sync.sinceS * 1000 - (offsetMs || 0));
  }

  /** "◐ Stale — Redis unreachable since 12:01:05" */
  function staleText(sync) {
    const why = (sync && sync.reason) || "out of sync with Redis";
    const since = sync && sync.sinceS ? " since " + formatClock(sync.sinceS) : "";
    return "◐ Stale — " + why + since;
  }

  /**
   * What the indicator and the header emoji show. `sync` (from `syncFrom`) matters only while
   * connected: a stale view is not `● Live`.
   */
  function indicatorState(connected, disabled, sync) {
    if (connected && sync && sync.stale) {
      return { text: staleText(sync), className: "vdm-indicator vdm-stale", emoji: "⚠️" };
    }
    if (connected) return { text: "● Live", className: "vdm-indicator vdm-live", emoji: "📡" };
    if (disabled) {
      return {
        text: "◌ Metrics disabled (polling)",
        className: "vdm-indicator vdm-polling",
        emoji: "⚫",
      };
    }
    return { text: "○ Reconnecting...", className: "vdm-indicator vdm-reconnecting", emoji: "⚫" };
  }

  // Chart figures from a `stats` event. Colours follow the CSS palette in vdm.css.
  const CHART_COLORS = {
    inflight: "#58a6ff",
    rate: "#3fb950",
    p50: "#8b949e",
    p95: "#d29922",
    p99: "#f85149",
    errors: "#f85149",
    ttftP50: "#a371f7",
    ttftP95: "#db61a2",
    cancelled: "#d29922",
    closed: "#8b949e",
  };

  /**
   * A chart's layout. Legible on any screen: x labels are horizontal clock times, at most a
   * few of them (a narrow chart had them rotated and cut to "000"); a legend, when the chart
   * has more than one series, sits under the plot where it cannot cover a line.
   */
  function chartLayout(yTitle, options) {
    const o = options || {};
    const legend = !!o.legend;
    const layout = {
      margin: { l: 48, r: o.y2Title ? 44 : 12, t: 8, b: legend ? 58 : 28 },
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "rgba(0,0,0,0)",
      font: { color: "#9aa7b4", size: 12 },
      showlegend: legend,
      legend: { orientation: "h", x: 0, xanchor: "left", y: -0.24, yanchor: "top", font: { size: 11 } },
      xaxis: {
        type: "date",
        tickformat: "%H:%M:%S",
        tickangle: 0,
        nticks: 5,
        gridcolor: "#212a35",
        zeroline: false,
        showline: false,
      },
      yaxis: {
        title: { text: yTitle, font: { size: 11 } },
        gridcolor: "#212a35",
        zeroline: false,
        rangemode: "tozero",
        range: o.yRange,
        fixedrange: true,
      },
      uirevision: "vdm", // keep the user's zoom across updates
      height: 210,
    };
    if (o.y2Title) {
      layout.yaxis2 = {
        title: { text: o.y2Title, font: { size: 11 } },
        overlaying: "y",
        side: "right",
        showgrid: false,
        zeroline: false,
        rangemode: "tozero",
        fixedrange: true,
      };
    }
    return layout;
  }

  function line(name, xs, ys, color, fill, dash, unit) {
    return {
      type: "scatter",
      mode: "lines",
      name: name,
      x: xs,
      y: ys,
      line: { color: color, width: 2, shape: "linear", dash: dash || "solid" },
      fill: fill ? "tozeroy" : "none",
      fillcolor: fill ? color + "22" : undefined,
      hovertemplate: "%{y:.3~f}" + (unit || "") + "<extra>" + name + "</extra>",
    };
  }

  /** Seconds between series points: the stats' `step_s`, else the points' own spacing. */
  function seriesStep(stats, series) {
    const step = Number(stats && stats.step_s);
    if (Number.isFinite(step) && step > 0) return step;
    for (let i = 1; i < series.length; i += 1) {
      const gap = Number(series[i].t) - Number(series[i - 1].t);
      if (gap > 0) return gap;
    }
    return 1;
  }

  function statsFigures(stats) {
    const series = (stats && Array.isArray(stats.series) ? stats.series : []).filter(
      (p) => p && Number.isFinite(Number(p.t)),
    );
    const xs = series.map((p) => new Date(Number(p.t) * 1000).toISOString());
    const col = (name, scale) =>
      series.map((p) => (p[name] === null || p[name] === undefined ? null : p[name] * (scale || 1)));
    // Durations in seconds: "4000" on a latency axis read as a count, "4 s" does not.
    const latency = [
      line("p50", xs, col("p50_ms", 0.001), CHART_COLORS.p50, false, null, " s"),
      line("p95", xs, col("p95_ms", 0.001), CHART_COLORS.p95, false, null, " s"),
      line("p99", xs, col("p99_ms", 0.001), CHART_COLORS.p99, false, null, " s"),
    ];
    // Time to first token, dashed on the same axis, only when the stream service reports it
    // (older services do not; an empty line in the legend would suggest a zero).
    const hasTtft = series.some((p) => p.ttft_p50_ms != null || p.ttft_p95_ms != null);
    if (hasTtft) {
      const ttft50 = col("ttft_p50_ms", 0.001);
      const ttft95 = col("ttft_p95_ms", 0.001);
      latency.push(line("TTFT p50", xs, ttft50, CHART_COLORS.ttftP50, false, "dot", " s"));
      latency.push(line("TTFT p95", xs, ttft95, CHART_COLORS.ttftP95, false, "dot", " s"));
    }
    // Cancelled and client-closed requests are not errors: their own series, per second like
    // the request rate, only when the stream service counts them (older ones do not).
    const rate = [line("finished/s", xs, col("requests_per_s"), CHART_COLORS.rate, true, null, "/s")];
    if (series.some((p) => p.cancelled != null || p.client_closed != null)) {
      const perS = 1 / seriesStep(stats, series);
      rate.push(line("cancelled/s", xs, col("cancelled", perS), CHART_COLORS.cancelled, false, null, "/s"));
      rate.push(line("client closed/s", xs, col("client_closed", perS), CHART_COLORS.closed, false, "dot", "/s"));
    }
    return {
      inflight: {
        data: [line("in flight", xs, col("in_flight"), CHART_COLORS.inflight, true)],
        layout: chartLayout("requests"),
      },
      rate: { data: rate, layout: chartLayout("req/s", { legend: rate.length > 1 }) },
      latency: { data: latency, layout: chartLayout("seconds", { legend: true }) },
      errors: {
        data: [line("error %", xs, col("error_rate", 100), CHART_COLORS.errors, true, null, "%")],
        layout: chartLayout("% of finished"),
      },
    };
  }

  /** Overview grid rows: the snapshot's workers joined with their per-worker stats. */
  function workerRows(snapshot, stats) {
    const workers = snapshot && Array.isArray(snapshot.workers) ? snapshot.workers : [];
    const byWorker = (stats && stats.by_worker) || {};
    return workers
      .filter((w) => w && w.worker_id)
      .map((w) => {
        const s = byWorker[w.worker_id] || {};
        return {
          worker_id: w.worker_id,
          host: w.host,
          pid: w.pid,
          status: w.status,
          started_at: w.started_at,
          last_seen: w.last_seen,
          active: w.active,
          requests_per_s: s.requests_per_s === undefined ? null : s.requests_per_s,
          error_rate: s.error_rate === undefined ? null : s.error_rate,
          p95_ms: s.p95_ms === undefined ? null : s.p95_ms,
        };
      });
  }

  /** Fleet totals for the KPI tiles. */
  function fleetTotals(snapshot, stats) {
    const workers = snapshot && Array.isArray(snapshot.workers) ? snapshot.workers : [];
    const rows = snapshot && Array.isArray(snapshot.active_requests) ? snapshot.active_requests : [];
    const fleet = (stats && stats.fleet) || {};
    return {
      workersUp: workers.filter((w) => w && w.status === "up").length,
      workersStale: workers.filter((w) => w && w.status === "stale").length,
      inFlight: rows.length,
      requestsPerS: fleet.requests_per_s === undefined ? null : fleet.requests_per_s,
      errorRate: fleet.error_rate === undefined ? null : fleet.error_rate,
      cancelled: fleet.cancelled === undefined ? null : fleet.cancelled,
      clientClosed: fleet.client_closed === undefined ? null : fleet.client_closed,
      p95Ms: fleet.p95_ms === undefined ? null : fleet.p95_ms,
      completed: fleet.completed === undefined ? null : fleet.completed,
    };
  }

  return {
    METRICS_PATH,
    STREAM_PATH,
    SNAPSHOT_PATH,
    SUMMARY_PATH,
    ROW_KEY,
    backoffBase,
    backoffDelay,
    shouldConnect,
    shouldPollOverview,
    joinUrl,
    streamBase,
    liveStreamUrl,
    rowChanged,
    diffRows,
    rowId,
    rowMapFrom,
    deltaFollows,
    applyDelta,
    reconcileRows,
    SLICE_FIRST_ROWS,
    SLICE_BUDGET_MS,
    nextSliceSize,
    recentRows,
    batchWaitMs,
    isEmptyTransaction,
    clockOffsetMs,
    foldClockSample,
    liveDurationMs,
    ageSeconds,
    formatDuration,
    formatBytes,
    formatCount,
    formatRate,
    formatPercent,
    formatClock,
    SYNC_OK,
    syncFrom,
    sameSync,
    shownNowMs,
    staleText,
    indicatorState,
    statsFigures,
    workerRows,
    fleetTotals,
  };
});
