from __future__ import annotations

import pytest

from tests.procs import vdm_hub
from vdm_hub.shared.settings import ConfigError, Settings, hash_tag


def test_defaults_match_the_contract() -> None:
    s = Settings.from_env({})
    assert (s.log_request_metrics, s.sse_enabled, s.sse_interval, s.sse_heartbeat) == (
        True,
        True,
        2.0,
        30.0,
    )
    assert (s.key_prefix, s.worker_heartbeat_interval, s.worker_ttl) == ("vdm", 2.0, 10.0)
    assert s.redis_url is None and s.worker_id == "{host}-{pid}"  # filled in when serving
    assert (s.instrument, s.cancel, s.completed_backlog_bytes) == (True, True, 32 << 20)
    assert (s.stuck_after, s.stall_after) == (300.0, 30.0)


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
        ({"VDM_STALL_AFTER": "soon"}, "VDM_STALL_AFTER"),
        ({"VDM_CORS_ORIGINS": "example.com"}, "VDM_CORS_ORIGINS"),
        ({"VDM_CORS_ORIGINS": "http://*"}, "VDM_CORS_ORIGINS"),  # any host: on a port only
        ({"VDM_CORS_ORIGINS": "http://a*.example:1"}, "VDM_CORS_ORIGINS"),
        ({"VDM_CORS_ORIGINS": "*", "VDM_AUTH_TOKEN": "t"}, "VDM_CORS_ORIGINS"),
        ({"VDM_STREAM_PUBLIC_URL": "ftp://x"}, "VDM_STREAM_PUBLIC_URL"),
        ({"REDIS_URL": "redis://h:63a9/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h:70000/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis:///0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h:6379/zero"}, "REDIS_URL"),
        ({"REDIS_URL": "unix://"}, "REDIS_URL"),
        ({"VDM_KEY_PREFIX": "{}"}, "VDM_KEY_PREFIX"),
        ({"VDM_KEY_PREFIX": "{a}{b}"}, "VDM_KEY_PREFIX"),
        ({"VDM_KEY_PREFIX": "}a{"}, "VDM_KEY_PREFIX"),
        ({"VDM_KEY_PREFIX": "{a"}, "VDM_KEY_PREFIX"),
        ({"VDM_KEY_PREFIX": "{{a}}"}, "VDM_KEY_PREFIX"),
        ({"VDM_REDIS_MODE": "cluster"}, "VDM_KEY_PREFIX"),
        ({"VDM_REDIS_MODE": "cluster", "VDM_KEY_PREFIX": "vdm"}, "VDM_KEY_PREFIX"),
        (
            {"VDM_REDIS_MODE": "cluster", "VDM_KEY_PREFIX": "{v}", "REDIS_URL": "redis://h/2"},
            "REDIS_URL",
        ),
        ({"VDM_REDIS_MODE": "sentinel"}, "VDM_REDIS_SENTINELS"),
        ({"VDM_REDIS_SENTINELS": "h"}, "VDM_REDIS_SENTINELS"),
        ({"VDM_AUTH_TOKEN": "two words"}, "VDM_AUTH_TOKEN"),
        ({"VDM_INSTRUMENT": "maybe"}, "VDM_INSTRUMENT"),
        ({"VDM_WORKER_CANCEL": "maybe"}, "VDM_WORKER_CANCEL"),
        ({"VDM_EXCLUDE_PATHS": "health"}, "VDM_EXCLUDE_PATHS"),
        ({"VDM_COMPLETED_BACKLOG_BYTES": "1.5M"}, "VDM_COMPLETED_BACKLOG_BYTES"),
        ({"VDM_COMPLETED_BACKLOG_BYTES": "0"}, "VDM_COMPLETED_BACKLOG_BYTES"),
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


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:s3cr3t-pw@h:63a9/0",
        "redis://:s3cr3t-pw@h:x/0",
        "rediss://s3cr3t-pw@h/zero",
        "http://user:s3cr3t-pw@h:6379",
        "s3cr3t-pw@h:6379",
    ],
)
def test_a_bad_redis_url_is_named_but_its_password_never_shown(url: str) -> None:
    with pytest.raises(ConfigError, match="REDIS_URL") as caught:
        Settings.from_env({"REDIS_URL": url})
    assert "s3cr3t" not in str(caught.value) and "***" in str(caught.value)


def test_redis_urls_that_are_fine_parse() -> None:
    for url in ("redis://h", "redis://h:6379", "rediss://u:p@h:6380/3", "unix:///run/r.sock"):
        assert Settings.from_env({"REDIS_URL": url}).redis_url == url


def test_auth_token_from_a_file_loses_its_newline() -> None:
    assert Settings.from_env({"VDM_AUTH_TOKEN": "  tok3n\n"}).auth_token == "tok3n"
    assert Settings.from_env({"VDM_AUTH_TOKEN": " \n"}).auth_token is None


@pytest.mark.parametrize("prefix", ["{vdm}", "app-{fleet1}", "{x}:y", "vdm"])
def test_a_prefix_may_carry_one_hash_tag(prefix: str) -> None:
    assert Settings.from_env({"VDM_KEY_PREFIX": prefix}).key_prefix == prefix


def test_cluster_mode_with_a_hash_tagged_prefix() -> None:
    s = Settings.from_env(
        {"VDM_REDIS_MODE": "cluster", "VDM_KEY_PREFIX": "{vdm}", "REDIS_URL": "redis://n1:7000"}
    )
    assert (s.redis_mode, hash_tag(s.key_prefix)) == ("cluster", "vdm")
    with pytest.raises(ConfigError, match=r"VDM_KEY_PREFIX='vdm'.*hash-tagged"):
        Settings.from_env({"VDM_REDIS_MODE": "cluster"})


def test_sentinel_mode_reads_its_sentinels() -> None:
    s = Settings.from_env(
        {"VDM_REDIS_MODE": "sentinel", "VDM_REDIS_SENTINELS": "a:26379, [::1]:26380"}
    )
    assert s.redis_sentinels == (("a", 26379), ("::1", 26380))
    assert s.redis_sentinel_master == "mymaster"


def test_an_any_host_origin_becomes_one_pattern() -> None:
    from vdm_hub.shared.settings import any_host_origin_regex

    s = Settings.from_env({"VDM_CORS_ORIGINS": "http://*:8050, https://ops.example"})
    assert s.cors_origins == ("http://*:8050", "https://ops.example")
    assert any_host_origin_regex(s.cors_origins) == "(?:http://[^/@]+:8050)"
    assert any_host_origin_regex(("https://ops.example",)) is None


def test_a_backlog_bound_may_carry_a_unit() -> None:
    for raw, value in (("33554432", 32 << 20), ("32MiB", 32 << 20), ("64 kb", 64 << 10)):
        settings = Settings.from_env({"VDM_COMPLETED_BACKLOG_BYTES": raw})
        assert settings.completed_backlog_bytes == value
