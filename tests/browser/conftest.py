"""Browser-test plumbing: a real system (demo upstream, two workers, stream service, dashboard)
started from the real ``vdm-hub`` commands, headless Debian Chromium driven by Playwright, a
small page object, a helper that holds requests open through the workers, and a fake fleet
that puts thousands of rows in flight through the protocol's own scripts.

One system per test module (module-scoped), because starting it costs a few seconds on a
shared 2-core machine; tests inside a module use unique request ids so they do not interfere.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.procs import Proc, vdm_hub, wait_for
from tests.stream_support import FakeWorker, make_row
from vdm_hub.shared import schema
from vdm_hub.shared.embedded_redis import EmbeddedRedis, free_port
from vdm_hub.shared.keys import Keys

T = TypeVar("T")

CHROMIUM = os.environ.get("VDM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The README's screenshots are refreshed only on request (VDM_UPDATE_SCREENSHOTS=1), so an
# ordinary test run leaves the checkout clean; otherwise they go to a scratch directory.
SCREENSHOTS = (
    Path(__file__).resolve().parents[2] / "docs" / "screenshots"
    if os.environ.get("VDM_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / "vdm-screenshots"
)
# Screenshots that are evidence, not documentation (every page at every screen width): kept
# after the run for a person to look at, never in the checkout.
ARTIFACTS = Path(os.environ.get("VDM_TEST_ARTIFACTS", tempfile.gettempdir())) / "vdm-screens"

# Every element that sticks out past the viewport's right edge and is not clipped by an
# ancestor that scrolls or hides its overflow (a grid's columns scroll inside the grid: fine).
# Returns at most 5 of them, described, so a failure says what spills.
OVERFLOWING = """() => {
  const width = document.documentElement.clientWidth;
  const clipped = (el) => {
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      const o = getComputedStyle(a).overflowX;
      if (o !== "visible" && a.getBoundingClientRect().right <= width + 1) return true;
    }
    return false;
  };
  const out = [];
  for (const el of document.querySelectorAll("body *")) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0 || r.right <= width + 1) continue;
    if (clipped(el)) continue;
    out.push(el.tagName + (el.id ? "#" + el.id : "") + "." + String(el.className).slice(0, 40)
      + " in #" + ((el.closest("[id]") || {}).id || "?") + " right=" + Math.round(r.right));
    if (out.length >= 5) break;
  }
  return {scrollWidth: document.documentElement.scrollWidth, width: width, out: out};
}"""

# Records every EventSource the page creates (when, which URL, whether it was closed), so a
# test can see connection attempts and their spacing without trusting the client's own report.
TRACK_EVENTSOURCE = """
(() => {
  const Native = window.EventSource;
  window.__esLog = [];
  function Tracked(url, init) {
    const es = new Native(url, init);
    const entry = { url: String(url), t: performance.now(), closed: false, es: es };
    window.__esLog.push(entry);
    const close = es.close.bind(es);
    es.close = () => { entry.closed = true; close(); };
    entry.state = () => es.readyState;
    return es;
  }
  Tracked.prototype = Native.prototype;
  Tracked.CONNECTING = 0; Tracked.OPEN = 1; Tracked.CLOSED = 2;
  window.EventSource = Tracked;
})();
"""

# Makes the tab look hidden until the test says otherwise (headless Chromium is always
# "visible"); `__vdmSetVisibility(v)` flips it and fires visibilitychange like a real tab.
EMULATE_HIDDEN = """
(() => {
  let state = "hidden";
  Object.defineProperty(Document.prototype, "visibilityState", {
    configurable: true, get() { return state; } });
  Object.defineProperty(Document.prototype, "hidden", {
    configurable: true, get() { return state !== "visible"; } });
  window.__vdmSetVisibility = (v) => {
    state = v; document.dispatchEvent(new Event("visibilitychange"));
  };
})();
"""


def _chromium_or_skip() -> str:
    path = CHROMIUM if os.path.isabs(CHROMIUM) else shutil.which(CHROMIUM)
    if not path or not os.access(path, os.X_OK):
        pytest.skip(
            f"no Chromium binary at {CHROMIUM!r}: install Debian's `chromium` package "
            "or point VDM_CHROMIUM at one"
        )
    return path


@dataclass
class System:
    """The running processes and their URLs; `restart_stream` reuses the stream's port."""

    redis_url: str
    prefix: str
    dashboard_url: str
    stream_url: str
    stream_port: int
    workers: dict[str, str]
    stream_env: dict[str, str]
    procs: dict[str, Proc] = field(default_factory=dict)

    def kill_stream(self) -> None:
        self.procs["stream"].kill()

    def start_stream(self) -> None:
        proc = vdm_hub("stream", "--port", str(self.stream_port), env=self.stream_env)
        self.procs["stream"] = proc
        proc.wait_ready()

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


def start_system(
    redis_url: str,
    *,
    workers: tuple[str, ...] = ("w1", "w2"),
    stream_extra_env: dict[str, str] | None = None,
    dashboard_extra_env: dict[str, str] | None = None,
) -> System:
    prefix = f"br{os.getpid()}x{uuid.uuid4().hex[:8]}"
    dash_port, stream_port = free_port(), free_port()
    dashboard_origin = f"http://127.0.0.1:{dash_port}"
    stream_url = f"http://127.0.0.1:{stream_port}"
    base = {"REDIS_URL": redis_url, "VDM_KEY_PREFIX": prefix}
    stream_env = {
        **base,
        "VDM_CORS_ORIGINS": dashboard_origin,
        "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "0.5",
        "VDM_ACTIVE_REQUESTS_SSE_HEARTBEAT": "1",
        **(stream_extra_env or {}),
    }
    procs: dict[str, Proc] = {}
    try:
        procs["dashboard"] = vdm_hub(
            "dashboard",
            "--port",
            str(dash_port),
            env={
                "VDM_STREAM_PUBLIC_URL": stream_url,
                "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "0.5",
                **(dashboard_extra_env or {}),
            },
        )
        procs["stream"] = vdm_hub("stream", "--port", str(stream_port), env=stream_env)
        worker_urls: dict[str, str] = {}
        if workers:
            procs["upstream"] = vdm_hub("demo-upstream", "--port", "0")
            upstream = procs["upstream"].wait_ready()
            for wid in workers:
                procs[wid] = vdm_hub(
                    "worker",
                    "--upstream",
                    upstream,
                    "--port",
                    "0",
                    env={**base, "VDM_WORKER_ID": wid},
                )
            worker_urls = {wid: procs[wid].wait_ready() for wid in workers}
        dashboard_url = procs["dashboard"].wait_ready(30)
        procs["stream"].wait_ready()
    except BaseException:
        for proc in procs.values():
            proc.stop()
        raise
    return System(
        redis_url=redis_url,
        prefix=prefix,
        dashboard_url=dashboard_url,
        stream_url=stream_url,
        stream_port=stream_port,
        workers=worker_urls,
        stream_env=stream_env,
        procs=procs,
    )


class Holder:
    """Sends chat requests through the workers that the demo upstream holds open."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=24, thread_name_prefix="hold")
        self._client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=48))
        self._held: dict[str, Future[int]] = {}

    def hold(
        self,
        worker_url: str,
        ms: int,
        model: str = "gpt-4o-mini",
        *,
        chunk_delay_ms: int | None = None,
    ) -> tuple[str, Future[int]]:
        """Hold ``ms`` before the first byte; with ``chunk_delay_ms``, stream the answer
        slowly (16 chunks) so the row shows the streaming phase, bytes and tokens."""
        request_id = f"br-{uuid.uuid4().hex[:6]}-{next(self._ids)}"
        stream = chunk_delay_ms is not None
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"x-request-id": request_id, "x-demo-delay-ms": str(ms)}
        if stream:
            headers["x-demo-chunk-delay-ms"] = str(chunk_delay_ms)

        def send() -> int:
            response = self._client.post(
                f"{worker_url}/v1/chat/completions", json=body, headers=headers
            )
            response.read()
            return response.status_code

        future = self._pool.submit(send)
        self._held[request_id] = future
        return request_id, future

    def in_flight(self) -> set[str]:
        """Ids of the held requests that have not finished yet (any test's)."""
        return {rid for rid, future in self._held.items() if not future.done()}

    def close(self) -> None:
        # Any request still held fails fast once the system has stopped (see `system`).
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()


class FleetWorker(FakeWorker):
    """A fake worker (protocol only) that can also report progress on its rows."""

    async def progress(self, changes: dict[str, dict[str, Any]]) -> int:
        events: list[dict[str, Any]] = []
        sets: list[tuple[str, bytes]] = []
        for rid, fields in changes.items():
            row = self.rows.get(rid)
            if row is None:
                continue
            row.update(fields)  # type: ignore[typeddict-item]
            events.append({"type": "progress", "request_id": rid, **fields})
            sets.append((rid, schema.encode_row(row)))
        return await self._apply(events, sets, [], []) if events else 0


class FakeFleet:
    """Thousands of rows in flight without thousands of requests: fake workers write them
    straight into Redis through the protocol's own scripts (one ``register`` carries a whole
    active set), on an event loop in a background thread so sync browser tests can drive them.

    ``churn`` ends the oldest rows and starts as many new ones at a steady pace; ``listen_cancel``
    makes a worker honour cancel requests on its channel the way a real worker does (its row ends
    with outcome ``cancelled``)."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.keys = Keys(prefix)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-fleet")
        self._thread.start()
        self.redis: aioredis.Redis = self.call(self._connect(redis_url))
        self.workers: dict[str, FleetWorker] = {}
        self.cancels: list[dict[str, Any]] = []
        self.cancelled: list[tuple[str, str]] = []  # (worker id, request id) of each cancel
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._churning = False
        self._churn_task: asyncio.Task[None] | None = None

    async def _connect(self, url: str) -> aioredis.Redis:
        # Bounded commands: a heartbeat stuck on a loaded machine must not hold close() up.
        return aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        async def spawn() -> None:
            self._tasks.append(asyncio.create_task(coro))

        self.call(spawn())

    def new_id(self, tag: str = "f") -> str:
        return f"{tag}-{uuid.uuid4().hex[:6]}-{next(self._ids)}"

    def add_worker(
        self,
        worker_id: str,
        count: int,
        models: tuple[str, ...] = ("m-a",),
        age: float = 0.0,
        *,
        cancellable: bool | None = None,
    ) -> FleetWorker:
        """Register a worker already holding ``count`` rows (models round-robin), heartbeating.
        ``cancellable`` goes into its record (None: a record without the field)."""
        worker = FleetWorker(self.redis, self.keys, worker_id, ttl=30.0, cancellable=cancellable)
        for i in range(count):
            rid = self.new_id(worker_id)
            worker.rows[rid] = make_row(worker_id, rid, models[i % len(models)], age=age)
        self.call(worker.register())
        self.workers[worker_id] = worker
        self._spawn(self._heartbeat(worker))
        return worker

    def start_rows(self, worker_id: str, *request_ids: str, model: str = "m-a") -> None:
        self.call(self.workers[worker_id].start(*request_ids, model=model))

    def end_rows(
        self, worker_id: str, *request_ids: str, outcome: str = "ok", duration_ms: float = 120.0
    ) -> None:
        self.call(
            self.workers[worker_id].end(*request_ids, outcome=outcome, duration_ms=duration_ms)
        )

    def update_rows(self, worker_id: str, changes: dict[str, dict[str, Any]]) -> None:
        """Progress on rows: ``{request_id: {field: value}}`` (a progress event per row)."""
        self.call(self.workers[worker_id].progress(changes))

    def row_ids(self) -> set[str]:
        async def ids() -> set[str]:  # read on the loop: churn mutates the dicts there
            return {rid for w in self.workers.values() for rid in w.rows}

        return self.call(ids())

    async def _heartbeat(self, worker: FleetWorker) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await worker.heartbeat()

    def churn(self, per_second: int, models: tuple[str, ...], *, tick: float = 0.1) -> None:
        """End the oldest rows and start as many new ones, ``per_second`` of each across the
        fleet; rows keep their count, ids and models change."""
        self._churning = True

        async def spawn() -> None:
            self._churn_task = asyncio.create_task(self._churn(per_second, models, tick))
            self._tasks.append(self._churn_task)

        self.call(spawn())

    def stop_churn(self) -> None:
        self._churning = False

        async def settle() -> None:
            # The churn ends a worker's oldest rows, then starts as many: it stops between
            # workers, so the row count is whole again once the task has returned.
            if self._churn_task is not None:
                await self._churn_task
                self._churn_task = None

        self.call(settle())

    async def _churn(self, per_second: int, models: tuple[str, ...], tick: float) -> None:
        n = max(1, round(per_second * tick / max(1, len(self.workers))))
        step = 0
        while self._churning:
            for worker in list(self.workers.values()):
                if not self._churning:
                    return
                old = list(itertools.islice(iter(worker.rows), n))
                if old:
                    await worker.end(*old)
                by_model: dict[str, list[str]] = {}
                for i in range(n):
                    model = models[(step + i) % len(models)]
                    by_model.setdefault(model, []).append(self.new_id(worker.worker_id))
                for model, new in by_model.items():
                    await worker.start(*new, model=model)
                step += n
            await asyncio.sleep(tick)

    def listen_cancel(self, worker_id: str) -> None:
        self._spawn(self._listen_cancel(self.workers[worker_id]))

    async def _listen_cancel(self, worker: FleetWorker) -> None:
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(self.keys.cancel(worker.worker_id))
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if not message:
                    continue
                ask = orjson.loads(message["data"])
                self.cancels.append(ask)
                self.cancelled.append((worker.worker_id, str(ask.get("request_id"))))
                if ask.get("request_id") in worker.rows:
                    await worker.end(ask["request_id"], outcome="cancelled")

    def close(self) -> None:
        async def stop() -> None:
            self._churning = False
            try:
                for task in self._tasks:
                    task.cancel()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await asyncio.gather(*self._tasks, return_exceptions=True)
                for worker in self.workers.values():
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(5):
                            await worker.remove()
            finally:
                # Always: a client left to the garbage collector surfaces as a ResourceWarning
                # (an error) inside some later test.
                async with asyncio.timeout(5):
                    await self.redis.aclose()

        try:
            self.call(stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


class DashboardPage:
    """Page object for the dashboard: reads the grid and the indicators through the page."""

    def __init__(self, page: Any, base_url: str) -> None:
        self.page = page
        self.base_url = base_url.rstrip("/")
        self._console: list[str] = []
        self._requests: list[str] = []
        page.on("console", lambda msg: self._console.append(msg.text))
        page.on("pageerror", lambda error: self._console.append(f"[pageerror] {error}"))
        page.on("request", lambda req: self._requests.append(req.url))

    # Playwright's sync API delivers events only while Python is inside one of its calls, so
    # a list filled by a handler stays frozen across `time.sleep` in a polling loop. A trivial
    # round trip to the page first lets every event received so far reach the handlers.
    def _deliver_events(self) -> None:
        self.page.evaluate("0")

    @property
    def console(self) -> list[str]:
        """Console lines so far (a copy, with every pending event delivered)."""
        self._deliver_events()
        return list(self._console)

    @property
    def requests(self) -> list[str]:
        """URLs of the requests the page has made so far (pending events delivered)."""
        self._deliver_events()
        return list(self._requests)

    @property
    def url(self) -> str:
        """The page's URL now. Playwright's ``page.url`` learns of history.replaceState only
        through an event, so right after one it can still show the previous URL."""
        return str(self.page.evaluate("() => window.location.href"))

    def open(self, path: str = "/dashboard/metrics") -> DashboardPage:
        self.page.goto(self.base_url + path)
        self.page.wait_for_function("() => !!window.__vdmActiveRequestsSSE", timeout=15000)
        return self

    @property
    def indicator(self) -> Any:
        return self.page.locator("#vdm-sse-indicator")

    @property
    def header_emoji(self) -> Any:
        return self.page.locator("#vdm-header-emoji")

    def wait_live(self, timeout: float = 15000) -> None:
        from playwright.sync_api import expect

        expect(self.indicator).to_have_text("● Live", timeout=timeout)
        expect(self.header_emoji).to_have_text("📡", timeout=timeout)

    def is_connected(self) -> bool:
        return bool(self.page.evaluate("() => window.__vdmActiveRequestsSSE.isConnected()"))

    def debug(self) -> dict[str, Any]:
        return dict(self.page.evaluate("() => window.__vdmActiveRequestsSSE.debug()"))

    def eventsources(self) -> list[dict[str, Any]]:
        return list(
            self.page.evaluate(
                "() => (window.__esLog || []).map(e => ({url: e.url, t: e.t, closed: e.closed,"
                " state: e.state()}))"
            )
        )

    def grid_rows(self, grid_id: str = "vdm-active-grid") -> list[dict[str, Any]]:
        """Row data in displayed order (after the user's sort and filter)."""
        script = """(id) => {
            let api;
            try { api = window.dash_ag_grid.getApi(id); } catch (e) { return "[]"; }  // not yet
            const rows = [];
            api.forEachNodeAfterFilterAndSort(n => rows.push(n.data));
            return JSON.stringify(rows);
        }"""
        return list(json.loads(self.page.evaluate(script, grid_id)))

    def row_ids(self, grid_id: str = "vdm-active-grid", key: str = "request_id") -> list[str]:
        return [str(r[key]) for r in self.grid_rows(grid_id)]

    def wait_rows(self, predicate: Any, timeout: float = 15.0, message: str = "rows") -> None:
        wait_for(lambda: predicate(set(self.row_ids())), timeout, 0.1, message)

    def wait_rows_with_models(
        self, ids: set[str], timeout: float = 15.0, message: str = "rows with their models"
    ) -> dict[str, dict[str, Any]]:
        """Until every id in ``ids`` shows, each with its model; returns all rows by id.

        A row can show before its model: the worker may publish the start before it has read
        the request body, and the model follows in a progress event a flush window later."""

        def shown() -> dict[str, dict[str, Any]] | None:
            rows = {str(r["request_id"]): r for r in self.grid_rows()}
            return rows if ids <= set(rows) and all(rows[i]["model"] for i in ids) else None

        result: dict[str, dict[str, Any]] = wait_for(shown, timeout, 0.1, message)
        return result

    def wait_grid(self, grid_id: str = "vdm-active-grid") -> None:
        self.page.wait_for_function(
            "(id) => { try { return !!window.dash_ag_grid.getApi(id); }"
            " catch (e) { return false; } }",
            arg=grid_id,
            timeout=15000,
        )

    def sort_state(self, grid_id: str = "vdm-active-grid") -> list[tuple[str, str]]:
        self.wait_grid(grid_id)
        script = """(id) => window.dash_ag_grid.getApi(id).getColumnState()
            .filter(c => c.sort).map(c => [c.colId, c.sort])"""
        return [tuple(x) for x in self.page.evaluate(script, grid_id)]

    def selected_ids(self, grid_id: str = "vdm-active-grid") -> list[str]:
        self.wait_grid(grid_id)
        script = """(id) => window.dash_ag_grid.getApi(id).getSelectedRows()
            .map(r => r.request_id)"""
        return list(self.page.evaluate(script, grid_id))

    def row_ids_all(self, grid_id: str = "vdm-active-grid") -> list[str]:
        """Ids of every row the grid holds, whatever the user's filter."""
        self.wait_grid(grid_id)
        script = """(id) => { const ids = [];
            window.dash_ag_grid.getApi(id).forEachNode(n => ids.push(n.data.request_id));
            return ids; }"""
        return [str(x) for x in self.page.evaluate(script, grid_id)]

    def grid_size(self, grid_id: str = "vdm-active-grid") -> int:
        """Rows the grid holds (before any filter)."""
        self.wait_grid(grid_id)
        script = """(id) => { let n = 0;
            window.dash_ag_grid.getApi(id).forEachNode(() => n++); return n; }"""
        return int(self.page.evaluate(script, grid_id))

    def count_text(self) -> str:
        return str(self.page.locator("#vdm-active-count").inner_text())

    def filter_model(self, grid_id: str = "vdm-active-grid") -> dict[str, Any]:
        self.wait_grid(grid_id)
        script = "(id) => window.dash_ag_grid.getApi(id).getFilterModel()"
        return dict(self.page.evaluate(script, grid_id))

    def header(self, col_id: str, grid_id: str = "vdm-active-grid") -> Any:
        return self.page.locator(
            f'#{grid_id} .ag-header-cell[col-id="{col_id}"] .ag-header-cell-text'
        )

    def floating_filter(self, col_id: str, grid_id: str = "vdm-active-grid") -> Any:
        """The text box under a column's header."""
        return self.page.locator(f'#{grid_id} .ag-floating-filter[col-id="{col_id}"] input')

    def scroll_top(self, value: int | None = None, grid_id: str = "vdm-active-grid") -> int:
        """The grid body's vertical scroll position (set it first when ``value`` is given)."""
        script = """([id, v]) => {
            const e = document.querySelector('#' + id + ' .ag-body-viewport');
            if (v !== null) e.scrollTop = v; return e.scrollTop; }"""
        return int(self.page.evaluate(script, [grid_id, value]))

    def cell(self, key: str, col_id: str) -> Any:
        """A cell of the row whose ``key`` (the grid's row id: ``row_key(worker, request id)``)
        is given."""
        return self.page.locator(f'#vdm-active-grid .ag-row[row-id="{key}"] [col-id="{col_id}"]')

    @property
    def detail(self) -> Any:
        return self.page.locator("#vdm-detail")

    def detail_value(self, label: str) -> str:
        return str(self.page.locator(f'#vdm-detail-body dd[data-field="{label}"]').inner_text())

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def artifact(self, name: str) -> Path:
        """A full-page screenshot kept after the run (ARTIFACTS), for a person to check."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def overflowing(self) -> dict[str, Any]:
        """What sticks out past the viewport (see OVERFLOWING)."""
        return dict(self.page.evaluate(OVERFLOWING))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture(scope="module")
def holder() -> Iterator[Holder]:
    h = Holder()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Any]:
    """A fresh browser context per test (own storage, own EventSource log)."""
    contexts: list[Any] = []

    def make(
        base_url: str, *, hidden: bool = False, width: int = 1600, height: int = 1200
    ) -> DashboardPage:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        context.add_init_script(TRACK_EVENTSOURCE)
        if hidden:
            context.add_init_script(EMULATE_HIDDEN)
        return DashboardPage(context.new_page(), base_url)

    try:
        yield make
    finally:
        for context in contexts:
            context.close()


@pytest.fixture
def fleet(system: System) -> Iterator[FakeFleet]:
    """Fake workers publishing into the ``system`` of the requesting test module."""
    f = FakeFleet(system.redis_url, system.prefix)
    try:
        yield f
    finally:
        f.close()  # its workers deregister: their rows leave the view


@pytest.fixture(scope="module")
def module_redis(redis_server: EmbeddedRedis) -> str:
    return redis_server.url
