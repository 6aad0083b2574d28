/*
 * vdm-hub dashboard: the operator features' decision logic, as pure functions (like
 * 01_vdm_core.js, which it sits beside): what the stream service says it can do, when a row is
 * stuck, live chunk and token rates, the detail panel's fields, the cancel result notice, and
 * the grid view (filters, sort) written to and read from the page URL.
 *
 * No DOM, no timers, no globals read; `node --test tests/js/` checks it. Exposed as
 * `window.VdmOpCore`; in Node it is a CommonJS module.
 */
(function (root, factory) {
  "use strict";
  const api = factory();
  if (typeof module === "object" && module && module.exports) {
    module.exports = api;
  }
  if (root && typeof root === "object") {
    root.VdmOpCore = api;
  }
})(typeof globalThis !== "undefined" ? globalThis : this, function () {
  "use strict";

  const CAPABILITIES_PATH = "/metrics/capabilities";
  const DEFAULT_STUCK_AFTER_S = 300;
  const DEFAULT_STALL_AFTER_S = 30;

  function num(v) {
    if (v === null || v === undefined || v === "" || typeof v === "boolean") return null;
    const n = Number(v);
    return Number.isFinite(n) ? n : null;
  }

  /**
   * The cancel of one row: its request id in the path and its worker as `worker_id`, so the
   * stream service acts on exactly that row even when another worker holds the same request id
   * (a client's retry; asked without a worker, such an id is refused as ambiguous).
   */
  function cancelPath(requestId, workerId) {
    const path = "/metrics/active-requests/" + encodeURIComponent(String(requestId)) + "/cancel";
    if (workerId === undefined || workerId === null || workerId === "") return path;
    return path + "?worker_id=" + encodeURIComponent(String(workerId));
  }

  /**
   * Whether the page offers Cancel on a row: the service allows it and the row's worker can
   * stop its requests (`cancellable` in the stream's worker object; a worker object without
   * it, or none yet, comes from an older service or worker, which can).
   */
  function cancelOffered(caps, worker) {
    return !!caps && caps.cancelEnabled === true && !(worker && worker.cancellable === false);
  }

  /**
   * `GET /metrics/capabilities` -> what the page offers. Anything missing or malformed (an
   * older stream service answers 404) means: no cancel, the default stuck and stall thresholds.
   */
  function capabilitiesFrom(body) {
    const b = body && typeof body === "object" ? body : {};
    const stuck = num(b.stuck_after_s);
    const stall = num(b.stall_after_s);
    return {
      cancelEnabled: b.cancel_enabled === true,
      stuckAfterS: stuck !== null && stuck > 0 ? stuck : DEFAULT_STUCK_AFTER_S,
      stallAfterS: stall !== null && stall > 0 ? stall : DEFAULT_STALL_AFTER_S,
      delta: b.delta === true,
    };
  }

  /** Milliseconds since `startTimeS` (epoch s) in server time; null when unknown. */
  function elapsedMs(startTimeS, nowMs, offsetMs) {
    const start = num(startTimeS);
    if (start === null || start <= 0) return null;
    return Math.max(0, nowMs + (offsetMs || 0) - start * 1000);
  }

  /** A row is stuck once it has run longer than the service's threshold (VDM_STUCK_AFTER). */
  function isStuck(startTimeS, nowMs, offsetMs, stuckAfterS) {
    const limit = num(stuckAfterS);
    const ms = elapsedMs(startTimeS, nowMs, offsetMs);
    return limit !== null && limit > 0 && ms !== null && ms > limit * 1000;
  }

  // Chunk-rate history per row: samples {t (local ms), c (chunks_out)}, oldest first, covering
  // the last RATE_WINDOW_MS plus one sample before it as the baseline.
  const RATE_WINDOW_MS = 5000;
  const MAX_SAMPLES = 64;

  /** The row's history with one more observation of `chunks` at `nowMs` (a new array). */
  function noteChunks(samples, chunks, nowMs, windowMs) {
    const c = num(chunks);
    const list = Array.isArray(samples) ? samples.slice() : [];
    if (c === null) return list;
    if (list.length && c < list[list.length - 1].c) list.length = 0; // counter went back
    const tail = list[list.length - 1];
    if (!tail || tail.c !== c) list.push({ t: nowMs, c: c });
    return pruneSamples(list, nowMs, windowMs);
  }

  function pruneSamples(list, nowMs, windowMs) {
    const start = nowMs - (windowMs || RATE_WINDOW_MS);
    // Keep one sample at or before the window's start as the baseline.
    while (list.length > 2 && list[1].t <= start) list.shift();
    while (list.length > MAX_SAMPLES) list.shift();
    return list;
  }

  /**
   * Live chunks/s of a streaming row: chunks forwarded in the last few seconds over the time
   * since the baseline sample, measured up to now, so a stream that stalls decays towards 0
   * instead of showing its last speed forever (0 after a window without a chunk). With one
   * recent sample only (the row was just seen),
   * the average since the first byte: chunks_out / (elapsed - ttft). Null for a row that is
   * not streaming or has no chunk count.
   */
  function chunkRate(samples, row, nowMs, offsetMs, windowMs) {
    if (!row || row.is_streaming !== true) return null;
    const chunks = num(row.chunks_out);
    if (chunks === null) return null;
    const list = Array.isArray(samples) ? samples : [];
    const start = nowMs - (windowMs || RATE_WINDOW_MS);
    // Baseline: the newest sample at or before the window's start, else the oldest one.
    let base = list.length ? list[0] : null;
    for (const s of list) {
      if (s.t > start) break;
      base = s;
    }
    const last = list[list.length - 1];
    if (base && last && base !== last && nowMs > base.t) {
      return Math.max(0, (last.c - base.c) / ((nowMs - base.t) / 1000));
    }
    if (last && last.t <= start) return 0; // no chunk for a whole window: stalled
    const ttft = num(row.ttft_ms);
    const elapsed = elapsedMs(row.start_time, nowMs, offsetMs);
    if (ttft === null || elapsed === null || elapsed - ttft <= 0) return null;
    return chunks / ((elapsed - ttft) / 1000);
  }

  /**
   * What a cancel attempt's answer means to the operator: {kind: ok|warn|error, text}.
   * `status` 0 is a network failure (no answer at all).
   */
  function cancelNotice(status, body, requestId) {
    const b = body && typeof body === "object" ? body : {};
    const id = String(requestId);
    if (status === 202) {
      const where = b.worker_id ? " on " + b.worker_id : "";
      return {
        kind: "ok",
        text: "Cancel requested for " + id + where + "; the row goes when the worker ends it.",
      };
    }
    if (status === 404) {
      return { kind: "warn", text: id + " is no longer in flight (it may have finished already)." };
    }
    if (status === 403 && b.error === "cancel_disabled") {
      return {
        kind: "error",
        text: "Cancel is disabled on the stream service. " + (b.suggestion || ""),
      };
    }
    if (status === 401) {
      return { kind: "error", text: "Not logged in (401): log in again to cancel requests." };
    }
    if (status === 0) {
      return { kind: "error", text: "Cancel failed: the stream service did not answer." };
    }
    const detail = b.message ? ": " + b.message : "";
    return { kind: "error", text: "Cancel failed (HTTP " + status + ")" + detail };
  }

  // ---- the grid view in the page URL -------------------------------------------------------

  // Query parameter <-> grid column. Short names so a link reads well: ?model=gpt&worker=w1.
  const URL_COLUMNS = [
    { param: "model", colId: "model", kind: "text" },
    { param: "worker", colId: "worker_id", kind: "text" },
    { param: "method", colId: "method", kind: "text" },
    { param: "path", colId: "path", kind: "text" },
    { param: "phase", colId: "phase", kind: "text" },
    { param: "request", colId: "request_id", kind: "text" },
    { param: "duration", colId: "duration", kind: "number" },
    { param: "ttft", colId: "ttft_ms", kind: "number" },
    { param: "bytes", colId: "bytes_out", kind: "number" },
    { param: "started", colId: "start_time" },
    { param: "tokens_in", colId: "input_tokens" },
    { param: "tokens_out", colId: "output_tokens" },
    { param: "chunks", colId: "chunk_rate" },
    { param: "stream", colId: "is_streaming" },
    { param: "labels", colId: "labels", kind: "text" },
  ];
  const DEFAULT_SORT = [{ colId: "start_time", sort: "desc" }];
  // The floating filter's own type for each kind: a value with that type needs no prefix.
  const DEFAULT_TYPE = { text: "contains", number: "equals" };
  const TYPES = {
    text: ["contains", "notContains", "equals", "notEqual", "startsWith", "endsWith", "blank", "notBlank"],
    number: [
      "equals",
      "notEqual",
      "greaterThan",
      "greaterThanOrEqual",
      "lessThan",
      "lessThanOrEqual",
      "blank",
      "notBlank",
    ],
  };
  const NO_VALUE = new Set(["blank", "notBlank"]);

  function byParam(param) {
    return URL_COLUMNS.find((c) => c.param === param) || null;
  }

  function byColId(colId) {
    return URL_COLUMNS.find((c) => c.colId === colId) || null;
  }

  /** One simple column filter -> its query value ("gpt", "greaterThan:5000"); null if not one. */
  function encodeFilter(kind, model) {
    if (!model || typeof model !== "object" || model.operator || !TYPES[kind]) return null;
    const type = model.type || DEFAULT_TYPE[kind];
    if (!TYPES[kind].includes(type)) return null;
    if (NO_VALUE.has(type)) return type + ":";
    if (model.filter === null || model.filter === undefined || model.filter === "") return null;
    const value = String(model.filter);
    // A value that itself looks like "<type>:..." keeps an explicit prefix to stay unambiguous.
    const prefixed = TYPES[kind].some((t) => value.startsWith(t + ":"));
    return type === DEFAULT_TYPE[kind] && !prefixed ? value : type + ":" + value;
  }

  /** A query value -> the AG Grid filter model for a column of `kind`; null if unusable. */
  function decodeFilter(kind, raw) {
    if (!TYPES[kind] || raw === null || raw === undefined) return null;
    let text = String(raw);
    let type = DEFAULT_TYPE[kind];
    const colon = text.indexOf(":");
    if (colon > 0 && TYPES[kind].includes(text.slice(0, colon))) {
      type = text.slice(0, colon);
      text = text.slice(colon + 1);
    }
    const filterType = kind === "number" ? "number" : "text";
    if (NO_VALUE.has(type)) return { filterType: filterType, type: type };
    if (text === "") return null;
    if (kind === "number") {
      const n = num(text);
      return n === null ? null : { filterType: filterType, type: type, filter: n };
    }
    return { filterType: filterType, type: type, filter: text };
  }

  function sortToParam(sort) {
    const list = (sort || []).filter((s) => s && (s.sort === "asc" || s.sort === "desc"));
    if (list.length === 0) return "none";
    const parts = [];
    for (const s of list) {
      const col = byColId(s.colId);
      if (!col) return null; // a column the URL cannot name: leave the sort out of the URL
      parts.push((s.sort === "desc" ? "-" : "") + col.param);
    }
    return parts.join(",");
  }

  function sameSort(a, b) {
    return (
      a.length === b.length && a.every((s, i) => s.colId === b[i].colId && s.sort === b[i].sort)
    );
  }

  /**
   * The page's query string for the grid view: every simple column filter as `param=value`,
   * the sort as `sort=model,-duration` (omitted when it is the default, newest first;
   * `sort=none` when the user cleared it). Parameters the grid does not own are kept.
   * `sort` is a list of {colId, sort} in sort order. Returns "" or "?…".
   */
  function viewToSearch(search, filterModel, sort) {
    const params = new URLSearchParams(search || "");
    for (const col of URL_COLUMNS) params.delete(col.param);
    params.delete("sort");
    const filters = filterModel && typeof filterModel === "object" ? filterModel : {};
    for (const col of URL_COLUMNS) {
      if (!col.kind || !filters[col.colId]) continue;
      const value = encodeFilter(col.kind, filters[col.colId]);
      if (value !== null) params.set(col.param, value);
    }
    const list = (sort || []).filter((s) => s && (s.sort === "asc" || s.sort === "desc"));
    if (!sameSort(list, DEFAULT_SORT)) {
      const value = sortToParam(list);
      if (value !== null) params.set("sort", value);
    }
    const text = params.toString();
    return text ? "?" + text : "";
  }

  /**
   * The grid view a query string asks for: {filterModel, sort} where `sort` is a list of
   * {colId, sort} (empty = no sort) or null when the URL does not say (keep the default).
   * Unknown parameters and unusable values are ignored.
   */
  function searchToView(search) {
    const params = new URLSearchParams(search || "");
    const filterModel = {};
    for (const col of URL_COLUMNS) {
      if (!col.kind || !params.has(col.param)) continue;
      const model = decodeFilter(col.kind, params.get(col.param));
      if (model) filterModel[col.colId] = model;
    }
    let sort = null;
    if (params.has("sort")) {
      const raw = String(params.get("sort") || "");
      sort = [];
      if (raw !== "none") {
        for (const part of raw.split(",")) {
          const desc = part.startsWith("-");
          const col = byParam(desc ? part.slice(1) : part);
          if (col && !sort.some((s) => s.colId === col.colId)) {
            sort.push({ colId: col.colId, sort: desc ? "desc" : "asc" });
          }
        }
        if (sort.length === 0) sort = null; // nothing usable: keep the default
      }
    }
    return { filterModel: filterModel, sort: sort };
  }

  // ---- the detail panel --------------------------------------------------------------------

  // Fields the panel shows in this order with these labels; any other field the row carries
  // follows under its own name, so nothing the service sends is hidden.
  const DETAIL_LABELS = [
    ["request_id", "Request ID"],
    ["model", "Model"],
    ["provider", "Provider"],
    ["method", "Method"],
    ["path", "Path"],
    ["phase", "Phase"],
    ["is_streaming", "Streaming"],
    ["bytes_out", "Bytes out"],
    ["chunks_out", "Chunks out"],
    ["input_tokens", "Tokens in"],
    ["output_tokens", "Tokens out"],
  ];
  // A finished request (a completed entry, from the Finished view or Recently finished) says
  // how it ended first.
  const FINISHED_LABELS = [
    ["outcome", "Outcome"],
    ["status", "Status"],
  ];
  // `key` is the stream's opaque name of the row: the worker and the request id say it better.
  const DETAIL_SKIP = new Set([
    "worker_id",
    "start_time",
    "duration_ms",
    "ttft_ms",
    "ttfb_ms",
    "last_output_at",
    "labels",
    "key",
  ]);

  function shown(value) {
    if (value === null || value === undefined || value === "") return "—";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  /**
   * The detail panel's sections for one row: [{title, items: [[label, text]…]}…]. `fmt` holds
   * the formatters (VdmCore's formatDuration, formatClock, formatBytes, formatCount, formatRate),
   * passed in so this module stays free of the other; `worker` is the worker's record or null.
   */
  function detailSections(row, worker, nowMs, offsetMs, fmt, chunksPerS) {
    const r = row || {};
    const finished = typeof r.outcome === "string";
    const timings = finished
      ? finishedTimings(r, fmt)
      : liveTimings(r, nowMs, offsetMs, fmt, chunksPerS);
    const fields = [];
    const seen = new Set(DETAIL_SKIP);
    for (const [name, label] of finished ? FINISHED_LABELS.concat(DETAIL_LABELS) : DETAIL_LABELS) {
      seen.add(name);
      let text = shown(r[name]);
      if (name === "bytes_out" && r[name] != null) text = fmt.formatBytes(r[name]);
      else if (/tokens|chunks/.test(name) && r[name] != null) text = fmt.formatCount(r[name]);
      fields.push([label, text]);
    }
    for (const name of Object.keys(r).sort()) {
      if (!seen.has(name)) fields.push([name, shown(r[name])]);
    }
    const w = worker || {};
    const workerItems = [["Worker", shown(r.worker_id)]];
    if (worker) {
      workerItems.push(["Host", shown(w.host)]);
      workerItems.push(["PID", shown(w.pid)]);
      workerItems.push(["Status", shown(w.status)]);
      workerItems.push(["In flight", shown(w.active)]);
    }
    const sections = [
      { title: "Request", items: fields },
      { title: "Timings", items: timings },
    ];
    const labels = labelPairs(r.labels);
    if (labels.length) sections.push({ title: "Labels", items: labels });
    sections.push({ title: "Worker", items: workerItems });
    return sections;
  }

  function liveTimings(r, nowMs, offsetMs, fmt, chunksPerS) {
    const elapsed = elapsedMs(r.start_time, nowMs, offsetMs);
    const ttft = num(r.ttft_ms);
    const timings = [
      ["Started", fmt.formatClock(r.start_time)],
      ["Running for", fmt.formatDuration(elapsed)],
      ["Time to first token", ttft === null ? "—" : fmt.formatDuration(ttft)],
      [
        "Streaming for",
        ttft === null || elapsed === null ? "—" : fmt.formatDuration(Math.max(0, elapsed - ttft)),
      ],
    ];
    pushFirstByte(timings, r, ttft, fmt);
    if (r.is_streaming === true) timings.push(["Chunks / s", fmt.formatRate(chunksPerS)]);
    const silent = elapsedMs(r.last_output_at, nowMs, offsetMs);
    if (silent !== null) timings.push(["Last output", fmt.formatDuration(silent) + " ago"]);
    return timings;
  }

  function finishedTimings(r, fmt) {
    const duration = num(r.duration_ms);
    const ttft = num(r.ttft_ms);
    const timings = [
      ["Started", fmt.formatClock(r.start_time)],
      ["Duration", fmt.formatDuration(duration)],
      ["Time to first token", ttft === null ? "—" : fmt.formatDuration(ttft)],
      [
        "After the first token",
        ttft === null || duration === null ? "—" : fmt.formatDuration(Math.max(0, duration - ttft)),
      ],
    ];
    pushFirstByte(timings, r, ttft, fmt);
    return timings;
  }

  /** The first body byte, when the worker reports it and it differs from the first token (a
   * stream's preamble: vandamme sends `message_start` at 7 ms and the first token at 2 s). */
  function pushFirstByte(timings, r, ttft, fmt) {
    const ttfb = num(r.ttfb_ms);
    if (ttfb !== null && ttfb !== ttft) timings.push(["Time to first byte", fmt.formatDuration(ttfb)]);
  }

  // The wire allows 8 labels per request; more from a misbehaving writer are not shown.
  const MAX_LABELS = 8;

  /** Labels an app attached to a request as sorted [key, value] pairs (strings only). */
  function labelPairs(labels) {
    if (!labels || typeof labels !== "object" || Array.isArray(labels)) return [];
    return Object.keys(labels)
      .filter((k) => typeof labels[k] === "string")
      .sort()
      .slice(0, MAX_LABELS)
      .map((k) => [k, labels[k]]);
  }

  /** Labels as one filterable text, "team=ml user=ada" ("" when none): the grid's value. */
  function labelsText(labels) {
    return labelPairs(labels)
      .map(([k, v]) => k + "=" + v)
      .join(" ");
  }

  return {
    CAPABILITIES_PATH,
    DEFAULT_STUCK_AFTER_S,
    DEFAULT_STALL_AFTER_S,
    RATE_WINDOW_MS,
    URL_COLUMNS,
    DEFAULT_SORT,
    cancelPath,
    cancelOffered,
    capabilitiesFrom,
    elapsedMs,
    isStuck,
    noteChunks,
    chunkRate,
    cancelNotice,
    encodeFilter,
    decodeFilter,
    viewToSearch,
    searchToView,
    detailSections,
    labelPairs,
    labelsText,
  };
});
