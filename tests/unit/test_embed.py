"""``vdm_hub.instrument`` at wrap time: settings come from the environment with options on top,
a bad one fails at once naming it, wrapping twice gives the same app, the switch turns it off,
and ``import vdm_hub`` stays cheap."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from typing import Any

import pytest

import vdm_hub
from vdm_hub.services.proxy.embed import InstrumentedApp


async def app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called at wrap time")


def test_options_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VDM_KEY_PREFIX", "from-env")
    monkeypatch.setenv("VDM_WORKER_TTL", "20")
    wrapped = vdm_hub.instrument(app, key_prefix="from-option", worker_id="gw-{pid}")
    assert isinstance(wrapped, InstrumentedApp)
    settings = wrapped.settings
    assert (settings.key_prefix, settings.worker_ttl, settings.worker_id) == (
        "from-option",
        20.0,
        "gw-{pid}",
    )
    assert wrapped.publisher is None  # created in the process that serves, not here


@pytest.mark.parametrize(
    ("env", "options", "named"),
    [
        ({"VDM_WORKER_TTL": "soon"}, {}, "VDM_WORKER_TTL"),
        ({}, {"worker_ttl": "soon"}, "worker_ttl"),
        ({}, {"redis_url": "http://user:s3cr3t@h"}, "redis_url"),
        ({}, {"worker_id": "a b"}, "worker_id"),
        ({}, {"instrument": "maybe"}, "instrument"),
    ],
)
def test_a_bad_setting_fails_at_wrap_time_naming_it(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], options: dict[str, Any], named: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(vdm_hub.ConfigError, match=named) as caught:
        vdm_hub.instrument(app, **options)
    assert "s3cr3t" not in str(caught.value)


def test_an_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="redis_ulr"):
        vdm_hub.instrument(app, redis_ulr="redis://h")


def test_wrapping_twice_gives_the_same_app() -> None:
    once = vdm_hub.instrument(app)
    assert vdm_hub.instrument(once) is once


def test_vdm_instrument_false_leaves_the_app_alone_whatever_log_request_metrics_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VDM_INSTRUMENT", "false")
    assert vdm_hub.instrument(app) is app
    monkeypatch.setenv("VDM_INSTRUMENT", "true")
    # vandamme-proxy's own dashboard switch: not ours to read.
    monkeypatch.setenv("LOG_REQUEST_METRICS", "false")
    assert isinstance(vdm_hub.instrument(app), InstrumentedApp)


@pytest.mark.timeout(30)
def test_import_vdm_hub_loads_no_server_redis_or_ui_code() -> None:
    heavy = ("starlette", "redis", "fastapi", "dash", "plotly", "httpx", "uvicorn")
    code = (
        "import sys, vdm_hub\n"
        "assert {'instrument', 'current_request', 'RequestHandle', 'ConfigError'} <= "
        "set(vdm_hub.__all__)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))\n"
        "vdm_hub.current_request\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=25, check=True
    ).stdout.splitlines()
    assert out == ["[]", "[]"]


@pytest.mark.timeout(30)
async def test_redis_unreachable_from_the_start_is_said_once_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from vdm_hub.services.proxy.publisher import Publisher
    from vdm_hub.shared.embedded_redis import free_port
    from vdm_hub.shared.settings import Settings

    url = f"redis://:s3cr3t-pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    publisher = Publisher(Settings.from_env({"REDIS_URL": url, "VDM_WORKER_ID": "w"}))
    caplog.set_level(logging.DEBUG)
    await publisher.start_background()
    try:
        async with asyncio.timeout(20):
            while publisher.flush_failures < 3:
                await asyncio.sleep(0.05)
    finally:
        await publisher.close(grace=0.5)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    unreachable = [m for m in said if "cannot be reached" in m]
    assert len(unreachable) == 1 and "redis://***@127.0.0.1" in unreachable[0]
    assert "s3cr3t" not in caplog.text
