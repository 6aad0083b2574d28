// What the views say about a row or the page (dashboard/assets/01_vdm_viewcore.js), run by
// `node --test tests/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const view = require("../../dashboard/assets/01_vdm_viewcore.js");
const core = require("../../dashboard/assets/01_vdm_core.js");

test("the badge counts the rows, and what the filter shows while one is on", () => {
  assert.equal(view.countBadge(8, 8, false), "8");
  assert.equal(view.countBadge(8, 3, true), "3 of 8");
  assert.equal(view.countBadge(8, 8, true), "8 of 8");
  assert.equal(view.countBadge(undefined, null, false), "0");
});

test("the header emoji says whether this page gets fresh data", () => {
  // The live page: what its stream says (live, stale or not connected).
  assert.equal(view.headerEmoji("metrics", { streamEmoji: "📡" }), "📡");
  assert.equal(view.headerEmoji("metrics", { streamEmoji: "⚠️" }), "⚠️");
  assert.equal(view.headerEmoji("metrics", { streamEmoji: "⚫", overviewOk: true }), "⚫");
  // The overview polls instead of streaming: its header must not stay ⚫ forever.
  assert.equal(view.headerEmoji("overview", { streamEmoji: "⚫", overviewOk: true }), "📡");
  assert.equal(view.headerEmoji("overview", { overviewOk: false }), "⚫");
  assert.equal(view.headerEmoji("finished", { finishedOk: true }), "📡");
  assert.equal(view.pageOf("/dashboard/"), "overview");
  assert.equal(view.pageOf("/dashboard/metrics"), "metrics");
  assert.equal(view.pageOf("/dashboard/finished"), "finished");
});

const stream = (extra = {}) => ({
  is_streaming: true,
  phase: "streaming",
  start_time: 100,
  ttft_ms: 500,
  chunks_out: 10,
  last_output_at: 101,
  ...extra,
});

test("a stream silent for longer than VDM_STALL_AFTER after its first token is stalled", () => {
  // Silent for 29 s, then 31 s, of a 30 s threshold.
  assert.equal(view.stalled(stream(), 130_000, 0, 30), null);
  assert.deepEqual(view.stalled(stream(), 132_000, 0, 30), { silentMs: 31_000 });
  assert.equal(view.phaseShown(stream(), 132_000, 0, 30), "stalled");
  assert.equal(view.phaseShown(stream(), 130_000, 0, 30), "streaming");
  // Judged in server time: with the browser 2 s behind the server, 130 s local is 31 s.
  assert.ok(view.stalled(stream(), 130_000, 2_000, 30));
  // Before the first token it is waiting, not stalled (that is what stuck and TTFT are for);
  // a row without last_output_at (an older worker) is never called stalled.
  assert.equal(view.stalled(stream({ ttft_ms: null }), 200_000, 0, 30), null);
  assert.equal(view.stalled(stream({ last_output_at: null }), 200_000, 0, 30), null);
  assert.equal(view.stalled({ ...stream(), is_streaming: false, chunks_out: null }, 200_000, 0, 30), null);
  // An SSE response the client did not ask to stream (chunks counted) is a stream too.
  assert.ok(view.stalled(stream({ is_streaming: false }), 200_000, 0, 30));
  assert.equal(view.stalled(stream(), 200_000, 0, 0), null);
});

test("before its first token a row shows how long it has waited for it", () => {
  assert.equal(view.waitingMs(stream({ ttft_ms: null }), 103_500, 0), 3_500);
  assert.equal(view.waitingMs(stream(), 103_500, 0), null);
  assert.equal(view.waitingMs(null, 0, 0), null);
});

test("tokens per second: the generation speed of a stream, the whole duration otherwise", () => {
  // A stream: 100 tokens in the 2 s after its first token.
  const streamed = { output_tokens: 100, duration_ms: 3000, ttft_ms: 1000 };
  assert.deepEqual(view.tokensPerS(streamed), { value: 50, basis: "stream" });
  // A response that came at once (first byte 0.3 ms before the end): 16 tokens over 2.2 s,
  // not 53,333/s over the sliver after the first byte.
  const atOnce = { output_tokens: 16, duration_ms: 2200, ttft_ms: 2199.7 };
  assert.deepEqual(view.tokensPerS(atOnce), { value: 16 / 2.2, basis: "total" });
  assert.equal(view.tokensPerSText(view.tokensPerS(atOnce), core.formatRate), "7.3/s avg");
  assert.equal(view.tokensPerSText(view.tokensPerS(streamed), core.formatRate), "50.0/s");
  assert.equal(view.tokensPerS({ output_tokens: 10, duration_ms: 1000 }).basis, "total");
  assert.equal(view.tokensPerS({ ...streamed, is_streaming: false }).basis, "total");
  assert.equal(view.tokensPerS({ output_tokens: null, duration_ms: 2000 }), null);
  assert.equal(view.tokensPerS({ output_tokens: 5, duration_ms: 0 }), null);
  assert.equal(view.tokensPerSText(null, core.formatRate), "—");
});

test("the Finished view's search round-trips through the page URL", () => {
  const values = view.finishedFromSearch("?request=abc&outcome=error&status=502&since=1700000000&x=1");
  assert.deepEqual(values, {
    request: "abc",
    worker: "",
    model: "",
    outcome: "error",
    status: "502",
    since: "1700000000",
    until: "",
  });
  assert.equal(view.finishedToSearch(values), "?request=abc&outcome=error&status=502&since=1700000000");
  assert.equal(view.finishedToSearch({}), "");
  // Unusable values are dropped rather than sent to the API to be refused.
  const junk = view.finishedFromSearch("?outcome=failed&status=abc&since=later");
  assert.equal(junk.outcome + junk.status + junk.since, "");
});

test("the API query carries the search, the page size and the cursor", () => {
  const query = view.completedQuery({ request: "ab c", worker: "w1" }, "17-3", 100);
  const [path, search] = query.split("?");
  assert.equal(path, "/metrics/completed");
  const params = new URLSearchParams(search);
  assert.equal(params.get("request_id"), "ab c");
  assert.equal(params.get("worker_id"), "w1");
  assert.equal(params.get("before"), "17-3");
  assert.equal(params.get("limit"), "100");
  assert.equal(params.has("model"), false);
});

test("the Finished view says whether there is more to find", () => {
  assert.equal(view.finishedStatus(0, null, 10), "No finished request matches.");
  assert.match(view.finishedStatus(3, null, 10), /^3 requests, newest first; that is all/);
  assert.match(view.finishedStatus(0, "5-0", 5000), /examined 5000 entries.*Load more/);
});

test("the cancelled · closed tile", () => {
  assert.equal(view.abortedText(2, 5), "2 · 5");
  assert.equal(view.abortedText(0, 0), "0 · 0");
  assert.equal(view.abortedText(undefined, undefined), "—"); // an older stream service
});
