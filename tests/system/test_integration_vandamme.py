"""vandamme-proxy 2.0.9 in two processes under ``vdm-hub instrument``, with no change to it.

Two pre-fork servers, each in front of the demo upstream with a stream service on the same
Redis: ``gunicorn --preload -w 2 -k uvicorn.workers.UvicornWorker`` (vandamme's app imported in
the parent before the fork) and ``uvicorn --workers 2`` (each worker spawned, importing it
again). Streaming requests are held open through vandamme's Anthropic Messages endpoint and
the view is sampled while they are in flight: every sample has every one of them, under two
worker ids (the serving processes, never the parent), each with the model as the client sent
it; then one stream is cancelled from the stream service's API and its client is cut off.

vandamme-proxy is installed once into its own virtualenv (``bench/peer.py``, cached under
``$VDM_BENCH_CACHE``); a clean machine pays ~1-3 minutes for it on the first run.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bench.peer import VANDAMME, vandamme_env, vdm_hub_on_path
from tests.procs import Proc, vdm_hub
from tests.system.integration_harness import (
    CANCEL_BOUND,
    Instrumented,
    View,
    all_rows_in_every_sample,
    cancel_cuts_the_client,
    completed,
    every_worker_answers,
    holding,
    installed,
    stream_service,
    until,
)
from vdm_hub.shared.embedded_redis import free_port

# The first run installs vandamme-proxy (bench/peer.py) inside the first test.
pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

HELD = 8
FIRST_TOKEN_MS = 1500  # the demo upstream holds each stream this long before its first byte
CHUNK_MS = 250
CHUNKS = 120  # ~30 s of tokens: longer than the test holds a stream


SERVERS = {
    "gunicorn --preload": lambda venv, port: [
        str(venv.bin("gunicorn")), "--preload", "-w", "2", "-k", "uvicorn.workers.UvicornWorker",
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "3", "src.main:app",
    ],
    "uvicorn --workers 2": lambda venv, port: [
        str(venv.bin("uvicorn")), "src.main:app", "--workers", "2", "--host", "127.0.0.1",
        "--port", str(port), "--timeout-worker-healthcheck", "60",
        "--timeout-graceful-shutdown", "3",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def upstream() -> Any:
    proc = vdm_hub("demo-upstream", "--port", "0")
    try:
        yield proc.wait_ready(60)
    finally:
        proc.stop()


@pytest.fixture
def stream(redis_url: str, key_prefix: str) -> Any:
    proc: Proc = stream_service(redis_url, key_prefix)
    try:
        yield proc.wait_ready(60)
    finally:
        proc.stop()


def message(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }


@pytest.mark.parametrize("server", list(SERVERS))
async def test_vandamme_in_two_processes_shows_every_held_stream(
    server: str,
    upstream: str,
    stream: str,
    redis_url: str,
    key_prefix: str,
    redis: aioredis.Redis,
    tmp_path: Path,
) -> None:
    venv = await asyncio.to_thread(installed, VANDAMME)
    port = free_port()
    env = vandamme_env(
        upstream,
        tmp_path / "home",
        hold_ms=0,
        # Provider `slow`: a first token after FIRST_TOKEN_MS, then one every CHUNK_MS.
        SLOW_API_KEY="sk-test-not-secret",
        SLOW_BASE_URL=upstream + "/v1",
        SLOW_CUSTOM_HEADER_X_DEMO_DELAY_MS=str(FIRST_TOKEN_MS),
        SLOW_CUSTOM_HEADER_X_DEMO_CHUNK_DELAY_MS=str(CHUNK_MS),
        SLOW_CUSTOM_HEADER_X_DEMO_CHUNKS=str(CHUNKS),
        REDIS_URL=redis_url,
        VDM_KEY_PREFIX=key_prefix,
        PYTHONPATH=str(vdm_hub_on_path(tmp_path / "pythonpath")),
    )
    vandamme = Instrumented(f"vandamme ({server})", SERVERS[server](venv, port), env, tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            view = View(stream, client)
            workers = await view.workers_up(2, vandamme)
            # The serving processes publish, each under its own id; the parent does not.
            ids = {w["worker_id"] for w in workers}
            assert len(ids) == 2
            assert vandamme.pid not in {w["pid"] for w in workers}
            await every_worker_answers(client, url + "/v1/models", redis, key_prefix, ids, vandamme)
            await _held_streams(view, url, redis, key_prefix, vandamme)
    finally:
        vandamme.stop()
    assert "Traceback" not in vandamme.output, vandamme.output[-4000:]


async def _held_streams(
    view: View, url: str, redis: aioredis.Redis, key_prefix: str, server: Instrumented
) -> None:
    bodies = ((f"vd-{i}", message(f"slow:claude-test-{i}")) for i in itertools.count())
    async with holding(url + "/v1/messages") as holds:
        rows = await holds.on_every_worker(view, bodies, at_least=HELD, workers=2, server=server)
        held = holds.streams
        # The model as the client sent it (provider prefix and all).
        assert {rid: row["model"] for rid, row in rows.items()} == {
            h.request_id: h.model for h in held
        }
        for row in rows.values():
            assert row["is_streaming"] is True
        # TTFT is the first token, which the upstream holds back for FIRST_TOKEN_MS, never the
        # first byte of vandamme's own preamble (message_start, ping).
        for row in (await holds.first_tokens(view, server)).values():
            assert row["ttft_ms"] >= FIRST_TOKEN_MS, row
            assert row["ttfb_ms"] is not None and row["ttfb_ms"] <= row["ttft_ms"], row
        owners = await all_rows_in_every_sample(view, held, samples=30)
        assert len(owners) == 2, owners
        victim = held[0]
        cut = await cancel_cuts_the_client(view, victim, rows[victim.request_id]["worker_id"])
        assert cut <= CANCEL_BOUND, f"the cancelled client's stream ran on for {cut:.2f}s"
        assert "message_stop" not in victim.events  # cut off, not finished
        assert (await completed(redis, key_prefix, victim.request_id))["outcome"] == "cancelled"
        assert not any(h.done() for h in held[1:])
    # Every row ends with its request: the client closed the others on the way out.
    await until(lambda: _empty(view), 20, "the view to empty")


async def _empty(view: View) -> bool:
    return not (await view.snapshot())["active_requests"]
