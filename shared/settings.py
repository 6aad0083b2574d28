"""Settings, read once from a mapping (normally ``os.environ``) and then frozen.

Every process of the hub reads the same variables; each uses the ones it needs. A value that
does not parse stops start-up with a :class:`ConfigError` naming the variable, so a typo in a
deployment fails loudly instead of running with a surprise default.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TypeVar
from urllib.parse import urlsplit

from vdm_hub.shared.schema import DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_WORKER_TTL_S

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected one of true/false, 1/0, yes/no, on/off")


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(f"{name}={raw!r}: expected a positive, finite number of seconds")
    return value


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: expected a whole number greater than 0")
    return value


def http_url(name: str, raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}={raw!r}: expected an http:// or https:// URL with a host")
    return raw.strip().rstrip("/")


def redacted_url(raw: str) -> str:
    """``raw`` with any user info (user name, password) replaced by ``***``: safe to print."""
    text = raw.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "***" if "@" in text else text
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}://{authority}{slash}{tail}"


def _redis_url(name: str, raw: str) -> str:
    # The value may carry a password: messages show it redacted, never as given.
    shown = redacted_url(raw)
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{name}={shown!r}: expected a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{name}={shown!r}: expected unix:///path/to/redis.sock")
        return value
    try:
        port = parts.port  # raises on a port that is not a number in 0-65535
    except ValueError:
        raise ConfigError(f"{name}={shown!r}: the port is not a number in 1-65535") from None
    if not parts.hostname or port == 0:
        raise ConfigError(f"{name}={shown!r}: expected redis[s]://[user:password@]host[:port][/db]")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"{name}={shown!r}: the database after the host must be a number")
    return value


def hash_tag(prefix: str) -> str | None:
    """The hash tag of ``prefix`` (the text between its braces), or None when untagged."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1)
    return prefix[start + 1 : end] if 0 <= start < end - 1 else None


def _key_prefix(name: str, raw: str) -> str:
    value = raw.strip()
    expected = (
        f"{name}={raw!r}: expected 1-64 characters without spaces or glob characters, "
        "with at most one hash tag such as {vdm}"
    )
    if not value or len(value) > 64 or any(c.isspace() or c in "*?[]" for c in value):
        raise ConfigError(expected)
    braces = value.count("{") + value.count("}")
    # Redis Cluster hashes only the text inside the first {...}: allow exactly one such tag,
    # non-empty, so every key of the fleet (all start with the prefix) shares one slot.
    if braces and (braces != 2 or value.count("{") != 1 or hash_tag(value) is None):
        raise ConfigError(expected)
    return value


def _worker_id(name: str, raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > 128 or any(c.isspace() or c in "{}*?[]:" for c in value):
        raise ConfigError(
            f"{name}={raw!r}: expected 1-128 characters without spaces, colons, braces or globs"
        )
    return value


def _origins(name: str, raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise ConfigError(
                f"{name}: {origin!r} is not an origin (expected scheme://host[:port], or *)"
            )
    return origins


def _token(name: str, raw: str) -> str:
    # A token read from a file usually ends with a newline; a header value never carries one.
    value = raw.strip()
    if any(c.isspace() for c in value):
        raise ConfigError(f"{name}: the token must not contain spaces or line breaks")
    return value


REDIS_MODES = ("standalone", "cluster", "sentinel")


def _redis_mode(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in REDIS_MODES:
        raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(REDIS_MODES)}")
    return value


def _host_ports(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    found: list[tuple[str, int]] = []
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name}: {item!r} is not host:port")
        found.append((host.strip("[]"), int(port)))
    if not found:
        raise ConfigError(f"{name}={raw!r}: expected a comma-separated list of host:port")
    return tuple(found)


def _name(name: str, raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{name}={raw!r}: expected a name without spaces")
    return value


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    """All of the hub's settings. Field metadata is the single source for the README table."""

    # From the original single-process dashboard: same names, same meaning.
    log_request_metrics: bool = True
    sse_enabled: bool = True
    sse_interval: float = 2.0
    sse_heartbeat: float = 30.0
    # New with the distributed hub.
    redis_url: str | None = None
    key_prefix: str = "vdm"
    worker_id: str = ""
    upstream_url: str | None = None
    worker_heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL_S
    worker_ttl: float = DEFAULT_WORKER_TTL_S
    stream_public_url: str | None = None
    cors_origins: tuple[str, ...] = ()
    auth_token: str | None = None
    max_sse_clients: int = 10_000
    # Tunables beyond the contract (documented in the README table).
    sse_throttle: float = 0.025
    sse_send_timeout: float = 10.0
    completed_maxlen: int = 10_000
    # Fleet scale: a stream without delta=1 gets snapshot frames paced to this many bytes/s.
    sse_snapshot_max_bps: int = 1_000_000
    # Operator features.
    cancel_enabled: bool = False
    stuck_after: float = 300.0
    stall_after: float = 30.0
    # Managed and highly available Redis.
    redis_mode: str = "standalone"
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "mymaster"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for var, (attr, parse) in _VARIABLES.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[attr] = parse(var, raw)
        if not values.get("worker_id"):
            values["worker_id"] = default_worker_id()
        if values.get("auth_token") == "":
            values["auth_token"] = None
        settings = cls(**values)  # type: ignore[arg-type]
        settings._check()
        return settings

    def _check(self) -> None:
        if self.sse_heartbeat < 0.05:
            raise ConfigError("VDM_ACTIVE_REQUESTS_SSE_HEARTBEAT: must be at least 0.05 seconds")
        if self.worker_ttl <= self.worker_heartbeat_interval:
            raise ConfigError(
                f"VDM_WORKER_TTL={self.worker_ttl}: must be longer than "
                f"VDM_WORKER_HEARTBEAT_INTERVAL={self.worker_heartbeat_interval}, or live "
                "workers would be reaped between two heartbeats"
            )
        if self.redis_mode == "sentinel" and not self.redis_sentinels:
            raise ConfigError(
                "VDM_REDIS_SENTINELS: required when VDM_REDIS_MODE=sentinel "
                "(a comma-separated list of sentinel host:port)"
            )
        if self.redis_mode == "cluster":
            self._check_cluster()
        if self.auth_token is not None and "*" in self.cors_origins:
            raise ConfigError(
                "VDM_CORS_ORIGINS: '*' is not allowed when VDM_AUTH_TOKEN is set; "
                "list the dashboard's origins instead"
            )

    def _check_cluster(self) -> None:
        if hash_tag(self.key_prefix) is None:
            raise ConfigError(
                f"VDM_KEY_PREFIX={self.key_prefix!r}: VDM_REDIS_MODE=cluster needs a hash-tagged "
                "prefix such as {vdm}, so that every key of the fleet lives in one hash slot "
                "(docs/deployment.md)"
            )
        url = self.redis_url or ""
        if url.startswith("unix:"):
            raise ConfigError("REDIS_URL: VDM_REDIS_MODE=cluster needs a redis:// or rediss:// URL")
        if urlsplit(url).path.strip("/") not in ("", "0"):
            raise ConfigError("REDIS_URL: Redis Cluster has only database 0; drop the /db part")


_Parser = Callable[[str, str], object]

# env var -> (Settings attribute, parser). Keep in step with the README settings table.
_VARIABLES: dict[str, tuple[str, _Parser]] = {
    "LOG_REQUEST_METRICS": ("log_request_metrics", _bool),
    "VDM_ACTIVE_REQUESTS_SSE_ENABLED": ("sse_enabled", _bool),
    "VDM_ACTIVE_REQUESTS_SSE_INTERVAL": ("sse_interval", _seconds),
    "VDM_ACTIVE_REQUESTS_SSE_HEARTBEAT": ("sse_heartbeat", _seconds),
    "REDIS_URL": ("redis_url", _redis_url),
    "VDM_KEY_PREFIX": ("key_prefix", _key_prefix),
    "VDM_WORKER_ID": ("worker_id", _worker_id),
    "VDM_UPSTREAM_URL": ("upstream_url", http_url),
    "VDM_WORKER_HEARTBEAT_INTERVAL": ("worker_heartbeat_interval", _seconds),
    "VDM_WORKER_TTL": ("worker_ttl", _seconds),
    "VDM_STREAM_PUBLIC_URL": ("stream_public_url", http_url),
    "VDM_CORS_ORIGINS": ("cors_origins", _origins),
    "VDM_AUTH_TOKEN": ("auth_token", _token),
    "VDM_MAX_SSE_CLIENTS": ("max_sse_clients", _positive_int),
    "VDM_ACTIVE_REQUESTS_SSE_THROTTLE": ("sse_throttle", _seconds),
    "VDM_SSE_SEND_TIMEOUT": ("sse_send_timeout", _seconds),
    "VDM_COMPLETED_MAXLEN": ("completed_maxlen", _positive_int),
    "VDM_SSE_SNAPSHOT_MAX_BPS": ("sse_snapshot_max_bps", _positive_int),
    "VDM_CANCEL_ENABLED": ("cancel_enabled", _bool),
    "VDM_STUCK_AFTER": ("stuck_after", _seconds),
    "VDM_STALL_AFTER": ("stall_after", _seconds),
    "VDM_REDIS_MODE": ("redis_mode", _redis_mode),
    "VDM_REDIS_SENTINELS": ("redis_sentinels", _host_ports),
    "VDM_REDIS_SENTINEL_MASTER": ("redis_sentinel_master", _name),
}

assert {a for a, _ in _VARIABLES.values()} == {f.name for f in fields(Settings)}
