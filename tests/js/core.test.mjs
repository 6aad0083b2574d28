// The dashboard client's decision logic (dashboard/assets/01_vdm_core.js), run by
// `node --test tests/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const core = require("../../dashboard/assets/01_vdm_core.js");

test("backoff base follows min(30000, 750 * 1.6^attempt)", () => {
  assert.equal(core.backoffBase(0), 750);
  assert.equal(core.backoffBase(1), 1200);
  assert.ok(Math.abs(core.backoffBase(2) - 1920) < 1e-9);
  assert.ok(Math.abs(core.backoffBase(5) - 750 * 1.6 ** 5) < 1e-9);
  assert.equal(core.backoffBase(9), 30000); // 750 * 1.6^9 = 51540 -> capped
  assert.equal(core.backoffBase(100), 30000);
});

test("backoff jitter is base * 0.25 * (rand * 2 - 1)", () => {
  assert.equal(core.backoffDelay(0, 0.5), 750); // rand 0.5 -> no jitter
  assert.equal(core.backoffDelay(0, 0), 750 - 187.5); // lowest
  assert.ok(Math.abs(core.backoffDelay(0, 0.999999) - 937.5) < 0.01); // highest
  assert.equal(core.backoffDelay(1, 0.75), 1200 + 1200 * 0.25 * 0.5);
  assert.equal(core.backoffDelay(20, 0), 30000 - 7500);
});

test("backoff delay never goes under 250 ms", () => {
  // The formula's own lowest value is 562.5 ms, so the floor only guards odd inputs.
  assert.equal(core.backoffDelay(-5, 0), 562.5);
  for (let attempt = 0; attempt < 15; attempt++) {
    for (const r of [0, 0.1, 0.5, 0.9, 0.99]) {
      const d = core.backoffDelay(attempt, r);
      assert.ok(d >= 250, `attempt ${attempt} rand ${r} -> ${d}`);
      assert.ok(d <= 30000 * 1.25);
    }
  }
});

test("backoff delays grow with the attempt for the same rand", () => {
  const delays = [0, 1, 2, 3, 4, 5, 6, 7, 8].map((a) => core.backoffDelay(a, 0.3));
  for (let i = 1; i < delays.length; i++) assert.ok(delays[i] > delays[i - 1]);
});

test("shouldConnect needs a visible tab on the metrics path", () => {
  assert.equal(core.shouldConnect("visible", "/dashboard/metrics"), true);
  assert.equal(core.shouldConnect("visible", "/prefix/dashboard/metrics/"), true);
  assert.equal(core.shouldConnect("hidden", "/dashboard/metrics"), false);
  assert.equal(core.shouldConnect("prerender", "/dashboard/metrics"), false);
  assert.equal(core.shouldConnect("visible", "/dashboard/"), false);
  assert.equal(core.shouldConnect("visible", "/"), false);
  assert.equal(core.shouldConnect("visible", undefined), false);
});

test("the overview polls only when visible and not on the metrics page", () => {
  assert.equal(core.shouldPollOverview("visible", "/dashboard/"), true);
  assert.equal(core.shouldPollOverview("hidden", "/dashboard/"), false);
  assert.equal(core.shouldPollOverview("visible", "/dashboard/metrics"), false);
  assert.equal(core.shouldPollOverview("visible", "/dashboard/finished"), false);
});

test("joinUrl appends endpoint paths to the server-given base", () => {
  assert.equal(core.joinUrl("", core.STREAM_PATH), "/metrics/active-requests/stream");
  assert.equal(
    core.joinUrl("http://127.0.0.1:8090/", core.STREAM_PATH),
    "http://127.0.0.1:8090/metrics/active-requests/stream",
  );
  assert.equal(core.joinUrl(null, core.SNAPSHOT_PATH), "/metrics/active-requests");
});

// Rows are named by the stream's `key` (opaque; here simply the id), not by request_id.
const row = (id, extra = {}) => ({
  key: id,
  request_id: id,
  worker_id: "w1",
  model: "gpt-4o",
  phase: "upstream",
  bytes_out: 0,
  input_tokens: null,
  duration_ms: 10,
  ...extra,
});

test("diffRows: a first snapshot is all adds", () => {
  const tx = core.diffRows(new Map(), [row("a"), row("b")]);
  assert.deepEqual(
    tx.add.map((r) => r.request_id),
    ["a", "b"],
  );
  assert.deepEqual(tx.update, []);
  assert.deepEqual(tx.remove, []);
});

test("diffRows: gone rows are removed by id, changed rows updated, same rows untouched", () => {
  const current = new Map([
    ["a", row("a")],
    ["b", row("b")],
    ["c", row("c")],
  ]);
  const tx = core.diffRows(current, [
    row("a", { duration_ms: 999 }), // only the ticking duration changed: no update
    row("b", { phase: "streaming", bytes_out: 512 }),
    row("d"),
  ]);
  assert.deepEqual(
    tx.add.map((r) => r.request_id),
    ["d"],
  );
  assert.deepEqual(
    tx.update.map((r) => r.request_id),
    ["b"],
  );
  assert.deepEqual(tx.remove, [{ key: "c" }]);
});

test("diffRows: an empty snapshot removes everything", () => {
  const tx = core.diffRows({ a: row("a"), b: row("b") }, []);
  assert.deepEqual(
    tx.remove.map((r) => r.key).sort(),
    ["a", "b"],
  );
  assert.equal(tx.add.length + tx.update.length, 0);
});

test("diffRows skips rows without an id and repeated ids", () => {
  const tx = core.diffRows(new Map(), [row("a"), { model: "x" }, null, row("a"), row("")]);
  assert.deepEqual(
    tx.add.map((r) => r.request_id),
    ["a"],
  );
});

test("diffRows with another key (workers)", () => {
  const tx = core.diffRows(new Map([["w1", { worker_id: "w1", active: 1 }]]), [
    { worker_id: "w1", active: 2 },
    { worker_id: "w2", active: 0 },
  ], "worker_id", []);
  assert.deepEqual(tx.update, [{ worker_id: "w1", active: 2 }]);
  assert.deepEqual(tx.add, [{ worker_id: "w2", active: 0 }]);
});

test("rowChanged treats null and undefined alike, and ignores duration_ms", () => {
  assert.equal(core.rowChanged({ a: null, duration_ms: 1 }, { duration_ms: 2 }), false);
  assert.equal(core.rowChanged({ a: 1 }, { a: 2 }), true);
  assert.equal(core.rowChanged({ a: 1 }, { a: 1, b: 0 }), true);
});

test("isEmptyTransaction", () => {
  assert.equal(core.isEmptyTransaction({ add: [], update: [], remove: [] }), true);
  assert.equal(core.isEmptyTransaction({ add: [1], update: [], remove: [] }), false);
});

test("durations tick in server time, corrected for browser clock skew", () => {
  // Browser clock 5 s behind the server.
  const offset = core.clockOffsetMs(1000, 995000);
  assert.equal(offset, 5000);
  assert.equal(core.liveDurationMs(999, 995000, offset), 1000);
  assert.equal(core.liveDurationMs(999, 996500, offset), 2500);
  assert.equal(core.liveDurationMs(2000, 995000, offset), 0); // never negative
  assert.equal(core.liveDurationMs(null, 995000, offset), null);
  assert.equal(core.clockOffsetMs(undefined, 5), 0);
  assert.equal(core.ageSeconds(998, 995000, offset), 2);
});

test("the clock estimate ignores stale re-sent timestamps", () => {
  let state = core.foldClockSample([], 5000, 3);
  assert.equal(state.offsetMs, 5000);
  // The same snapshot re-sent 2 s later reads as an offset 2 s lower: ignored.
  state = core.foldClockSample(state.samples, 3000, 3);
  assert.equal(state.offsetMs, 5000);
  // A real clock change wins once the old samples have aged out of the window.
  state = core.foldClockSample(state.samples, 1000, 3);
  state = core.foldClockSample(state.samples, 1000, 3);
  assert.equal(state.offsetMs, 3000);
  state = core.foldClockSample(state.samples, 1000, 3);
  assert.equal(state.offsetMs, 1000);
  assert.deepEqual(core.foldClockSample(undefined, NaN).samples, []);
});

test("formatDuration", () => {
  assert.equal(core.formatDuration(0), "0 ms");
  assert.equal(core.formatDuration(849.6), "850 ms");
  assert.equal(core.formatDuration(12340), "12.3 s");
  assert.equal(core.formatDuration(245000), "4m 05s");
  assert.equal(core.formatDuration(3720000), "1h 02m");
  assert.equal(core.formatDuration(null), "—");
  assert.equal(core.formatDuration(-5), "0 ms");
});

test("formatBytes, formatCount, formatRate, formatPercent", () => {
  assert.equal(core.formatBytes(512), "512 B");
  assert.equal(core.formatBytes(1536), "1.5 KB");
  assert.equal(core.formatBytes(2 * 1024 * 1024), "2.0 MB");
  assert.equal(core.formatBytes(null), "—");
  assert.equal(core.formatCount(1234567), "1,234,567");
  assert.equal(core.formatCount(12), "12");
  assert.equal(core.formatCount(undefined), "—");
  assert.equal(core.formatRate(3.14159), "3.1/s");
  assert.equal(core.formatRate(250.4), "250/s");
  assert.equal(core.formatRate(null), "—");
  assert.equal(core.formatPercent(0.0123), "1.2%");
  assert.equal(core.formatPercent(0), "0.0%");
  assert.equal(core.formatPercent(null), "—");
});

test("indicator texts and emoji", () => {
  assert.deepEqual(
    [core.indicatorState(true, false).text, core.indicatorState(true, false).emoji],
    ["● Live", "📡"],
  );
  assert.deepEqual(
    [core.indicatorState(false, false).text, core.indicatorState(false, false).emoji],
    ["○ Reconnecting...", "⚫"],
  );
  assert.match(core.indicatorState(false, false).className, /vdm-reconnecting/);
  assert.match(core.indicatorState(true, false).className, /vdm-live/);
  assert.match(core.indicatorState(false, true).text, /disabled/);
});

test("a stale hub is not Live: the indicator says why and since when", () => {
  const since = new Date(2025, 0, 1, 12, 1, 5).getTime() / 1000;
  const sync = core.syncFrom({ sync: "stale", sync_since: since, sync_reason: "Redis unreachable" });
  const state = core.indicatorState(true, false, sync);
  assert.equal(state.text, "◐ Stale — Redis unreachable since 12:01:05");
  assert.match(state.className, /vdm-stale/);
  assert.notEqual(state.emoji, "📡");
  // In sync, or not connected at all: the usual states.
  assert.equal(core.indicatorState(true, false, core.syncFrom({ sync: "ok", sync_since: since })).text, "● Live");
  assert.equal(core.indicatorState(false, false, sync).text, "○ Reconnecting...");
  assert.equal(core.staleText({ stale: true, sinceS: null, reason: null }), "◐ Stale — out of sync with Redis");
});

test("syncFrom trusts only a well-formed stale and keeps the last word when a frame says none", () => {
  assert.deepEqual(core.syncFrom({}), core.SYNC_OK); // a service that predates the field
  const stale = core.syncFrom({ sync: "stale", sync_since: 100, sync_reason: "x".repeat(500) });
  assert.equal(stale.stale, true);
  assert.equal(stale.sinceS, 100);
  assert.equal(stale.reason.length, 120);
  assert.equal(core.syncFrom({ version: 3 }, stale), stale);
  assert.equal(core.syncFrom({ sync: "STALE" }).stale, false);
  assert.deepEqual(core.syncFrom({ sync: "stale", sync_since: "soon", sync_reason: 7 }), {
    stale: true,
    sinceS: null,
    reason: null,
  });
  assert.equal(core.sameSync(stale, core.syncFrom({ sync: "stale", sync_since: 100, sync_reason: "x".repeat(500) })), true);
  assert.equal(core.sameSync(stale, core.SYNC_OK), false);
});

test("durations stop at the last confirmed moment while stale, and run on when in sync", () => {
  const offset = 2000; // the server's clock is 2 s ahead of the browser's
  const stale = { stale: true, sinceS: 1000, reason: "Redis not answering" };
  // Local 1,005,000 ms = server 1,007 s: held at server 1,000 s = local 998,000 ms.
  assert.equal(core.shownNowMs(1005000, offset, stale), 998000);
  assert.equal(core.liveDurationMs(990, core.shownNowMs(1005000, offset, stale), offset), 10000);
  assert.equal(core.shownNowMs(990000, offset, stale), 990000); // before it: the real clock
  assert.equal(core.shownNowMs(1005000, offset, core.SYNC_OK), 1005000);
  assert.equal(core.shownNowMs(1005000, offset, { stale: true, sinceS: null }), 1005000);
});

test("statsFigures turns the series into four charts with aligned x values", () => {
  const figs = core.statsFigures({
    series: [
      { t: 100, in_flight: 2, requests_per_s: 1.5, error_rate: 0.1, p50_ms: 5, p95_ms: 9, p99_ms: 12 },
      { t: 101, in_flight: 3, requests_per_s: 2, error_rate: 0, p50_ms: null, p95_ms: 8, p99_ms: 10 },
      { t: "bad" },
    ],
  });
  assert.deepEqual(Object.keys(figs).sort(), ["errors", "inflight", "latency", "rate"]);
  assert.deepEqual(figs.inflight.data[0].y, [2, 3]);
  assert.equal(figs.inflight.data[0].x[0], new Date(100000).toISOString());
  assert.deepEqual(figs.latency.data.map((t) => t.name), ["p50", "p95", "p99"]);
  assert.deepEqual(figs.latency.data[0].y, [0.005, null]); // seconds
  assert.equal(figs.latency.layout.yaxis.title.text, "seconds");
  assert.deepEqual(figs.errors.data[0].y, [10, 0]); // percent
  assert.deepEqual(core.statsFigures(undefined).rate.data[0].y, []);
  // Legible on a narrow chart: horizontal x labels, a legend only where there are series to
  // tell apart, and then under the plot (it covered the TTFT lines).
  assert.equal(figs.inflight.layout.xaxis.tickangle, 0);
  assert.equal(figs.inflight.layout.showlegend, false);
  assert.equal(figs.latency.layout.showlegend, true);
  assert.ok(figs.latency.layout.legend.y < 0);
});

test("cancelled and client-closed requests are their own series on the rate chart", () => {
  const figs = core.statsFigures({
    step_s: 2,
    series: [
      { t: 100, requests_per_s: 3, error_rate: 0, cancelled: 2, client_closed: 0 },
      { t: 102, requests_per_s: 1, error_rate: 0.5, cancelled: 0, client_closed: 4 },
    ],
  });
  assert.deepEqual(figs.rate.data.map((t) => t.name), ["finished/s", "cancelled/s", "client closed/s"]);
  assert.deepEqual(figs.rate.data[1].y, [1, 0]); // per second: 2 in a 2 s step
  assert.deepEqual(figs.rate.data[2].y, [0, 2]);
  assert.deepEqual(figs.errors.data[0].y, [0, 50]);
  // A stream service that does not count them: no empty series in the legend.
  const old = core.statsFigures({ series: [{ t: 1, requests_per_s: 1 }] });
  assert.deepEqual(old.rate.data.map((t) => t.name), ["finished/s"]);
});

test("workerRows joins workers with per-worker stats; fleetTotals counts", () => {
  const snapshot = {
    workers: [
      { worker_id: "w1", host: "h", pid: 1, status: "up", last_seen: 10, active: 2 },
      { worker_id: "w2", host: "h", pid: 2, status: "stale", last_seen: 5, active: 0 },
    ],
    active_requests: [row("a"), row("b")],
  };
  const stats = { fleet: { requests_per_s: 4, error_rate: 0.5, p95_ms: 20 }, by_worker: { w1: { requests_per_s: 4 } } };
  const rows = core.workerRows(snapshot, stats);
  assert.equal(rows[0].requests_per_s, 4);
  assert.equal(rows[1].requests_per_s, null);
  const totals = core.fleetTotals(snapshot, stats);
  assert.equal(totals.workersUp, 1);
  assert.equal(totals.workersStale, 1);
  assert.equal(totals.inFlight, 2);
  assert.equal(totals.p95Ms, 20);
  assert.equal(core.fleetTotals(undefined, undefined).requestsPerS, null);
});

test("the page opens the delta stream, resuming from the version it holds", () => {
  assert.equal(core.liveStreamUrl(""), "/metrics/active-requests/stream?delta=1");
  assert.equal(
    core.liveStreamUrl("http://s:8090/", null),
    "http://s:8090/metrics/active-requests/stream?delta=1",
  );
  assert.equal(
    core.liveStreamUrl("", 4503599627370871),
    "/metrics/active-requests/stream?delta=1&last_event_id=4503599627370871",
  );
  for (const bad of [undefined, NaN, -1, 1.5, "x", 2 ** 60]) {
    assert.equal(core.liveStreamUrl("", bad), "/metrics/active-requests/stream?delta=1");
  }
});

test("rowMapFrom keys a snapshot by id, skipping rows without one and repeats", () => {
  const map = core.rowMapFrom([row("a"), { model: "x" }, null, row("a", { model: "dup" }), row("b")]);
  assert.deepEqual([...map.keys()], ["a", "b"]);
  assert.equal(map.get("a").model, "gpt-4o");
  assert.equal(core.rowMapFrom(undefined).size, 0);
});

test("a delta applies only on top of the version it was built from", () => {
  assert.equal(core.deltaFollows(7, { base: 7, version: 8 }), true);
  assert.equal(core.deltaFollows("7", { base: 7, version: 8 }), true); // ids arrive as strings
  assert.equal(core.deltaFollows(6, { base: 7, version: 8 }), false); // a gap
  assert.equal(core.deltaFollows(8, { base: 7, version: 8 }), false); // already applied
  assert.equal(core.deltaFollows(null, { base: 0, version: 1 }), false); // no snapshot yet
  assert.equal(core.deltaFollows(7, { version: 8 }), false);
  assert.equal(core.deltaFollows(7, { base: 7 }), false);
  assert.equal(core.deltaFollows(7, null), false);
});

test("applyDelta turns upserts and removes into a transaction and updates the map in place", () => {
  const map = core.rowMapFrom([row("a"), row("b"), row("c")]);
  const tx = core.applyDelta(map, {
    base: 1,
    version: 2,
    upsert: [
      row("a", { duration_ms: 5000 }), // only the volatile duration: no update
      row("b", { phase: "streaming", bytes_out: 10 }),
      row("d"),
      { model: "no id" },
    ],
    remove: ["c", "zz"], // zz was never held: nothing to remove
  });
  assert.deepEqual(tx.add.map((r) => r.request_id), ["d"]);
  assert.deepEqual(tx.update.map((r) => r.request_id), ["b"]);
  assert.deepEqual(tx.remove, [{ key: "c" }]);
  assert.deepEqual([...map.keys()].sort(), ["a", "b", "d"]);
  assert.equal(map.get("b").phase, "streaming");
});

test("applyDelta: removes go first, so an id in both lists keeps its upserted row", () => {
  const map = core.rowMapFrom([row("a"), row("b")]);
  let tx = core.applyDelta(map, {
    upsert: [row("a", { phase: "streaming" }), row("n")],
    remove: ["a", "n", "b"],
  });
  assert.deepEqual(tx.add.map((r) => r.request_id), ["n"]);
  assert.deepEqual(tx.update.map((r) => r.request_id), ["a"]); // never remove + add of one id
  assert.deepEqual(tx.remove, [{ key: "b" }]);
  assert.deepEqual([...map.keys()].sort(), ["a", "n"]);
  assert.equal(map.get("a").phase, "streaming");
  map.clear();
  tx = core.applyDelta(map, { base: 2, version: 3, upsert: [], remove: [], timestamp: 1 });
  assert.equal(core.isEmptyTransaction(tx), true);
  assert.equal(core.isEmptyTransaction(core.applyDelta(map, {})), true);
});

test("a chain of deltas on a snapshot reproduces the truth", () => {
  const truth = new Map();
  const map = new Map();
  let held = 0;
  let seed = 7;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  for (let v = 1; v <= 200; v++) {
    const upsert = [];
    const remove = [];
    for (let k = 0; k < 5; k++) {
      const id = "r" + Math.floor(rand() * 40);
      if (rand() < 0.4 && truth.has(id)) {
        truth.delete(id);
        remove.push(id);
      } else if (!remove.includes(id)) {
        const r = row(id, { bytes_out: v });
        truth.set(id, r);
        upsert.push(r);
      }
    }
    const delta = { base: held, version: v, upsert: upsert.filter((r) => truth.get(r.key) === r), remove };
    assert.equal(core.deltaFollows(held, delta), true);
    core.applyDelta(map, delta);
    held = delta.version;
  }
  assert.deepEqual([...map.keys()].sort(), [...truth.keys()].sort());
  for (const [id, r] of truth) assert.equal(map.get(id).bytes_out, r.bytes_out);
});

test("the latency chart gains TTFT lines only when stats carry them", () => {
  const without = core.statsFigures({ series: [{ t: 1, p50_ms: 5, p95_ms: 6, p99_ms: 7 }] });
  assert.deepEqual(without.latency.data.map((t) => t.name), ["p50", "p95", "p99"]);
  const withTtft = core.statsFigures({
    series: [
      { t: 1, p50_ms: 5, ttft_p50_ms: 2, ttft_p95_ms: 4 },
      { t: 2, p50_ms: 5, ttft_p50_ms: null, ttft_p95_ms: 3 },
    ],
  });
  const names = withTtft.latency.data.map((t) => t.name);
  assert.deepEqual(names, ["p50", "p95", "p99", "TTFT p50", "TTFT p95"]);
  assert.deepEqual(withTtft.latency.data[3].y, [0.002, null]);
  assert.deepEqual(withTtft.latency.data[4].y, [0.004, 0.003]);
});

test("grid batches wait longer at fleet scale", () => {
  assert.equal(core.batchWaitMs(0), 50);
  assert.equal(core.batchWaitMs(1000), 50);
  assert.equal(core.batchWaitMs(5000), 200);
  assert.equal(core.batchWaitMs(10000), 300);
  assert.equal(core.batchWaitMs(1e6), 300);
  assert.equal(core.batchWaitMs(undefined), 50);
});

// One X-Request-Id on two workers (a client's retry that landed elsewhere): two rows.
const dup = (worker, extra = {}) =>
  row("retry-1", { key: worker + "/retry-1", worker_id: worker, ...extra });

test("one request id on two workers is two rows, in a snapshot and in the grid diff", () => {
  const map = core.rowMapFrom([dup("w1"), dup("w2")]);
  assert.deepEqual([...map.keys()], ["w1/retry-1", "w2/retry-1"]);
  const tx = core.diffRows(new Map(), [dup("w1"), dup("w2")]);
  assert.deepEqual(tx.add.map((r) => r.worker_id), ["w1", "w2"]);
  // A row without a key (an older stream service's) is skipped, never merged by request id.
  assert.equal(core.rowMapFrom([{ request_id: "retry-1", worker_id: "w3" }]).size, 0);
});

test("a delta that ends one of two rows with one request id removes exactly that key", () => {
  const map = core.rowMapFrom([dup("w1"), dup("w2")]);
  let tx = core.applyDelta(map, { base: 1, version: 2, upsert: [], remove: ["w1/retry-1"] });
  assert.deepEqual(tx.remove, [{ key: "w1/retry-1" }]);
  assert.deepEqual([...map.keys()], ["w2/retry-1"]);
  // The one left still takes its worker's progress.
  tx = core.applyDelta(map, { upsert: [dup("w2", { bytes_out: 9 })], remove: [] });
  assert.deepEqual(tx.update.map((r) => [r.worker_id, r.bytes_out]), [["w2", 9]]);
  assert.equal(map.get("w2/retry-1").bytes_out, 9);
});

test("finished requests get a grid key that tells apart one id on two workers and reuses", () => {
  const entry = (worker, start) => ({
    request_id: "retry-1", worker_id: worker, start_time: start, outcome: "ok",
  });
  const rows = core.recentRows([entry("w1", 10.5), entry("w2", 10.5), entry("w1", 20), {}, null]);
  assert.equal(rows.length, 3);
  assert.equal(new Set(rows.map((r) => r.key)).size, 3);
  assert.deepEqual(rows[0], { ...entry("w1", 10.5), key: rows[0].key }); // a copy with a key
  // The same entry in the next stats frame keeps its key: the grid updates, never re-adds.
  assert.equal(core.recentRows([entry("w2", 10.5)])[0].key, rows[1].key);
  assert.deepEqual(core.recentRows(undefined), []);
});

test("the stream's base: the public URL, else this page's host on the stream port, else same origin", () => {
  const page = { protocol: "http:", hostname: "remote.test" };
  assert.equal(core.streamBase({ streamUrl: "https://s.example", streamPort: 8090 }, page), "https://s.example");
  assert.equal(core.streamBase({ streamUrl: "", streamPort: 8090 }, page), "http://remote.test:8090");
  const v6 = { protocol: "https:", hostname: "[fd00::7]" };
  assert.equal(core.streamBase({ streamPort: 8090 }, v6), "https://[fd00::7]:8090");
  assert.equal(core.streamBase({ streamUrl: "", streamPort: null }, page), "");
  assert.equal(core.streamBase({ streamPort: 70000 }, page), "");
  assert.equal(core.streamBase({}, page), "");
});

test("reconcileRows: adds what only the map holds, removes what only the grid holds", () => {
  const map = new Map([["a", row("a")], ["b", row("b")]]);
  const grid = new Map([["b", map.get("b")], ["gone", row("gone")]]);
  const tx = core.reconcileRows(["a", "b", "gone", "never"], map, (id) => grid.get(id));
  assert.deepEqual(tx.add.map((r) => r.key), ["a"]);
  assert.deepEqual(tx.update, []); // the grid holds b's very row
  assert.deepEqual(tx.remove, [{ key: "gone" }]);
});

test("reconcileRows updates a changed row, not one whose volatile fields alone moved", () => {
  const map = new Map([
    ["a", row("a", { phase: "streaming" })],
    ["b", row("b", { duration_ms: 999 })],
  ]);
  const grid = new Map([["a", row("a")], ["b", row("b")]]);
  const tx = core.reconcileRows(["a", "b"], map, (id) => grid.get(id));
  assert.deepEqual(tx.update.map((r) => r.key), ["a"]);
  assert.deepEqual(tx.add, []);
  assert.deepEqual(tx.remove, []);
});

test("reconcileRows reads the map as it is now: an id queued twice is one change", () => {
  const map = new Map([["a", row("a")]]);
  const grid = new Map();
  const tx = core.reconcileRows(["a"], map, (id) => grid.get(id));
  grid.set("a", tx.add[0]);
  map.delete("a"); // a delta removed it while the load went on, and queued it again
  const later = core.reconcileRows(["a"], map, (id) => grid.get(id));
  assert.deepEqual(later, { add: [], update: [], remove: [{ key: "a" }] });
});

test("nextSliceSize scales the slice to the budget, within bounds", () => {
  assert.equal(core.nextSliceSize(1000, 50, 25), 500); // too slow: halve
  assert.equal(core.nextSliceSize(1000, 12.5, 25), 2000); // fast: double
  assert.equal(core.nextSliceSize(200, 0, 25), 800); // grows at most fourfold at a time
  assert.equal(core.nextSliceSize(4000, 1, 25), 5000); // never over the maximum
  assert.equal(core.nextSliceSize(100, 1000, 25), 100); // never under the minimum
  assert.equal(core.nextSliceSize(undefined, undefined), 800); // defaults: first size, budget
});
