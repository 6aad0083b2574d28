"""``vdm-hub up``: the whole hub on one machine, each part a separate process.

Start order follows the dependencies, each step waiting (bounded) for the children's
``<name> ready on <url>`` lines: Redis (embedded, unless ``REDIS_URL`` is set) and the demo
upstream; the workers and the stream service; the dashboard (it needs the stream's URL); the
demo traffic. Stop order is the reverse of use: traffic, dashboard, stream, workers (they
deregister while Redis is still there), upstream, Redis.

Addresses: every part binds ``--host`` but the embedded Redis, which stays on loopback (it has
no password). Beyond loopback without ``VDM_AUTH_TOKEN`` the demo's cancel action stays off,
and the dashboard's page finds the stream service on the host it was loaded from
(``--stream-port``), so a browser on another machine sees it live.

Ports: fixed defaults, checked before anything starts, so a busy port gives one clear message
naming the option that moves it. ``--ports auto`` gives every part a free port instead (tests
use it); the dashboard's port is then picked up front, because the stream service must know
the dashboard's origin (CORS) before the dashboard starts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

from vdm_hub.services.supervisor import Supervisor
from vdm_hub.shared.children import Child, ChildFailed, Stopped
from vdm_hub.shared.embedded_redis import free_port
from vdm_hub.shared.options import listen_host, number, port, whole
from vdm_hub.shared.serve import beyond_loopback
from vdm_hub.shared.settings import Settings

VDM_HUB = [sys.executable, "-m", "vdm_hub.services.cli"]
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
LOOPBACK = "127.0.0.1"
# Demo traffic: requests held open 1-5 s (x-demo-delay-ms) so rows stay long enough to watch.
DEMO_HOLD_S = "1-5"
# One line per proxied request (httpx logs at INFO) would bury everything else on the console.
MUTED = re.compile(r" INFO httpx: HTTP Request: ")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", type=listen_host, default="127.0.0.1", help="bind address [127.0.0.1]"
    )
    parser.add_argument("--workers", type=whole(1), default=2, help="worker proxies to run [2]")
    parser.add_argument(
        "--no-demo-traffic",
        dest="demo_traffic",
        action="store_false",
        help="do not run the demo traffic generator",
    )
    parser.add_argument("--dashboard-port", type=port, default=8050, help="[8050]")
    parser.add_argument("--stream-port", type=port, default=8090, help="[8090]")
    parser.add_argument(
        "--worker-base-port", type=port, default=8080, help="worker N gets base+N-1 [8080]"
    )
    parser.add_argument("--upstream-port", type=port, default=8001, help="demo upstream [8001]")
    parser.add_argument(
        "--redis-port", type=port, default=6379, help="embedded Redis, when REDIS_URL is unset"
    )
    parser.add_argument(
        "--ports",
        choices=("fixed", "auto"),
        default="fixed",
        help="fixed: the ports above; auto: a free port for every part [fixed]",
    )
    parser.add_argument(
        "--demo-rate", type=number(0), default=3.0, help="demo requests per second [3]"
    )
    parser.add_argument(
        "--ready-timeout",
        type=number(0.1),
        default=30.0,
        help="seconds each part may take to become ready [30]",
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the parts' log lines")


# -- the parts ---------------------------------------------------------------------------


Urls = Mapping[str, str]  # part name -> the reachable URL from its ready line


@dataclass(frozen=True)
class Part:
    """One process of the system; a list of these drives start, print and stop.

    Parts start in list order, each waiting for the ready lines of the parts it needs (every
    part before the first one it reads a URL of), and stop in reverse role order.
    """

    name: str  # the child's name, prefixing its log lines ("worker-1")
    label: str  # as printed and named in messages ("worker 1")
    role: str  # parts of one role stop together
    port: int  # the fixed port, or the one picked up front in auto mode
    option: str  # the option that moves its port ("" when it has none)
    argv: Callable[[Urls], list[str]]
    env: Callable[[Urls], dict[str, str]]
    needs: tuple[str, ...] = ()  # parts whose URLs argv/env read: they must be ready first
    echo: bool = True
    auto_port: bool = True  # in auto mode the part binds port 0 (a free port)
    host: str = ""  # its bind address when not the run's --host (the embedded Redis's)

    def port_arg(self, auto: bool) -> str:
        return "0" if auto and self.auto_port else str(self.port)


@dataclass(frozen=True)
class _Launch:
    """How this run starts a part: its command line and its environment."""

    host: str
    env: Mapping[str, str]

    def service(self, command: str, *extra: str, host: str = "") -> Callable[[Urls], list[str]]:
        return lambda urls: [*VDM_HUB, command, *extra, "--host", host or self.host]

    def plain_env(self) -> Callable[[Urls], dict[str, str]]:
        return lambda urls: dict(self.env)

    def with_redis(
        self, extra: Mapping[str, str] | None = None
    ) -> Callable[[Urls], dict[str, str]]:
        def build(urls: Urls) -> dict[str, str]:
            return {**self.env, "REDIS_URL": urls["redis"], **(extra or {})}

        return build


def plan(
    args: argparse.Namespace, settings: Settings, env: Mapping[str, str], dashboard_port: int
) -> list[Part]:
    """The table of parts for this run, in start order."""
    launch = _Launch(args.host, env)
    parts: list[Part] = []
    if settings.redis_url is None:
        # Loopback whatever --host says: the embedded Redis has no password, and only this
        # machine's parts use it (a fleet across machines brings its own Redis: REDIS_URL).
        parts.append(
            Part(
                "redis",
                "redis",
                "redis",
                args.redis_port,
                "--redis-port",
                launch.service("redis", host=LOOPBACK),
                launch.plain_env(),
                host=LOOPBACK,
            )
        )
    parts.append(
        Part(
            "upstream",
            "demo upstream",
            "upstream",
            args.upstream_port,
            "--upstream-port",
            # A realistic gap between a stream's preamble and its first token, so the demo's
            # TTFT column is not just the first byte's time.
            launch.service("demo-upstream", "--first-token-delay", "0.4"),
            launch.plain_env(),
        )
    )
    workers = _worker_parts(args, launch)
    parts += workers
    worker_names = tuple(w.name for w in workers)
    parts.append(_stream_part(args, settings, launch, dashboard_port))
    parts.append(_dashboard_part(launch, dashboard_port, worker_names))
    if args.demo_traffic:
        parts.append(_load_part(args, launch, worker_names))
    return parts


def _worker_parts(args: argparse.Namespace, launch: _Launch) -> list[Part]:
    def argv(urls: Urls) -> list[str]:
        return [*VDM_HUB, "worker", "--upstream", urls["upstream"], "--host", launch.host]

    return [
        Part(
            f"worker-{i}",
            f"worker {i}",
            "worker",
            args.worker_base_port + i - 1,
            "--worker-base-port",
            argv,
            launch.with_redis({"VDM_WORKER_ID": f"worker-{i}"}),
            needs=("redis", "upstream"),
        )
        for i in range(1, args.workers + 1)
    ]


def _stream_part(
    args: argparse.Namespace, settings: Settings, launch: _Launch, dashboard_port: int
) -> Part:
    cors = [*settings.cors_origins, *dashboard_origins(launch.host, dashboard_port)]
    stream_env = {"VDM_CORS_ORIGINS": ",".join(dict.fromkeys(cors))}
    if cancel_by_default(launch.host, settings, launch.env):
        # A local demo is for trying things: the dashboard's cancel action is on unless the
        # caller says otherwise (a deployment leaves it off by default; docs/security.md).
        stream_env["VDM_CANCEL_ENABLED"] = "true"
    return Part(
        "stream",
        "stream service",
        "stream",
        args.stream_port,
        "--stream-port",
        launch.service("stream"),
        launch.with_redis(stream_env),
        needs=("redis",),
    )


def _dashboard_part(launch: _Launch, port: int, worker_names: Sequence[str]) -> Part:
    # The browser reaches the stream service directly (its CORS origins: _stream_part); the
    # dashboard's port is known up front, because the stream service needs that origin. The
    # page finds the stream on the host it was loaded from, at the stream's port, so a
    # browser on another machine finds it too (unless VDM_STREAM_PUBLIC_URL says otherwise).
    def argv(urls: Urls) -> list[str]:
        stream_port = str(urlsplit(urls["stream"]).port)
        return [*VDM_HUB, "dashboard", "--stream-port", stream_port, "--host", launch.host]

    return Part(
        "dashboard",
        "dashboard",
        "dashboard",
        port,
        "--dashboard-port",
        argv,
        launch.with_redis(),
        needs=("redis", "stream", *worker_names),
        auto_port=False,
    )


def _load_part(args: argparse.Namespace, launch: _Launch, worker_names: Sequence[str]) -> Part:
    def argv(urls: Urls) -> list[str]:
        return [
            *VDM_HUB,
            "load",
            *(a for name in worker_names for a in ("--target", urls[name])),
            "--rate",
            f"{args.demo_rate:g}",
            "--concurrency",
            "32",
            "--duration",
            "0",  # until `up` stops it
            "--stream-share",
            "0.4",
            "--hold",
            DEMO_HOLD_S,
            "--shape",
            "mixed",
        ]

    return Part(
        "load",
        "demo traffic",
        "load",
        0,
        "",
        argv,
        launch.with_redis(),
        needs=("redis", "dashboard", *worker_names),
        # Its once-a-second progress line would push the URLs off the screen; its output is
        # still kept for the report if it dies.
        echo=False,
    )


# -- ports -------------------------------------------------------------------------------


def port_busy(host: str, port: int) -> bool:
    """Would a service's bind fail? Binds like ``shared.serve.bind_socket`` (SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def busy_ports_message(host: str, parts: Sequence[Part]) -> str | None:
    owners: dict[int, Part] = {}
    listening = [p for p in parts if p.option]
    for part in listening:
        other = owners.setdefault(part.port, part)
        if other is not part:
            return (
                f"port {part.port} is wanted by both the {other.label} and the {part.label}; "
                f"move one with {part.option} or {other.option} PORT"
            )
    busy = [p for p in listening if port_busy(p.host or host, p.port)]
    if not busy:
        return None
    lines = [
        f"port {p.port} on {p.host or host} is in use (wanted by the {p.label}); "
        f"choose another with {p.option} PORT"
        for p in busy
    ]
    for p in busy:
        if p.name == "redis":
            url = f"redis://{reachable_host(p.host or host)}:{p.port}/0"
            lines.append(f"if that is a Redis you want to use, set REDIS_URL={url}")
    lines.append("or run with --ports auto to give every part a free port")
    return "\n".join(lines)


# -- URLs --------------------------------------------------------------------------------


def reachable_host(host: str) -> str:
    """Where a client on this machine connects to a server bound on ``host``."""
    if host in WILDCARD_HOSTS:
        return "[::1]" if host == "::" else "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def reachable(url: str) -> str:
    """``url`` with a wildcard bind address replaced by loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host not in WILDCARD_HOSTS:
        return url
    netloc = f"{reachable_host(host)}:{parts.port}" if parts.port else reachable_host(host)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def dashboard_origins(host: str, port: int) -> list[str]:
    """Origins a browser may use for the dashboard (for the stream's CORS).

    On loopback, this machine's names for it. Beyond loopback, also any host name on the
    dashboard's port (``http://*:PORT``): a browser on another machine calls this one by a
    name only it knows. Cancel never trusts that entry (services/stream/cancel.py).
    """
    origins = [f"http://{reachable_host(host)}:{port}"]
    if host in WILDCARD_HOSTS or host in ("127.0.0.1", "localhost", "::1"):
        for name in ("localhost", "127.0.0.1"):
            origin = f"http://{name}:{port}"
            if origin not in origins:
                origins.append(origin)
    if beyond_loopback(host):
        origins.append(f"http://*:{port}")
    return origins


def cancel_by_default(host: str, settings: Settings, env: Mapping[str, str]) -> bool:
    """Does ``up`` turn the cancel action on for its demo? Not when the caller decided
    (VDM_CANCEL_ENABLED set), and not when it is reachable from other machines without a
    token: then anyone on the network could cancel (docs/security.md)."""
    if "VDM_CANCEL_ENABLED" in env:
        return False
    return not beyond_loopback(host) or settings.auth_token is not None


def masked(url: str) -> str:
    """A Redis URL fit to print: the password (if any) hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


# -- run ---------------------------------------------------------------------------------


def _install_stop_handlers(supervisor: Supervisor) -> None:
    def on_signal(sig: int, frame: FrameType | None) -> None:
        supervisor.request_stop()

    # SIGHUP too: closing the terminal must not leave the hub running without its parent.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def _say(text: str) -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(f"vdm-hub up: {text}", file=sys.stderr, flush=True)


def _port_hint(child: Child, parts: Sequence[Part]) -> str:
    """If the child failed to bind, the option that moves it."""
    if not any(
        "cannot listen on" in line or "Address already in use" in line for line in child.tail()
    ):
        return ""
    part = next((p for p in parts if p.name == child.name and p.option), None)
    if part is None:
        return ""
    return f"\nits port is taken: choose another with {part.option} PORT, or use --ports auto"


def _access_lines(urls: Urls, host: str, cancel_on: bool) -> list[str]:
    """Who can reach the parts, and whether cancel is on."""
    lines = []
    if beyond_loopback(host):
        name = socket.gethostname() if host in WILDCARD_HOSTS else reachable_host(host)
        port = urlsplit(urls["dashboard"]).port
        lines += [
            f"  from other machines: http://{name}:{port}/dashboard/metrics "
            "(or any name of this machine)",
            f"  listening on {host}, except redis: it stays on 127.0.0.1",
        ]
    if cancel_on:
        lines.append("  cancel: on for this demo (VDM_CANCEL_ENABLED=false turns it off)")
    elif beyond_loopback(host) and "VDM_CANCEL_ENABLED" not in os.environ:
        lines.append(
            "  cancel: off, as the hub is open to the network without VDM_AUTH_TOKEN "
            "(VDM_CANCEL_ENABLED=true turns it on anyway)"
        )
    return lines


def _banner(parts: Sequence[Part], urls: Urls, args: argparse.Namespace, cancel_on: bool) -> str:
    workers = [(p.label, urls[p.name]) for p in parts if p.role == "worker"]
    first = workers[0][1]
    lines = [
        "vdm-hub is up (Ctrl-C stops everything):",
        f"  dashboard: {urls['dashboard']}/dashboard/metrics",
        f"  stream: {urls['stream']}/metrics/active-requests/stream",
        f"  prometheus: {urls['stream']}/metrics",
        *(f"  {label}: {url}" for label, url in workers),
        f"  redis: {masked(urls['redis'])}",
        f"  upstream: {urls['upstream']} (demo LLM API)",
        f"  point an LLM client at a worker: OPENAI_BASE_URL={first}/v1 ANTHROPIC_BASE_URL={first}",
    ]
    lines += _access_lines(urls, args.host, cancel_on)
    if args.demo_traffic:
        lines.append(f"  demo traffic: {args.demo_rate:g} requests/s over the workers")
    else:
        lines.append("  demo traffic is off (--no-demo-traffic)")
    return "\n".join(lines)


def start_parts(
    supervisor: Supervisor, parts: Sequence[Part], urls: dict[str, str], auto: bool, timeout: float
) -> None:
    """Start every part, each once the parts it needs are ready; fill ``urls`` as they are."""
    started: dict[str, Child] = {}

    def ready(name: str) -> None:
        child = started.get(name)
        if name not in urls and child is not None:
            urls[name] = reachable(child.wait_ready(timeout, supervisor.stop_event))

    for part in parts:
        for name in part.needs:
            ready(name)
        argv = [*part.argv(urls), "--port", part.port_arg(auto)] if part.option else part.argv(urls)
        started[part.name] = supervisor.start(
            part.name, argv, part.env(urls), wait_ready=False, echo=part.echo
        )
    for part in parts:
        if part.option:  # a part without a port logs no ready line (the demo traffic)
            ready(part.name)


def stop_stages(supervisor: Supervisor, parts: Sequence[Part]) -> list[list[Child]]:
    """Children grouped by role, the roles in reverse start order."""
    by_name = {c.name: c for c in supervisor.children}
    roles = list(dict.fromkeys(p.role for p in parts))
    return [
        [by_name[p.name] for p in parts if p.role == role and p.name in by_name]
        for role in reversed(roles)
    ]


def run(args: argparse.Namespace, settings: Settings) -> int:
    auto = args.ports == "auto"
    host = args.host
    dashboard_port = (
        free_port(host if host not in WILDCARD_HOSTS else "127.0.0.1")
        if auto
        else args.dashboard_port
    )
    parts = plan(args, settings, dict(os.environ), dashboard_port)
    if not auto:
        message = busy_ports_message(host, parts)
        if message is not None:
            _err(message)
            return 1
    supervisor = Supervisor(
        echo=None if args.quiet else sys.stderr, mute=MUTED, ready_timeout=args.ready_timeout
    )
    _install_stop_handlers(supervisor)
    urls: dict[str, str] = {}
    if settings.redis_url is not None:
        urls["redis"] = settings.redis_url
    code = 0
    try:
        start_parts(supervisor, parts, urls, auto, args.ready_timeout)
        cancel_on = cancel_by_default(host, settings, os.environ)
        _say(_banner(parts, urls, args, cancel_on))
        supervisor.watch()
    except Stopped:
        pass
    except ChildFailed as failure:
        _err(failure.report() + _port_hint(failure.child, parts))
        _err("stopping everything")
        code = 1
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            supervisor.stop(stop_stages(supervisor, parts))
    if code == 0:
        _say("vdm-hub up: stopped")
    return code
