"""``vdm-hub load``: a bounded traffic generator that knows exactly what it has in flight.

:class:`LoadGenerator` sends OpenAI- and/or Anthropic-shaped LLM requests to one or more
targets (round robin) under a rate limit and a concurrency cap, for a duration and/or a number
of requests. Every request carries ``X-Request-Id: <run-id>-<n>``; ``in_flight`` holds exactly
the ids whose request has been handed to the client and whose response has not yet been read
to the end (or failed), so a test can compare it with the hub's rows at any moment.

Where a request waits is visible, so the generator never passes off its own queue as
concurrency at the target: ``waiting`` holds the ids (a subset of ``in_flight``) whose request
headers are not yet on the wire (waiting for a pooled connection, a TCP connect, or this
process's event loop), and the summary reports how long requests waited before they were sent.
The connection pools (``services/httppool.py``) have room for the whole concurrency; the CLI
raises the open-file limit to its hard limit and caps the concurrency (saying so) when even
that is too low for one socket per request.

End of a run: when the duration is up or the count is reached, no new request goes out and the
ones in flight finish (each bounded by the request timeout; ``drain`` caps the wait). ``stop()``
ends the run at once: requests in flight are cancelled (the connection is closed, which a
proxy records as a client disconnect) and counted as ``cancelled``, not failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from enum import StrEnum
from types import TracebackType

import httpx

from vdm_hub.services.demo import vendors
from vdm_hub.services.demo.loadstats import LoadStats, Progress
from vdm_hub.services.demo.vendors import Vendor
from vdm_hub.services.httppool import ShardedClients
from vdm_hub.shared.fdlimit import FD_RESERVE, raise_open_file_limit
from vdm_hub.shared.options import http_base_url, number, whole
from vdm_hub.shared.settings import Settings

DEFAULT_MODELS = {
    Vendor.OPENAI: ("gpt-4o-mini", "gpt-4.1"),
    Vendor.ANTHROPIC: ("claude-3-5-haiku-latest", "claude-sonnet-4-0"),
}
# After a stall (every slot busy) the rate limiter catches up at most this much, not in one
# burst of everything it missed.
MAX_CATCH_UP_S = 1.0
# httpcore's trace event for "the request line and headers are being written to the socket".
SENDING = "http11.send_request_headers.started"


class Shape(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    MIXED = "mixed"


def parse_hold(text: str | float | tuple[float, float] | None) -> tuple[float, float] | None:
    """``"1.5"`` -> (1.5, 1.5); ``"0.5-2"`` -> (0.5, 2.0): seconds, picked uniformly."""
    if text is None:
        return None
    if isinstance(text, tuple):
        low, high = text
    elif isinstance(text, int | float):
        low = high = float(text)
    else:
        first, sep, second = text.strip().partition("-")
        try:
            low = float(first)
            high = float(second) if sep else low
        except ValueError:
            raise ValueError(f"hold {text!r}: expected seconds or a range like 0.5-2") from None
    if not 0 <= low <= high <= 600:
        raise ValueError(f"hold {text!r}: expected 0 <= low <= high <= 600 seconds")
    return (low, high)


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol"
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return "network"
    return type(exc).__name__


class LoadGenerator:
    """Usage: ``async with LoadGenerator([url], ...) as gen: stats = await gen.run()``, or
    ``gen.start()`` ... ``await gen.stop()`` to run it in the background."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        rate: float = 0.0,
        concurrency: int = 10,
        duration: float | None = None,
        requests: int | None = None,
        stream_share: float = 0.5,
        hold: str | float | tuple[float, float] | None = None,
        shape: Shape | str = Shape.OPENAI,
        models: Sequence[str] | None = None,
        run_id: str | None = None,
        timeout: float = 60.0,
        drain: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress_interval: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        seed: int | None = None,
    ) -> None:
        if not targets:
            raise ValueError("at least one target URL is needed")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if rate < 0:
            raise ValueError("rate must be >= 0 (0 = as fast as concurrency allows)")
        if not 0 <= stream_share <= 1:
            raise ValueError("stream_share must be within 0..1")
        if duration is not None and duration < 0:
            raise ValueError("duration must be >= 0")
        if requests is not None and requests < 0:
            raise ValueError("requests must be >= 0")
        self.targets = [t.rstrip("/") for t in targets]
        self.rate = rate
        self.concurrency = concurrency
        self.duration = duration or None  # 0 = until stopped
        self.requests = requests
        self.stream_share = stream_share
        self.hold = parse_hold(hold)
        self.shape = Shape(shape)
        self.models = list(models or [])
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.timeout = timeout
        self.drain = drain
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        self.in_flight: set[str] = set()
        self.waiting: set[str] = set()  # in flight, but not yet written to a connection
        self.stats = LoadStats()
        self._transport = transport
        self._rng = random.Random(seed)
        self._clients: ShardedClients | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()  # set on stop and whenever a request finishes
        self._stopping = False
        self._finished = asyncio.Event()
        self._started = False
        self._runner: asyncio.Task[LoadStats] | None = None
        self._t0 = 0.0

    # --- lifetime ---------------------------------------------------------------------------

    def _make_clients(self) -> ShardedClients:
        """Connection pools with room for ``concurrency`` requests in all, in shards
        (``services/httppool.py``: one pool of thousands made this generator's own loop the
        queue, and requests waited here for seconds)."""
        hold_max = self.hold[1] if self.hold else 0.0

        def make(size: int) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=self._transport,
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                # The read timeout is per read: a held request sends nothing for `hold` s.
                timeout=httpx.Timeout(self.timeout + hold_max, connect=min(5.0, self.timeout)),
                trust_env=False,  # never route demo traffic through an HTTP(S)_PROXY from env
            )

        if self._transport is not None:  # a test's transport: one client
            return ShardedClients(make, self.concurrency, shard=max(1, self.concurrency))
        return ShardedClients(make, self.concurrency)

    async def __aenter__(self) -> LoadGenerator:
        self._clients = self._make_clients()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            if self._clients is not None:
                await self._clients.aclose()
            self._clients = None

    def start(self) -> asyncio.Task[LoadStats]:
        """Run in the background; ``await gen.stop()`` or ``await gen.wait()`` later."""
        if self._runner is None:
            self._runner = asyncio.create_task(self.run(), name=f"load-{self.run_id}")
        return self._runner

    def request_stop(self) -> None:
        """Ask the run to end now (safe from a signal handler); ``stop()`` also waits."""
        self._stopping = True
        self._wake.set()

    async def stop(self) -> LoadStats:
        self.request_stop()
        return await self.wait()

    async def wait(self) -> LoadStats:
        if self._runner is not None:
            return await self._runner
        if self._started:
            await self._finished.wait()
        return self.stats

    # --- the run ----------------------------------------------------------------------------

    def progress(self, rps: float = 0.0) -> Progress:
        s = self.stats
        return Progress(
            elapsed=time.monotonic() - self._t0 if self._started else 0.0,
            sent=s.sent,
            ok=s.ok,
            failed=s.failed_total,
            cancelled=s.cancelled,
            in_flight=len(self.in_flight),
            rps=rps,
            waiting=len(self.waiting),
        )

    async def run(self) -> LoadStats:
        if self._started:
            raise RuntimeError("a LoadGenerator runs once")
        self._started = True
        own_clients = self._clients is None
        clients = self._clients or self._make_clients()
        self._t0 = time.monotonic()
        ticker = asyncio.create_task(self._report()) if self.on_progress else None
        try:
            await self._dispatch(clients)
            await self._drain()
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            if own_clients:
                await clients.aclose()
            self.stats.elapsed = time.monotonic() - self._t0
            self._finished.set()
        return self.stats

    async def _pause(self, until: float | None) -> None:
        """Sleep until ``until`` (monotonic), a stop, or a request finishing."""
        self._wake.clear()
        timeout = None if until is None else max(0.0, until - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _dispatch(self, clients: ShardedClients) -> None:
        deadline = None if self.duration is None else self._t0 + self.duration
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        next_due = self._t0
        n = 0
        while not self._stopping:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if self.requests is not None and n >= self.requests:
                return
            if interval and now < next_due:
                await self._pause(next_due if deadline is None else min(next_due, deadline))
                continue
            if len(self._tasks) >= self.concurrency:
                await self._pause(deadline)
                continue
            n += 1
            next_due = max(next_due, now - MAX_CATCH_UP_S) + interval
            task = asyncio.create_task(self._one(clients, n))
            self._tasks.add(task)
            task.add_done_callback(self._finished_one)

    def _finished_one(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _drain(self) -> None:
        if self._stopping:
            return
        until = None if self.drain is None else time.monotonic() + self.drain
        while self._tasks and not self._stopping:
            if until is not None and time.monotonic() >= until:
                return
            await self._pause(until)

    async def _report(self) -> None:
        assert self.on_progress is not None
        last_finished, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(self.progress_interval)
            now = time.monotonic()
            finished = self.stats.finished
            rps = (finished - last_finished) / max(now - last_t, 1e-9)
            last_finished, last_t = finished, now
            self.on_progress(self.progress(rps))

    def _sending(self, request_id: str, started: float) -> None:
        self.waiting.discard(request_id)
        self.stats.send_wait.add(time.perf_counter() - started)

    def _pick(self, n: int) -> tuple[Vendor, str, bool]:
        if self.shape is Shape.MIXED:
            vendor = (Vendor.OPENAI, Vendor.ANTHROPIC)[n % 2]
        else:
            vendor = Vendor(self.shape.value)
        model = self._rng.choice(self.models or DEFAULT_MODELS[vendor])
        stream = self._rng.random() < self.stream_share
        return vendor, model, stream

    async def _one(self, clients: ShardedClients, n: int) -> None:
        with clients.lease() as client:
            await self._request(client, n)

    async def _request(self, client: httpx.AsyncClient, n: int) -> None:
        request_id = f"{self.run_id}-{n}"
        vendor, model, stream = self._pick(n)
        path, body = vendors.request_for(vendor, model, stream, n)
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if vendor is Vendor.ANTHROPIC:
            headers["anthropic-version"] = "2023-06-01"
        if self.hold is not None:
            seconds = self._rng.uniform(*self.hold)
            headers["x-demo-delay-ms"] = str(round(seconds * 1000))
        target = self.targets[(n - 1) % len(self.targets)]
        started = time.perf_counter()

        async def trace(event: str, info: dict[str, object]) -> None:
            if event == SENDING and request_id in self.waiting:
                self._sending(request_id, started)

        request = client.build_request(
            "POST", target + path, content=body, headers=headers, extensions={"trace": trace}
        )
        self.in_flight.add(request_id)
        self.waiting.add(request_id)
        self.stats.max_waiting = max(self.stats.max_waiting, len(self.waiting))
        self.stats.sent += 1
        try:
            response = await client.send(request, stream=True)
            if request_id in self.waiting:  # a transport that does not trace (tests' mocks)
                self._sending(request_id, started)
            try:
                async for chunk in response.aiter_raw():
                    self.stats.bytes_in += len(chunk)
            finally:
                await response.aclose()
        except asyncio.CancelledError:
            self.in_flight.discard(request_id)
            self.waiting.discard(request_id)
            self.stats.cancelled += 1
            raise
        except (httpx.HTTPError, OSError) as exc:
            self.in_flight.discard(request_id)
            self.waiting.discard(request_id)
            self.stats.failed[failure_reason(exc)] += 1
            return
        self.in_flight.discard(request_id)
        if response.status_code < 400:
            self.stats.ok += 1
            self.stats.latency.add(time.perf_counter() - started)
        else:
            self.stats.failed[f"http_{response.status_code}"] += 1


# --- command line ---------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        type=http_base_url,
        action="append",
        required=True,
        metavar="URL",
        help="base URL to send to (a worker proxy or the demo upstream); repeat for round robin",
    )
    parser.add_argument(
        "--rate", type=number(0), default=10.0, help="requests per second, 0 = no limit [10]"
    )
    parser.add_argument(
        "--concurrency", type=whole(1), default=10, help="requests in flight at most [10]"
    )
    parser.add_argument(
        "--duration",
        type=number(0),
        default=None,
        metavar="S",
        help="seconds to send for; 0 = until Ctrl-C [10 unless --requests is given]",
    )
    parser.add_argument(
        "--requests", type=whole(0), default=None, metavar="N", help="stop after N requests"
    )
    parser.add_argument(
        "--stream-share",
        type=number(0, 1),
        default=0.5,
        metavar="F",
        help="share of streaming requests [0.5]",
    )
    parser.add_argument(
        "--hold",
        default=None,
        metavar="S",
        help="ask the upstream to hold each request S seconds before answering "
        "(x-demo-delay-ms); a range like 0.5-2 picks uniformly",
    )
    parser.add_argument(
        "--shape", choices=[s.value for s in Shape], default="mixed", help="[mixed]"
    )
    parser.add_argument(
        "--model", action="append", default=None, metavar="NAME", help="model name(s) to use"
    )
    parser.add_argument(
        "--timeout", type=number(0.001), default=60.0, metavar="S", help="per request [60]"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible choices")


def _print(line: str) -> None:
    print(line, flush=True)


async def _main(gen: LoadGenerator) -> LoadStats:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gen.request_stop)
    async with gen:
        return await gen.run()


def fd_budget() -> int:
    """Raise the soft open-file limit to the hard one; return how many sockets fit under it."""
    return max(1, raise_open_file_limit() - FD_RESERVE)


def run(args: argparse.Namespace, settings: Settings) -> int:
    # httpx logs every request at INFO; the progress line is the output here.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    duration = args.duration
    if duration is None and args.requests is None:
        duration = 10.0
    concurrency = args.concurrency
    budget = fd_budget()
    if concurrency > budget:
        _print(
            f"load: concurrency capped at {budget} (was {concurrency}): the open-file limit "
            f"(ulimit -n) allows one socket per request for no more; raise it to go higher"
        )
        concurrency = budget
    try:
        gen = LoadGenerator(
            args.target,
            rate=args.rate,
            concurrency=concurrency,
            duration=duration,
            requests=args.requests,
            stream_share=args.stream_share,
            hold=args.hold,
            shape=args.shape,
            models=args.model,
            timeout=args.timeout,
            on_progress=lambda p: _print(p.line()),
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"vdm-hub load: {exc}", file=sys.stderr)
        return 2
    bound = f"{duration:g}s" if duration else "until stopped"
    if args.requests is not None:
        bound = f"{args.requests} requests" + (f" or {duration:g}s" if duration else "")
    _print(
        f"load: run {gen.run_id} -> {', '.join(gen.targets)}; rate={args.rate:g}/s "
        f"concurrency={concurrency} (client pool: {concurrency} connections) {bound} "
        f"shape={args.shape} stream_share={args.stream_share:g}"
    )
    stats = asyncio.run(_main(gen))
    _print(stats.summary_line())
    return 1 if stats.ok == 0 and stats.failed_total > 0 else 0
