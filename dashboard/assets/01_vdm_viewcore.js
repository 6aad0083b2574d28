/*
 * vdm-hub dashboard: what the views say about a row or the page, as pure functions (beside
 * 01_vdm_core.js and 01_vdm_opcore.js): the Active Requests count badge, the header emoji,
 * stalled streams and the wait for a first token, output tokens per second of a finished
 * request, and the Finished view's search in the page URL and the API's query.
 *
 * No DOM, no timers, no globals read; `node --test tests/js/` checks it. Exposed as
 * `window.VdmViewCore`; in Node it is a CommonJS module.
 */
(function (root, factory) {
  "use strict";
  const api = factory();
  if (typeof module === "object" && module && module.exports) {
    module.exports = api;
  }
  if (root && typeof root === "object") {
    root.VdmViewCore = api;
  }
})(typeof globalThis !== "undefined" ? globalThis : this, function () {
  "use strict";

  const FINISHED_PATH = "/dashboard/finished";
  const COMPLETED_PATH = "/metrics/completed";
  const DEFAULT_STALL_AFTER_S = 30;
  // A finished request whose output took less than this after its first token came at once
  // (not streamed, or one chunk): there is no generation time to divide by.
  const MIN_STREAM_SPAN_MS = 250;

  function num(v) {
    if (v === null || v === undefined || v === "" || typeof v === "boolean") return null;
    const n = Number(v);
    return Number.isFinite(n) ? n : null;
  }

  /** The Active Requests badge: "8", or "3 of 8" while a filter is on (even "8 of 8"). */
  function countBadge(total, shown, filtered) {
    const t = Math.max(0, num(total) || 0);
    if (!filtered) return String(t);
    const s = Math.max(0, num(shown) || 0);
    return s + " of " + t;
  }

  /**
   * The header emoji for the page shown (`page`: "metrics", "overview" or "finished"): on the
   * live page what its stream says (`streamEmoji`: 📡 live, ⚠️ stale, ⚫ not connected); on the
   * others 📡 while they get fresh data from the stream service (the overview: its last poll
   * answered; the Finished view: its last search answered), ⚫ otherwise.
   */
  function headerEmoji(page, state) {
    const s = state || {};
    if (page === "metrics") return s.streamEmoji || "⚫";
    const fresh = page === "overview" ? !!s.overviewOk : !!s.finishedOk;
    return fresh ? "📡" : "⚫";
  }

  /** The "Cancelled · closed" tile: "2 · 5" over the window, "—" when not counted. */
  function abortedText(cancelled, clientClosed) {
    const c = num(cancelled);
    const k = num(clientClosed);
    if (c === null && k === null) return "—";
    return (c === null ? "—" : String(c)) + " · " + (k === null ? "—" : String(k));
  }

  /** Which page a path shows (the layout holds all three; see dashboard/app.py). */
  function pageOf(pathname) {
    const path = String(pathname || "");
    if (path.includes(FINISHED_PATH)) return "finished";
    if (path.includes("/dashboard/metrics")) return "metrics";
    return "overview";
  }

  function elapsedMs(epochS, nowMs, offsetMs) {
    const t = num(epochS);
    if (t === null || t <= 0) return null;
    return Math.max(0, nowMs + (offsetMs || 0) - t * 1000);
  }

  function isStream(row) {
    return !!row && (row.is_streaming === true || num(row.chunks_out) !== null);
  }

  /**
   * A streaming row that got its first token and has sent nothing since for longer than the
   * stream service's VDM_STALL_AFTER: {silentMs} (how long it has been silent), else null.
   * "Silent since" is `last_output_at` (epoch s of the last output event, from the worker);
   * a row without it (an older worker) is never called stalled.
   */
  function stalled(row, nowMs, offsetMs, stallAfterS) {
    const limit = num(stallAfterS);
    if (!isStream(row) || limit === null || limit <= 0 || num(row.ttft_ms) === null) return null;
    const silent = elapsedMs(row.last_output_at, nowMs, offsetMs);
    return silent !== null && silent > limit * 1000 ? { silentMs: silent } : null;
  }

  /** How long a row has waited for its first token (ms), or null once it has one. */
  function waitingMs(row, nowMs, offsetMs) {
    if (!row || num(row.ttft_ms) !== null) return null;
    return elapsedMs(row.start_time, nowMs, offsetMs);
  }

  /** What the Phase column shows: "stalled" for a stalled stream, else the row's phase. */
  function phaseShown(row, nowMs, offsetMs, stallAfterS) {
    if (!row) return null;
    return stalled(row, nowMs, offsetMs, stallAfterS) ? "stalled" : row.phase;
  }

  /**
   * Output tokens per second of a finished request and what they are over, or null:
   * - basis "stream": tokens over the time from the first token to the end (the generation
   *   speed), when that span is at least MIN_STREAM_SPAN_MS;
   * - basis "total": tokens over the whole duration, for a response that came at once (its
   *   first token was within MIN_STREAM_SPAN_MS of its end: dividing by that sliver gave
   *   51,282/s), or when the entry has no time to first token.
   * An entry that says `is_streaming: false` is always "total".
   */
  function tokensPerS(entry) {
    if (!entry) return null;
    const tokens = num(entry.output_tokens);
    const duration = num(entry.duration_ms);
    if (tokens === null || duration === null || duration <= 0) return null;
    const ttft = num(entry.ttft_ms);
    const span = ttft === null ? 0 : duration - ttft;
    if (entry.is_streaming !== false && span >= MIN_STREAM_SPAN_MS) {
      return { value: tokens / (span / 1000), basis: "stream" };
    }
    return { value: tokens / (duration / 1000), basis: "total" };
  }

  /** The text of a tokensPerS result: "42.0/s", or "12.3/s avg" over the whole duration. */
  function tokensPerSText(rate, formatRate) {
    if (!rate) return "—";
    const text = formatRate(rate.value);
    return rate.basis === "stream" ? text : text + " avg";
  }

  // ---- the Finished view's search ---------------------------------------------------------

  // Page URL parameter <-> API parameter. The page uses the live grid's short names.
  const FINISHED_FIELDS = [
    { param: "request", api: "request_id" },
    { param: "worker", api: "worker_id" },
    { param: "model", api: "model" },
    { param: "outcome", api: "outcome" },
    { param: "status", api: "status" },
    { param: "since", api: "since" },
    { param: "until", api: "until" },
  ];
  const OUTCOMES = ["ok", "error", "upstream_error", "client_closed", "cancelled"];

  function cleanValue(param, raw) {
    if (raw === null || raw === undefined) return "";
    const text = String(raw).trim();
    if (text === "") return "";
    if (param === "outcome") return OUTCOMES.includes(text) ? text : "";
    if (param === "status") return /^\d{1,3}$/.test(text) ? text : "";
    if (param === "since" || param === "until") {
      const n = num(text);
      return n !== null && n >= 0 ? String(n) : "";
    }
    return text.slice(0, 128);
  }

  /** The search a page query string asks for: {request, worker, …} ("" when not given). */
  function finishedFromSearch(search) {
    const params = new URLSearchParams(search || "");
    const values = {};
    for (const f of FINISHED_FIELDS) values[f.param] = cleanValue(f.param, params.get(f.param));
    return values;
  }

  /** The page query string for a search: only the fields that are set; "" or "?…". */
  function finishedToSearch(values) {
    const params = new URLSearchParams();
    for (const f of FINISHED_FIELDS) {
      const v = cleanValue(f.param, values ? values[f.param] : "");
      if (v !== "") params.set(f.param, v);
    }
    const text = params.toString();
    return text ? "?" + text : "";
  }

  /** `GET /metrics/completed`'s query for a search (and the cursor to continue from). */
  function completedQuery(values, before, limit) {
    const params = new URLSearchParams();
    for (const f of FINISHED_FIELDS) {
      const v = cleanValue(f.param, values ? values[f.param] : "");
      if (v !== "") params.set(f.api, v);
    }
    if (limit) params.set("limit", String(limit));
    if (before) params.set("before", String(before));
    return COMPLETED_PATH + "?" + params.toString();
  }

  /** The line under the Finished view's form after an answer. */
  function finishedStatus(count, next, scanned) {
    const n = Math.max(0, num(count) || 0);
    const found = n === 0 ? "No finished request matches" : n === 1 ? "1 request" : n + " requests";
    if (!next) return n === 0 ? found + "." : found + ", newest first; that is all.";
    const examined = num(scanned);
    const more = examined !== null ? " (the last search examined " + examined + " entries)" : "";
    return found + " so far" + more + ": Load more to search further back.";
  }

  return {
    FINISHED_PATH,
    COMPLETED_PATH,
    DEFAULT_STALL_AFTER_S,
    MIN_STREAM_SPAN_MS,
    OUTCOMES,
    FINISHED_FIELDS,
    countBadge,
    abortedText,
    headerEmoji,
    pageOf,
    stalled,
    waitingMs,
    phaseShown,
    tokensPerS,
    tokensPerSText,
    finishedFromSearch,
    finishedToSearch,
    completedQuery,
    finishedStatus,
  };
});
