"""``vdm-hub up``'s table of parts: what starts, in which order, on which port, and the
messages a busy port gives (the processes themselves are exercised in tests/system/test_up.py)."""

from __future__ import annotations

import argparse
import socket

import pytest

from vdm_hub.services.up import busy_ports_message, configure, plan
from vdm_hub.shared.settings import Settings

pytestmark = pytest.mark.timeout(10)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(list(argv))


def test_parts_start_in_dependency_order_with_their_ports() -> None:
    parts = plan(_args("--workers", "2"), Settings(), {}, 8050)
    assert [p.name for p in parts] == [
        "redis", "upstream", "worker-1", "worker-2", "stream", "dashboard", "load",
    ]  # fmt: skip
    assert {p.name: p.port for p in parts if p.option} == {
        "redis": 6379, "upstream": 8001, "worker-1": 8080, "worker-2": 8081,
        "stream": 8090, "dashboard": 8050,
    }  # fmt: skip
    for i, part in enumerate(parts):
        earlier = {p.name for p in parts[:i]}
        assert set(part.needs) <= earlier, f"{part.name} needs a part that starts after it"


def test_urls_flow_from_ready_parts_into_commands_and_environments() -> None:
    parts = {p.name: p for p in plan(_args("--workers", "1"), Settings(), {"X": "1"}, 8050)}
    urls = {
        "redis": "redis://127.0.0.1:1/0",
        "upstream": "http://127.0.0.1:2",
        "worker-1": "http://127.0.0.1:3",
        "stream": "http://127.0.0.1:4",
        "dashboard": "http://127.0.0.1:5",
    }
    assert "http://127.0.0.1:2" in parts["worker-1"].argv(urls)
    assert parts["worker-1"].env(urls)["VDM_WORKER_ID"] == "worker-1"
    assert parts["stream"].env(urls)["REDIS_URL"] == urls["redis"]
    assert parts["stream"].env(urls)["VDM_CANCEL_ENABLED"] == "true"
    assert "http://127.0.0.1:8050" in parts["stream"].env(urls)["VDM_CORS_ORIGINS"]
    # The page finds the stream at the stream's port of the host it came from.
    assert "VDM_STREAM_PUBLIC_URL" not in parts["dashboard"].env(urls)
    argv = parts["dashboard"].argv(urls)
    assert argv[argv.index("--stream-port") + 1] == "4"
    assert "http://127.0.0.1:3" in parts["load"].argv(urls)
    assert all(p.env(urls)["X"] == "1" for p in parts.values())


def test_an_external_redis_and_no_demo_traffic_drop_those_parts() -> None:
    settings = Settings(redis_url="redis://10.0.0.1:6379/0")
    names = [p.name for p in plan(_args("--no-demo-traffic"), settings, {}, 8050)]
    assert "redis" not in names and "load" not in names


def test_auto_ports_bind_port_zero_except_the_dashboard_picked_up_front() -> None:
    parts = plan(_args("--ports", "auto"), Settings(), {}, 45678)
    assert {p.name: p.port_arg(True) for p in parts if p.option} == {
        "redis": "0", "upstream": "0", "worker-1": "0", "worker-2": "0",
        "stream": "0", "dashboard": "45678",
    }  # fmt: skip


def test_two_parts_on_one_port_name_both_options() -> None:
    parts = plan(_args("--stream-port", "8050"), Settings(), {}, 8050)
    message = busy_ports_message("127.0.0.1", parts)
    assert message is not None
    assert "--dashboard-port" in message and "--stream-port" in message


def test_a_busy_port_names_the_option_that_moves_it() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        parts = plan(_args("--upstream-port", str(port)), Settings(), {}, 8050)
        message = busy_ports_message("127.0.0.1", parts)
    assert message is not None
    assert f"port {port} on 127.0.0.1 is in use (wanted by the demo upstream)" in message
    assert "--upstream-port" in message and "--ports auto" in message


def _stream_env(*argv: str, settings: Settings | None = None, **env: str) -> dict[str, str]:
    parts = {p.name: p for p in plan(_args(*argv), settings or Settings(), env, 8050)}
    return parts["stream"].env({"redis": "redis://127.0.0.1:1/0"})


def test_open_to_the_network_redis_stays_on_loopback_and_cancel_stays_off() -> None:
    parts = {p.name: p for p in plan(_args("--host", "0.0.0.0"), Settings(), {}, 8050)}
    redis_argv = parts["redis"].argv({})
    assert redis_argv[redis_argv.index("--host") + 1] == "127.0.0.1"
    worker_argv = parts["worker-1"].argv({"upstream": "http://127.0.0.1:2"})
    assert worker_argv[worker_argv.index("--host") + 1] == "0.0.0.0"
    env = _stream_env("--host", "0.0.0.0")
    assert "VDM_CANCEL_ENABLED" not in env  # the stream service's default: off
    # Browsers elsewhere name this machine their own way: any host on the dashboard's port.
    assert "http://*:8050" in env["VDM_CORS_ORIGINS"].split(",")
    assert "http://localhost:8050" in env["VDM_CORS_ORIGINS"].split(",")


def test_cancel_is_on_for_the_local_demo_or_with_a_token_or_when_asked() -> None:
    assert _stream_env()["VDM_CANCEL_ENABLED"] == "true"
    assert "http://*:8050" not in _stream_env()["VDM_CORS_ORIGINS"]
    token = Settings(auth_token="t" * 32)
    assert _stream_env("--host", "0.0.0.0", settings=token)["VDM_CANCEL_ENABLED"] == "true"
    asked = _stream_env("--host", "0.0.0.0", VDM_CANCEL_ENABLED="true")
    assert asked["VDM_CANCEL_ENABLED"] == "true"  # the caller's own value, passed through
    refused = _stream_env(VDM_CANCEL_ENABLED="false")
    assert refused["VDM_CANCEL_ENABLED"] == "false"
