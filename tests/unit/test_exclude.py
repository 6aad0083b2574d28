"""Which requests count: excluded paths pass through unreported, and a GET answered with an
event stream (the app's own live endpoint) leaves the view as its response starts, with no
finished entry; an LLM stream (a POST) is reported as always."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.unit.test_instrument import Recorded, _run, _scope
from tests.unit.test_publisher import _drain, _row, _settings
from vdm_hub import current_request
from vdm_hub.services.proxy.exclude import PathFilter
from vdm_hub.services.proxy.instrument import RequestMetricsMiddleware
from vdm_hub.services.proxy.publisher import Publisher
from vdm_hub.shared.keys import Keys
from vdm_hub.shared.settings import DEFAULT_EXCLUDE_PATHS, ConfigError, Settings
from vdm_hub.shared.store import read_worker_state


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("/health", True),
        ("/health/live", True),
        ("/healthy", False),
        ("/metrics", True),
        ("/_vdm/status", True),
        ("/static/app.js", True),
        ("/assets/site.css", True),
        ("/favicon.ico", True),
        ("/v1/chat/completions", False),
        ("/v1/messages", False),
        ("/", False),
    ],
)
def test_the_default_list(path: str, excluded: bool) -> None:
    assert (path in PathFilter(DEFAULT_EXCLUDE_PATHS)) is excluded


def test_the_variable_replaces_the_list_and_default_stands_for_it() -> None:
    only = Settings.from_env({"VDM_EXCLUDE_PATHS": "/internal/, *.txt"}).exclude_paths
    assert only == ("/internal", "*.txt")
    more = Settings.from_env({"VDM_EXCLUDE_PATHS": "default,/internal"}).exclude_paths
    assert more == (*DEFAULT_EXCLUDE_PATHS, "/internal")
    assert Settings.from_env({"VDM_EXCLUDE_PATHS": "none"}).exclude_paths == ()
    assert Settings.from_env({}, {"exclude_paths": []}).exclude_paths == ()
    assert not PathFilter(())
    for bad in ("health", "/a b", "*.", "/static/*", "**.js"):
        with pytest.raises(ConfigError, match="VDM_EXCLUDE_PATHS"):
            Settings.from_env({"VDM_EXCLUDE_PATHS": bad})


def _answer(content_type: bytes) -> Any:
    seen: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        seen.append(current_request())
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type)],
            }
        )
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    app.seen = seen  # type: ignore[attr-defined]
    return app


async def test_an_excluded_path_is_not_reported_at_all() -> None:
    recorder = Recorded()
    app = _answer(b"application/json")
    mw = RequestMetricsMiddleware(app, recorder, exclude=["/healthz"])
    sent = await _run(mw, _scope("/healthz", None), [{"type": "http.request"}])
    assert recorder.calls == [] and app.seen == [None]
    assert all(k != b"x-request-id" for k, _ in sent[0]["headers"])


async def test_a_get_answered_with_an_event_stream_leaves_the_view() -> None:
    recorder = Recorded()
    mw = RequestMetricsMiddleware(_answer(b"text/event-stream"), recorder)
    await _run(mw, _scope("/events", None), [{"type": "http.request"}])
    assert [kind for kind, _, _ in recorder.calls] == ["start", "discard"]


async def test_an_llm_stream_is_a_post_and_is_reported() -> None:
    recorder = Recorded()
    mw = RequestMetricsMiddleware(_answer(b"text/event-stream"), recorder)
    body = b'{"model": "m", "stream": true}'
    await _run(mw, _scope("/v1/chat/completions", body), [{"type": "http.request", "body": body}])
    kinds = [kind for kind, _, _ in recorder.calls]
    assert kinds[0] == "start" and kinds[-1] == "end" and "discard" not in kinds


async def test_a_discarded_request_leaves_no_row_and_no_finished_entry(
    fake_redis: aioredis.Redis,
) -> None:
    keys = Keys("u")
    pub = Publisher(_settings(), fake_redis)
    await _drain(pub)
    # Discarded before its start went out: nothing is sent at all.
    pub.start(_row("early"))
    pub.discard("early", 200)
    assert [e["type"] for e in pub._events] == [""]
    # Discarded after: an end takes the row away; no completed entry either way.
    pub.start(_row("late"))
    await _drain(pub)
    assert set((await read_worker_state(fake_redis, keys, "w1")).rows) == {"late"}
    pub.discard("late", 200)
    await _drain(pub)
    assert (await read_worker_state(fake_redis, keys, "w1")).rows == {}
    assert await fake_redis.xlen(keys.completed) == 0
    assert pub.active == {}
