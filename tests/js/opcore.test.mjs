// The operator features' decision logic (dashboard/assets/01_vdm_opcore.js), run by
// `node --test tests/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const op = require("../../dashboard/assets/01_vdm_opcore.js");
const core = require("../../dashboard/assets/01_vdm_core.js");

test("capabilities: anything missing or malformed means no cancel and the default threshold", () => {
  const body = { cancel_enabled: true, stuck_after_s: 60, stall_after_s: 5, delta: true };
  assert.deepEqual(op.capabilitiesFrom(body), {
    cancelEnabled: true,
    stuckAfterS: 60,
    stallAfterS: 5,
    delta: true,
  });
  const bad = { cancel_enabled: "true", stuck_after_s: -1, stall_after_s: "soon" };
  for (const body of [null, undefined, "x", {}, bad]) {
    const caps = op.capabilitiesFrom(body);
    assert.equal(caps.cancelEnabled, false);
    assert.equal(caps.stuckAfterS, 300);
    assert.equal(caps.stallAfterS, 30);
  }
});

test("the cancel path escapes the id and names the row's worker", () => {
  assert.equal(op.cancelPath("ab/c d"), "/metrics/active-requests/ab%2Fc%20d/cancel");
  assert.equal(
    op.cancelPath("retry-1", "gw 2/a"),
    "/metrics/active-requests/retry-1/cancel?worker_id=gw%202%2Fa",
  );
  assert.equal(op.cancelPath("r", ""), "/metrics/active-requests/r/cancel");
});

test("Cancel is offered only where the service allows it and the worker can stop requests", () => {
  const on = op.capabilitiesFrom({ cancel_enabled: true });
  const off = op.capabilitiesFrom({ cancel_enabled: false });
  assert.equal(op.cancelOffered(on, { worker_id: "w1", cancellable: true }), true);
  assert.equal(op.cancelOffered(on, { worker_id: "w1" }), true); // an older service or worker
  assert.equal(op.cancelOffered(on, null), true); // worker list not there yet
  assert.equal(op.cancelOffered(on, { worker_id: "w1", cancellable: false }), false);
  assert.equal(op.cancelOffered(off, { worker_id: "w1", cancellable: true }), false);
  assert.equal(op.cancelOffered(null, null), false);
});

test("a row is stuck once older than the threshold, in server time", () => {
  // Browser clock 10 s behind the server: a row started 295 s ago by the browser is 305 s old.
  const now = 1_000_000_000;
  const start = (now - 295_000) / 1000;
  assert.equal(op.isStuck(start, now, 0, 300), false);
  assert.equal(op.isStuck(start, now, 10_000, 300), true);
  assert.equal(op.isStuck(start, now, 0, 0), false); // no threshold, nothing stuck
  assert.equal(op.isStuck(null, now, 0, 300), false);
});

const streaming = (extra = {}) => ({
  request_id: "s",
  is_streaming: true,
  start_time: 100,
  ttft_ms: 1000,
  chunks_out: 0,
  ...extra,
});

test("chunk rate: chunks over the last window, measured up to now", () => {
  let h = op.noteChunks([], 0, 102_000);
  h = op.noteChunks(h, 20, 103_000);
  h = op.noteChunks(h, 40, 104_000);
  // 40 chunks since the first sample 2 s ago.
  assert.equal(op.chunkRate(h, streaming({ chunks_out: 40 }), 104_000, 0), 20);
  // Between updates the rate is measured up to now (it decays, never jumps).
  assert.equal(op.chunkRate(h, streaming({ chunks_out: 40 }), 106_000, 0), 10);
  // An unchanged count adds no sample.
  assert.equal(op.noteChunks(h, 40, 104_500).length, 3);
});

test("chunk rate: the baseline slides with the window, and a stall decays to 0", () => {
  let h = [];
  for (let t = 0; t <= 20_000; t += 1000) h = op.noteChunks(h, t / 100, 200_000 + t);
  // 10 chunks/s throughout; the window keeps ~5 s of samples plus a baseline.
  assert.ok(h.length <= 7, String(h.length));
  const r = op.chunkRate(h, streaming({ chunks_out: 200 }), 220_000, 0);
  assert.ok(Math.abs(r - 10) < 1e-9, String(r));
  // No chunk for longer than the window: 0.
  assert.equal(op.chunkRate(h, streaming({ chunks_out: 200 }), 226_000, 0), 0);
});

test("chunk rate: one sample falls back to the average since the first byte", () => {
  const h = op.noteChunks([], 50, 106_000);
  // start 100 s, first byte after 1 s, now 106 s: 50 chunks in 5 s.
  assert.equal(op.chunkRate(h, streaming({ chunks_out: 50 }), 106_000, 0), 10);
  assert.equal(op.chunkRate([], streaming({ chunks_out: 50, ttft_ms: null }), 106_000, 0), null);
  assert.equal(op.chunkRate(h, streaming({ is_streaming: false }), 106_000, 0), null);
  assert.equal(op.chunkRate(h, streaming({ chunks_out: null }), 106_000, 0), null);
  // A counter that went back (a new request reusing the id) starts a fresh history.
  assert.deepEqual(op.noteChunks(h, 3, 107_000), [{ t: 107_000, c: 3 }]);
});

test("cancel notices say what happened", () => {
  const ok = op.cancelNotice(202, { request_id: "r1", worker_id: "w1", status: "requested" }, "r1");
  assert.equal(ok.kind, "ok");
  assert.match(ok.text, /r1 on w1/);
  assert.equal(op.cancelNotice(404, { error: "unknown_request" }, "r1").kind, "warn");
  const off = op.cancelNotice(403, { error: "cancel_disabled", suggestion: "Set VDM_CANCEL_ENABLED=true" }, "r1");
  assert.match(off.text, /disabled.*VDM_CANCEL_ENABLED/);
  assert.match(op.cancelNotice(403, { error: "cross_origin", message: "other origin" }, "r").text, /403.*other origin/);
  assert.match(op.cancelNotice(401, {}, "r").text, /log in/);
  assert.match(op.cancelNotice(0, null, "r").text, /did not answer/);
  assert.match(op.cancelNotice(503, { message: "worker gone" }, "r").text, /503.*worker gone/);
});

test("filters: the floating filter's own type needs no prefix, others carry it", () => {
  assert.equal(op.encodeFilter("text", { filterType: "text", type: "contains", filter: "gpt" }), "gpt");
  assert.equal(op.encodeFilter("text", { filterType: "text", type: "equals", filter: "gpt-4o" }), "equals:gpt-4o");
  assert.equal(op.encodeFilter("number", { filterType: "number", type: "greaterThan", filter: 5000 }), "greaterThan:5000");
  assert.equal(op.encodeFilter("number", { filterType: "number", type: "equals", filter: 3 }), "3");
  assert.equal(op.encodeFilter("text", { filterType: "text", type: "blank" }), "blank:");
  // A value that looks like a prefix keeps one; combined filters are not put in the URL.
  assert.equal(op.encodeFilter("text", { type: "contains", filter: "equals:x" }), "contains:equals:x");
  assert.equal(op.encodeFilter("text", { operator: "OR", conditions: [] }), null);
  assert.equal(op.encodeFilter("text", { type: "contains", filter: "" }), null);
  // Model names with colons (ollama/llama3:8b) are plain values.
  assert.deepEqual(op.decodeFilter("text", "llama3:8b"), { filterType: "text", type: "contains", filter: "llama3:8b" });
  assert.deepEqual(op.decodeFilter("number", "lessThan:250"), { filterType: "number", type: "lessThan", filter: 250 });
  assert.equal(op.decodeFilter("number", "abc"), null);
  assert.deepEqual(op.decodeFilter("text", "notBlank:"), { filterType: "text", type: "notBlank" });
});

test("the grid view round-trips through the URL", () => {
  const filterModel = {
    model: { filterType: "text", type: "contains", filter: "gpt-4o" },
    worker_id: { filterType: "text", type: "equals", filter: "w1" },
    duration: { filterType: "number", type: "greaterThan", filter: 5000 },
    unknown_col: { filterType: "text", type: "contains", filter: "x" },
  };
  const sort = [
    { colId: "model", sort: "asc" },
    { colId: "duration", sort: "desc" },
  ];
  const search = op.viewToSearch("?keep=1&model=old", filterModel, sort);
  const params = new URLSearchParams(search);
  assert.equal(params.get("keep"), "1"); // not ours: kept
  assert.equal(params.get("model"), "gpt-4o");
  assert.equal(params.get("worker"), "equals:w1");
  assert.equal(params.get("duration"), "greaterThan:5000");
  assert.equal(params.get("sort"), "model,-duration");
  const view = op.searchToView(search);
  const { unknown_col, ...expected } = filterModel;
  assert.deepEqual(view.filterModel, expected);
  assert.deepEqual(view.sort, sort);
});

test("the default sort stays out of the URL; a cleared sort is sort=none", () => {
  assert.equal(op.viewToSearch("", {}, [{ colId: "start_time", sort: "desc" }]), "");
  assert.equal(op.viewToSearch("?sort=model", {}, op.DEFAULT_SORT), "");
  assert.equal(op.viewToSearch("", {}, []), "?sort=none");
  assert.deepEqual(op.searchToView("?sort=none").sort, []);
  assert.equal(op.searchToView("").sort, null);
  assert.equal(op.searchToView("?sort=nonsense").sort, null);
  assert.deepEqual(op.searchToView("?sort=-started,worker,worker").sort, [
    { colId: "start_time", sort: "desc" },
    { colId: "worker_id", sort: "asc" },
  ]);
  // A column the URL cannot name leaves the sort out rather than lying about it.
  assert.equal(op.viewToSearch("", {}, [{ colId: "mystery", sort: "asc" }]), "");
  assert.deepEqual(op.searchToView("?model=&worker=w%202").filterModel, {
    worker_id: { filterType: "text", type: "contains", filter: "w 2" },
  });
});

test("the detail panel lists every field, the timings and the worker", () => {
  const row = {
    request_id: "r1",
    worker_id: "w1",
    model: "gpt-4o",
    method: "POST",
    path: "/v1/chat/completions",
    is_streaming: true,
    start_time: 100,
    ttft_ms: 1500,
    bytes_out: 2048,
    chunks_out: 12,
    duration_ms: 3,
    future_field: "kept",
  };
  const worker = { worker_id: "w1", host: "h1", pid: 42, status: "up", active: 3 };
  const sections = op.detailSections(row, worker, 104_000, 0, core, 6);
  const flat = Object.fromEntries(sections.flatMap((s) => s.items));
  assert.deepEqual(sections.map((s) => s.title), ["Request", "Timings", "Worker"]);
  assert.equal(flat["Request ID"], "r1");
  assert.equal(flat["Streaming"], "yes");
  assert.equal(flat["Bytes out"], "2.0 KB");
  assert.equal(flat["Tokens in"], "—");
  assert.equal(flat["future_field"], "kept"); // fields the page does not know still show
  assert.equal(flat["Running for"], "4.0 s");
  assert.equal(flat["Time to first token"], "1.5 s");
  assert.equal(flat["Time to first byte"], undefined); // not reported: not shown
  assert.equal(flat["Streaming for"], "2.5 s");
  assert.equal(flat["Chunks / s"], "6.0/s");
  assert.equal(flat["Host"], "h1");
  assert.equal(flat["PID"], "42");
  const bare = Object.fromEntries(op.detailSections({ worker_id: "w9" }, null, 0, 0, core, null).flatMap((s) => s.items));
  assert.equal(bare["Worker"], "w9");
  assert.equal(bare["Host"], undefined);
  assert.equal(bare["Time to first token"], "—");
});

test("the detail panel of a finished request says how it ended, and shows its labels", () => {
  const entry = {
    id: "1700000000000-0",
    request_id: "r2",
    worker_id: "w1",
    model: "gpt-4o",
    outcome: "cancelled",
    status: 499,
    start_time: 100,
    duration_ms: 4200,
    ttft_ms: 1200,
    output_tokens: 90,
    labels: { user: "ada", team: "ml", bad: 7 },
  };
  const sections = op.detailSections(entry, null, 999_000, 0, core, null);
  assert.deepEqual(sections.map((s) => s.title), ["Request", "Timings", "Labels", "Worker"]);
  const request = sections[0].items;
  assert.deepEqual(request.slice(0, 2), [["Outcome", "cancelled"], ["Status", "499"]]);
  const flat = Object.fromEntries(sections.flatMap((s) => s.items));
  assert.equal(flat["Duration"], "4.2 s"); // not "running for" since the start
  assert.equal(flat["Running for"], undefined);
  assert.equal(flat["After the first token"], "3.0 s");
  assert.deepEqual(sections[2].items, [["team", "ml"], ["user", "ada"]]); // strings only, sorted
  assert.equal(flat["labels"], undefined);
});

test("labels read as one filterable text, at most eight", () => {
  assert.equal(op.labelsText({ user: "ada", team: "ml" }), "team=ml user=ada");
  assert.equal(op.labelsText(null), "");
  assert.equal(op.labelsText(["a"]), "");
  const many = Object.fromEntries(Array.from({ length: 12 }, (_, i) => ["k" + (10 + i), "v"]));
  assert.equal(op.labelPairs(many).length, 8);
});

test("a live row's detail says when it last sent output", () => {
  const row = { worker_id: "w", start_time: 100, ttft_ms: 500, is_streaming: true, last_output_at: 101 };
  const flat = Object.fromEntries(op.detailSections(row, null, 104_000, 0, core, 0).flatMap((s) => s.items));
  assert.equal(flat["Last output"], "3.0 s ago");
  // A stream's preamble came first: the first byte is shown beside the first token.
  const early = { ...row, ttfb_ms: 7 };
  const timings = Object.fromEntries(op.detailSections(early, null, 104_000, 0, core, 0).flatMap((s) => s.items));
  assert.equal(timings["Time to first byte"], "7 ms");
  assert.equal(timings["ttfb_ms"], undefined);
  assert.equal(flat["last_output_at"], undefined);
});
