from __future__ import annotations

import pytest

from shared.settings import ConfigError, Settings
from tests.procs import vdm_hub


def test_defaults_match_the_contract() -> None:
    s = Settings.from_env({})
    assert (s.log_request_metrics, s.sse_enabled, s.sse_interval, s.sse_heartbeat) == (
        True,
        True,
        2.0,
        30.0,
    )
    assert (s.key_prefix, s.worker_heartbeat_interval, s.worker_ttl) == ("vdm", 2.0, 10.0)
    assert s.redis_url is None and s.worker_id  # host-pid


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LOG_REQUEST_METRICS": "maybe"}, "LOG_REQUEST_METRICS"),
        ({"VDM_ACTIVE_REQUESTS_SSE_INTERVAL": "fast"}, "VDM_ACTIVE_REQUESTS_SSE_INTERVAL"),
        ({"VDM_ACTIVE_REQUESTS_SSE_HEARTBEAT": "-1"}, "VDM_ACTIVE_REQUESTS_SSE_HEARTBEAT"),
        ({"VDM_WORKER_TTL": "abc"}, "VDM_WORKER_TTL"),
        ({"VDM_WORKER_TTL": "1", "VDM_WORKER_HEARTBEAT_INTERVAL": "2"}, "VDM_WORKER_TTL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"VDM_UPSTREAM_URL": "localhost:8000"}, "VDM_UPSTREAM_URL"),
        ({"VDM_KEY_PREFIX": "a b"}, "VDM_KEY_PREFIX"),
        ({"VDM_WORKER_ID": "x:y"}, "VDM_WORKER_ID"),
        ({"VDM_MAX_SSE_CLIENTS": "0"}, "VDM_MAX_SSE_CLIENTS"),
        ({"VDM_CORS_ORIGINS": "example.com"}, "VDM_CORS_ORIGINS"),
        ({"VDM_CORS_ORIGINS": "*", "VDM_AUTH_TOKEN": "t"}, "VDM_CORS_ORIGINS"),
        ({"VDM_STREAM_PUBLIC_URL": "ftp://x"}, "VDM_STREAM_PUBLIC_URL"),
    ],
)
def test_bad_value_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_values_parse() -> None:
    s = Settings.from_env(
        {
            "LOG_REQUEST_METRICS": "false",
            "VDM_CORS_ORIGINS": "http://a:1, https://b",
            "VDM_STREAM_PUBLIC_URL": "http://localhost:8090/",
            "VDM_MAX_SSE_CLIENTS": "5",
        }
    )
    assert s.log_request_metrics is False
    assert s.cors_origins == ("http://a:1", "https://b")
    assert s.stream_public_url == "http://localhost:8090"
    assert s.max_sse_clients == 5


@pytest.mark.system
@pytest.mark.parametrize("command", ["worker", "stream"])
def test_service_with_bad_setting_exits_naming_the_variable(command: str) -> None:
    args = ["--upstream", "http://127.0.0.1:9"] if command == "worker" else []
    proc = vdm_hub(command, *args, "--port", "0", env={"VDM_WORKER_TTL": "soon"})
    assert proc.popen.wait(30) == 2
    proc.stop()
    assert "VDM_WORKER_TTL" in proc.output and "Traceback" not in proc.output
