"""Settings, read once from a mapping (normally ``os.environ``) and then frozen.

Every process of the hub reads the same variables; each uses the ones it needs. A value that
does not parse stops start-up with a :class:`ConfigError` naming the variable, so a typo in a
deployment fails loudly instead of running with a surprise default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
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


# The placeholders VDM_WORKER_ID may hold; the serving process fills them in when its
# publisher starts (after any fork), `{index}` at registration (services/proxy/workerid.py).
WORKER_ID_PLACEHOLDERS = ("{host}", "{pid}", "{index}")
DEFAULT_WORKER_ID = "{host}-{pid}"


def _worker_id(name: str, raw: str) -> str:
    value = raw.strip()
    bare = value
    for placeholder in WORKER_ID_PLACEHOLDERS:
        bare = bare.replace(placeholder, "")
    if (
        not value
        or len(value) > 128
        or value.count("{index}") > 1
        or any(c.isspace() or c in "{}*?[]:" for c in bare)
    ):
        raise ConfigError(
            f"{name}={raw!r}: expected 1-128 characters without spaces, colons, braces or globs; "
            "it may hold the placeholders {host}, {pid} and (once) {index}"
        )
    return value


def _origins(name: str, raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        any_host = parts.netloc.startswith("*")
        try:
            port = parts.port
        except ValueError:
            port = None
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path
            or (any_host and (parts.hostname != "*" or port is None))
            or ("*" in parts.netloc and not any_host)
        ):
            raise ConfigError(
                f"{name}: {origin!r} is not an origin (expected scheme://host[:port], "
                "scheme://*:port for any host name on that port, or *)"
            )
    return origins


def any_host_origin_regex(origins: tuple[str, ...]) -> str | None:
    """One regular expression for the ``scheme://*:port`` entries of ``VDM_CORS_ORIGINS``:
    a page served on that port under any host name (``vdm-hub up --host 0.0.0.0`` lists its
    dashboard this way: browsers on other machines reach it by names this one cannot know)."""
    found = []
    for origin in origins:
        parts = urlsplit(origin)
        if parts.hostname == "*":
            found.append(f"{re.escape(parts.scheme)}://[^/@]+:{parts.port}")
    return "|".join(f"(?:{p})" for p in found) or None


def _token(name: str, raw: str) -> str:
    # A token read from a file usually ends with a newline; a header value never carries one.
    value = raw.strip()
    if any(c.isspace() for c in value):
        raise ConfigError(f"{name}: the token must not contain spaces or line breaks")
    return value


# Requests an instrumented app does not report: health and metrics probes, the hub's own
# endpoints, API docs, static files. An entry `/x` matches the path /x and every path below
# it; `*.ext` matches paths ending in .ext. VDM_EXCLUDE_PATHS replaces the list; `default`
# stands for it.
DEFAULT_EXCLUDE_PATHS: tuple[str, ...] = (
    "/health",
    "/healthz",
    "/readyz",
    "/livez",
    "/ping",
    "/metrics",
    "/_vdm",
    "/docs",
    "/openapi.json",
    "/favicon.ico",
    "/robots.txt",
    "/static",
    "*.css",
    "*.js",
    "*.map",
    "*.png",
    "*.svg",
    "*.ico",
    "*.woff2",
)


def _exclude_paths(name: str, raw: str) -> tuple[str, ...]:
    found: list[str] = []
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        if item == "default":
            found += DEFAULT_EXCLUDE_PATHS
        elif item == "none":
            continue
        elif item.startswith("/") and "*" not in item and not any(c.isspace() for c in item):
            found.append(item.rstrip("/") or "/")
        elif item.startswith("*.") and len(item) > 2 and not any(c in "*/ " for c in item[1:]):
            found.append(item)
        else:
            raise ConfigError(
                f"{name}: {item!r} is not a path (/health: it and every path below it) or a "
                "suffix (*.css); 'default' stands for the default list, 'none' for nothing"
            )
    return tuple(dict.fromkeys(found))


_BYTES = re.compile(r"(\d+)\s*(k|kb|kib|m|mb|mib|g|gb|gib)?", re.IGNORECASE)


def _byte_size(name: str, raw: str) -> int:
    match = _BYTES.fullmatch(raw.strip())
    if match is None:
        raise ConfigError(f"{name}={raw!r}: expected a number of bytes, e.g. 33554432 or 32MiB")
    unit = (match.group(2) or " ")[0].lower()
    value = int(match.group(1)) * {" ": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]
    if value <= 0:
        raise ConfigError(f"{name}={raw!r}: expected more than 0 bytes")
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


# The commands that read a variable, for their ``--help`` (``vdm-hub up`` passes every
# variable on to its parts, so it lists them all).
WORKER, STREAM, DASHBOARD = "worker", "stream", "dashboard"
REDIS_READERS = (WORKER, STREAM)
_REDIS_DEFAULT = "redis://127.0.0.1:6379/0; vdm-hub up: an embedded Redis"

_Parser = Callable[[str, str], object]


def _env(name: str, parse: _Parser, *readers: str, shown: str = "") -> dict[str, object]:
    """A field's metadata: its variable, the parser of its value, who reads it, and (when the
    field's own default says nothing useful) how its default is shown."""
    return {"env": name, "parse": parse, "readers": readers, "shown": shown}


@dataclass(frozen=True, slots=True)
class Settings:
    """All of the hub's settings. Field metadata (``_env``) is the single source of the
    variables' names, parsers and readers: ``from_env``, each command's ``--help`` and the
    README table's test all read it."""

    # From the original single-process dashboard: same names, same meaning.
    log_request_metrics: bool = field(
        default=True, metadata=_env("LOG_REQUEST_METRICS", _bool, WORKER, STREAM)
    )
    sse_enabled: bool = field(
        default=True, metadata=_env("VDM_ACTIVE_REQUESTS_SSE_ENABLED", _bool, STREAM)
    )
    sse_interval: float = field(
        default=2.0,
        metadata=_env("VDM_ACTIVE_REQUESTS_SSE_INTERVAL", _seconds, STREAM, DASHBOARD),
    )
    sse_heartbeat: float = field(
        default=30.0, metadata=_env("VDM_ACTIVE_REQUESTS_SSE_HEARTBEAT", _seconds, STREAM)
    )
    # New with the distributed hub.
    redis_url: str | None = field(
        default=None,
        metadata=_env("REDIS_URL", _redis_url, *REDIS_READERS, shown=_REDIS_DEFAULT),
    )
    key_prefix: str = field(
        default="vdm", metadata=_env("VDM_KEY_PREFIX", _key_prefix, *REDIS_READERS)
    )
    # A template: the serving process fills in its placeholders (WORKER_ID_PLACEHOLDERS).
    worker_id: str = field(
        default=DEFAULT_WORKER_ID, metadata=_env("VDM_WORKER_ID", _worker_id, WORKER)
    )
    upstream_url: str | None = field(
        default=None, metadata=_env("VDM_UPSTREAM_URL", http_url, WORKER)
    )
    worker_heartbeat_interval: float = field(
        default=DEFAULT_HEARTBEAT_INTERVAL_S,
        metadata=_env("VDM_WORKER_HEARTBEAT_INTERVAL", _seconds, WORKER, STREAM),
    )
    worker_ttl: float = field(
        default=DEFAULT_WORKER_TTL_S, metadata=_env("VDM_WORKER_TTL", _seconds, WORKER)
    )
    stream_public_url: str | None = field(
        default=None,
        metadata=_env("VDM_STREAM_PUBLIC_URL", http_url, STREAM, DASHBOARD, shown="same origin"),
    )
    cors_origins: tuple[str, ...] = field(
        default=(), metadata=_env("VDM_CORS_ORIGINS", _origins, STREAM)
    )
    auth_token: str | None = field(
        default=None, metadata=_env("VDM_AUTH_TOKEN", _token, STREAM, DASHBOARD)
    )
    max_sse_clients: int = field(
        default=10_000, metadata=_env("VDM_MAX_SSE_CLIENTS", _positive_int, STREAM)
    )
    # Tunables beyond the contract (documented in the README table).
    sse_throttle: float = field(
        default=0.025, metadata=_env("VDM_ACTIVE_REQUESTS_SSE_THROTTLE", _seconds, STREAM)
    )
    sse_send_timeout: float = field(
        default=10.0, metadata=_env("VDM_SSE_SEND_TIMEOUT", _seconds, STREAM)
    )
    completed_maxlen: int = field(
        default=10_000, metadata=_env("VDM_COMPLETED_MAXLEN", _positive_int, WORKER)
    )
    # Fleet scale: a stream without delta=1 gets snapshot frames paced to this many bytes/s.
    sse_snapshot_max_bps: int = field(
        default=1_000_000, metadata=_env("VDM_SSE_SNAPSHOT_MAX_BPS", _positive_int, STREAM)
    )
    # Operator features.
    cancel_enabled: bool = field(default=False, metadata=_env("VDM_CANCEL_ENABLED", _bool, STREAM))
    stuck_after: float = field(default=300.0, metadata=_env("VDM_STUCK_AFTER", _seconds, STREAM))
    stall_after: float = field(default=30.0, metadata=_env("VDM_STALL_AFTER", _seconds, STREAM))
    # Managed and highly available Redis.
    redis_mode: str = field(
        default="standalone", metadata=_env("VDM_REDIS_MODE", _redis_mode, *REDIS_READERS)
    )
    redis_sentinels: tuple[tuple[str, int], ...] = field(
        default=(), metadata=_env("VDM_REDIS_SENTINELS", _host_ports, *REDIS_READERS)
    )
    redis_sentinel_master: str = field(
        default="mymaster",
        metadata=_env("VDM_REDIS_SENTINEL_MASTER", _name, *REDIS_READERS),
    )
    # Bring your own proxy: vdm_hub.instrument() and the worker's publisher.
    instrument: bool = field(default=True, metadata=_env("VDM_INSTRUMENT", _bool, WORKER))
    cancel: bool = field(default=True, metadata=_env("VDM_WORKER_CANCEL", _bool, WORKER))
    exclude_paths: tuple[str, ...] = field(
        default=DEFAULT_EXCLUDE_PATHS,
        metadata=_env("VDM_EXCLUDE_PATHS", _exclude_paths, WORKER, shown="default"),
    )
    completed_backlog_bytes: int = field(
        default=32 << 20,
        metadata=_env("VDM_COMPLETED_BACKLOG_BYTES", _byte_size, WORKER, shown="32MiB"),
    )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, object] | None = None,
    ) -> Settings:
        """Read the variables from ``environ`` (``os.environ`` by default).

        ``overrides`` are options by attribute name (``redis_url``, ``worker_id``...), as
        ``vdm_hub.instrument(app, **options)`` takes them: they win over the environment and are
        checked like their variable (a bad one is named by its option name); None means unset.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for var, (attr, parse) in _VARIABLES.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[attr] = parse(var, raw)
        for attr, value in (overrides or {}).items():
            if attr not in _PARSERS:
                known = ", ".join(sorted(_PARSERS))
                raise TypeError(f"unknown option {attr!r} (the options are: {known})")
            values.pop(attr, None)
            if value is not None:
                values[attr] = _PARSERS[attr](attr, _option_text(attr, value))
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


# env var -> (Settings attribute, parser), from the fields' metadata.
_VARIABLES: dict[str, tuple[str, _Parser]] = {
    f.metadata["env"]: (f.name, f.metadata["parse"]) for f in fields(Settings)
}


def variables_read_by(command: str) -> list[tuple[str, str]]:
    """(variable, its default as shown) for each variable ``command`` reads, in field order."""
    found = []
    for f in fields(Settings):
        if command != "up" and command not in f.metadata["readers"]:
            continue
        default = f.metadata["shown"] or f.default
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, float):
            default = f"{default:g}"
        found.append((f.metadata["env"], "unset" if default in (None, ()) else str(default)))
    return found


# Settings attribute -> its parser: an option given in code is checked like its variable.
_PARSERS: dict[str, _Parser] = {attr: parse for attr, parse in _VARIABLES.values()}


def _option_text(name: str, value: object) -> str:
    """An option's value as its variable would spell it (one parser checks both)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        items = [f"{i[0]}:{i[1]}" if isinstance(i, tuple) and len(i) == 2 else i for i in value]
        if all(isinstance(i, str) for i in items):
            # An empty list is "nothing", which only VDM_EXCLUDE_PATHS can say.
            return ",".join(items) if items else "none"
    raise ConfigError(f"{name}={value!r}: expected a string, a number, true/false or a list")
