"""``vdm_hub.instrument`` on a real Uvicorn server and a real Redis: the README's examples as a
user pastes them, the publisher's lifetime around the app's own lifespan (and without one), and
an app wrapped twice reporting each request once."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

import vdm_hub
from tests.embed_support import completed, until, workers
from tests.serving import running
from vdm_hub.shared.keys import Keys

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def readme_examples() -> list[str]:
    """The ```python blocks of the README's section on instrumenting an app."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Instrument your own ASGI app", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# An app of the user's, for the README's recipe (which wraps an `app` that already exists).
USERS_APP = """
async def app(scope, receive, send):
    assert scope["type"] == "http"
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

"""


@pytest.mark.timeout(30)
async def test_the_readme_examples_pasted_into_files_publish_their_requests(
    app_env: dict[str, str], redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    recipe, whole = readme_examples()
    assert len(recipe.strip().splitlines()) <= 3
    for n, source in enumerate((USERS_APP + recipe, whole)):
        path = tmp_path / f"pasted_{n}.py"
        path.write_text(source, encoding="utf-8")
        module = load(path)
        async with running(module.app, "pasted") as (url, _), httpx.AsyncClient() as client:
            (wid,) = await until(lambda: workers(redis, keys))
            response = await client.post(
                f"{url}/v1/chat/completions", json={"model": "m1", "messages": []}
            )
            assert response.status_code == 200

            (entry,) = await until(lambda: completed(redis, keys))
        assert (entry["worker_id"], entry["model"], entry["outcome"]) == (wid, "m1", "ok")
        if source is whole:
            assert entry["labels"] == {"team": "search", "user": "u-42"}
            assert (entry["input_tokens"], entry["output_tokens"]) == (12, 3)
        # The server's shutdown closed the publisher: flushed and deregistered.
        assert wid not in await workers(redis, keys)
        await redis.delete(keys.completed)  # the next example runs under the same default id


@pytest.mark.timeout(30)
async def test_the_publisher_lives_inside_the_apps_own_lifespan(
    app_env: dict[str, str], redis: aioredis.Redis, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vdm.publisher")
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        events.append("app startup")
        yield
        # The app's shutdown runs first; the publisher is closed after it.
        events.append(f"app shutdown, registered: {bool(await workers(redis, keys))}")

    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = vdm_hub.instrument(
        Starlette(routes=[Route("/hello", hello)], lifespan=lifespan), worker_id="life-{pid}"
    )
    async with running(app, "app") as (url, _), httpx.AsyncClient() as client:
        # Registered at startup, before any request.
        assert await until(lambda: workers(redis, keys)) == {f"life-{os.getpid()}"}
        assert events == ["app startup"]
        assert (await client.get(f"{url}/hello")).text == "hi"
        await until(lambda: completed(redis, keys))
    assert events == ["app startup", "app shutdown, registered: True"]
    assert await workers(redis, keys) == set()
    # One line says where this process publishes, and as whom.
    lines = [r.getMessage() for r in caplog.records if "publishing requests" in r.getMessage()]
    assert lines == [
        f"publishing requests to {app_env['REDIS_URL']} (key prefix {keys.prefix!r}) "
        f"as worker life-{os.getpid()}"
    ]


@pytest.mark.timeout(30)
async def test_an_app_that_does_not_speak_lifespan_gets_it_answered(
    app_env: dict[str, str], redis: aioredis.Redis, keys: Keys
) -> None:
    async def raw(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("only http here")  # what many hand-written apps do
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def returns(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await raw(scope, receive, send)

    for app in (raw, returns):
        wrapped = vdm_hub.instrument(app)
        async with running(wrapped, "app") as (url, _), httpx.AsyncClient() as client:
            (wid,) = await until(lambda: workers(redis, keys))
            assert (await client.get(f"{url}/x")).status_code == 204
        assert wid not in await workers(redis, keys)


@pytest.mark.timeout(30)
async def test_an_app_wrapped_twice_reports_each_request_once(
    app_env: dict[str, str], redis: aioredis.Redis, keys: Keys
) -> None:
    inner = vdm_hub.instrument(Starlette(routes=[Route("/x", lambda r: PlainTextResponse("x"))]))

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        await inner(scope, receive, send)  # someone else's layer between the two

    app = vdm_hub.instrument(middleware)
    async with running(app, "app") as (url, _), httpx.AsyncClient() as client:
        for _ in range(3):
            assert (await client.get(f"{url}/x")).status_code == 200
        await until(lambda: _count(redis, keys, 3))
        assert len(await workers(redis, keys)) == 1
    assert len(await completed(redis, keys)) == 3
    assert inner.publisher is None  # type: ignore[attr-defined]


async def _count(redis: aioredis.Redis, keys: Keys, n: int) -> bool:
    return len(await completed(redis, keys)) >= n


@pytest.mark.timeout(30)
async def test_probes_and_the_apps_own_event_stream_never_sit_in_the_view(
    app_env: dict[str, str], redis: aioredis.Redis, keys: Keys
) -> None:
    async def events(request: Any) -> StreamingResponse:
        async def ticks() -> AsyncIterator[bytes]:
            while True:
                yield b"data: tick\n\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(ticks(), media_type="text/event-stream")

    async def chat(request: Any) -> JSONResponse:
        return JSONResponse({"model": (await request.json())["model"]})

    routes = [
        Route("/events", events),
        Route("/healthz", lambda r: PlainTextResponse("ok")),
        Route("/static/app.js", lambda r: PlainTextResponse("js")),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    app = vdm_hub.instrument(Starlette(routes=routes), worker_id="sse-1")
    async with running(app, "app") as (url, _), httpx.AsyncClient() as client:
        await until(lambda: workers(redis, keys))
        async with client.stream("GET", f"{url}/events") as stream:
            lines = stream.aiter_lines()
            assert await anext(lines) == "data: tick"
            for path in ("/healthz", "/static/app.js"):
                assert (await client.get(f"{url}{path}")).status_code == 200
            chat_call = await client.post(f"{url}/v1/chat/completions", json={"model": "m"})
            assert chat_call.status_code == 200
            (entry,) = await until(lambda: completed(redis, keys))
            # The event stream is still open, and not in the view; only the POST finished.
            assert await anext(lines) in ("", "data: tick")
            assert await redis.hgetall(keys.active("sse-1")) == {}
            assert entry["path"] == "/v1/chat/completions"
    assert [e["path"] for e in await completed(redis, keys)] == ["/v1/chat/completions"]


SCRIPT = """
import asyncio, vdm_hub

async def app(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

wrapped = vdm_hub.instrument(app, worker_id="atexit-1")

async def request():
    messages = [{"type": "http.request", "body": b""}]
    async def receive():
        return messages.pop() if messages else {"type": "http.disconnect"}
    async def send(message):
        pass
    scope = {"type": "http", "method": "GET", "path": "/last", "headers": []}
    await wrapped(scope, receive, send)

async def main():
    await request()  # no lifespan: the first request starts the publisher
    await asyncio.wait_for(wrapped.publisher.wait_registered(), 10)
    await request()  # the loop ends before this one is flushed
    print("served", flush=True)

asyncio.run(main())
"""


@pytest.mark.timeout(60)
def test_without_a_lifespan_the_first_request_starts_it_and_exit_closes_it(
    app_env: dict[str, str], redis_url: str, keys: Keys
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=50, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "served" and "Traceback" not in proc.stderr

    async def check() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            entries = await completed(client, keys)
            assert [e["path"] for e in entries] == ["/last", "/last"]
            assert await workers(client, keys) == set()  # deregistered at exit
        finally:
            await client.aclose()

    asyncio.run(check())
