"""``vdm-hub up``: the whole hub on one machine, each part a separate process.

Start order follows the dependencies, each step waiting (bounded) for the children's
``<name> ready on <url>`` lines: Redis (embedded, unless ``REDIS_URL`` is set) and the demo
upstream; the workers and the stream service; the dashboard (it needs the stream's URL); the
demo traffic. Stop order is the reverse of use: traffic, dashboard, stream, workers (they
deregister while Redis is still there), upstream, Redis.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

from services.supervisor import Child, ChildFailed, Stopped, Supervisor
from shared.embedded_redis import free_port
from shared.settings import Settings

VDM_HUB = [sys.executable, "-m", "services.cli"]
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
# Demo traffic: requests held open 1-5 s (x-demo-delay-ms) so rows stay long enough to watch.
DEMO_HOLD_S = "1-5"
# One line per proxied request (httpx logs at INFO) would bury everything else on the console.
MUTED = re.compile(r" INFO httpx: HTTP Request: ")


@dataclass(frozen=True)
class PortSpec:
    what: str  # the part, as named in messages
    port: int
    option: str  # the option that changes it


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address [127.0.0.1]")
    parser.add_argument("--workers", type=int, default=2, help="worker proxies to run [2]")
    parser.add_argument(
        "--no-demo-traffic",
        dest="demo_traffic",
        action="store_false",
        help="do not run the demo traffic generator",
    )
    parser.add_argument("--dashboard-port", type=int, default=8050, help="[8050]")
    parser.add_argument("--stream-port", type=int, default=8090, help="[8090]")
    parser.add_argument(
        "--worker-base-port", type=int, default=8080, help="worker N gets base+N-1 [8080]"
    )
    parser.add_argument("--upstream-port", type=int, default=8001, help="demo upstream [8001]")
    parser.add_argument(
        "--redis-port", type=int, default=6379, help="embedded Redis, when REDIS_URL is unset"
    )
    parser.add_argument(
        "--ports",
        choices=("fixed", "auto"),
        default="fixed",
        help="fixed: the ports above; auto: a free port for every part [fixed]",
    )
    parser.add_argument("--demo-rate", type=float, default=3.0, help="demo requests per second [3]")
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="seconds each part may take to become ready [30]",
    )
    parser.add_argument("--quiet", action="store_true", help="do not echo the parts' log lines")


# -- ports -------------------------------------------------------------------------------


def port_specs(args: argparse.Namespace, embedded_redis: bool) -> list[PortSpec]:
    specs = [
        PortSpec("dashboard", args.dashboard_port, "--dashboard-port"),
        PortSpec("stream service", args.stream_port, "--stream-port"),
        PortSpec("demo upstream", args.upstream_port, "--upstream-port"),
    ]
    specs += [
        PortSpec(f"worker {i}", args.worker_base_port + i - 1, "--worker-base-port")
        for i in range(1, args.workers + 1)
    ]
    if embedded_redis:
        specs.append(PortSpec("redis", args.redis_port, "--redis-port"))
    return specs


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


def busy_ports_message(host: str, specs: Sequence[PortSpec]) -> str | None:
    owners: dict[int, PortSpec] = {}
    for spec in specs:
        other = owners.setdefault(spec.port, spec)
        if other is not spec:
            return (
                f"port {spec.port} is wanted by both the {other.what} and the {spec.what}; "
                f"move one with {spec.option} or {other.option} PORT"
            )
    busy = [s for s in specs if port_busy(host, s.port)]
    if not busy:
        return None
    lines = [
        f"port {s.port} on {host} is in use (wanted by the {s.what}); "
        f"choose another with {s.option} PORT"
        for s in busy
    ]
    for s in busy:
        if s.what == "redis":
            url = f"redis://{reachable_host(host)}:{s.port}/0"
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
    """Origins a browser on this machine may use for the dashboard (for the stream's CORS)."""
    origins = [f"http://{reachable_host(host)}:{port}"]
    if host in WILDCARD_HOSTS or host in ("127.0.0.1", "localhost", "::1"):
        for name in ("localhost", "127.0.0.1"):
            origin = f"http://{name}:{port}"
            if origin not in origins:
                origins.append(origin)
    return origins


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


def _port_hint(child: Child, specs: Mapping[str, PortSpec]) -> str:
    """If the child failed to bind, the option that moves it."""
    if not any(
        "cannot listen on" in line or "Address already in use" in line for line in child.tail()
    ):
        return ""
    spec = specs.get(child.name)
    if spec is None:
        return ""
    return f"\nits port is taken: choose another with {spec.option} PORT, or use --ports auto"


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.workers < 1:
        _err("--workers must be at least 1")
        return 2
    auto = args.ports == "auto"
    embedded_redis = settings.redis_url is None
    specs = port_specs(args, embedded_redis)
    if not auto:
        message = busy_ports_message(args.host, specs)
        if message is not None:
            _err(message)
            return 1
    by_child = {
        "dashboard": specs[0],
        "stream": specs[1],
        "upstream": specs[2],
        **{f"worker-{i}": specs[2 + i] for i in range(1, args.workers + 1)},
    }
    if embedded_redis:
        by_child["redis"] = specs[-1]

    def port(spec: PortSpec) -> str:
        return "0" if auto else str(spec.port)

    host = args.host
    dashboard_port = (
        free_port(host if host not in WILDCARD_HOSTS else "127.0.0.1")
        if auto
        else (args.dashboard_port)
    )
    base_env = dict(os.environ)
    supervisor = Supervisor(
        echo=None if args.quiet else sys.stderr, mute=MUTED, ready_timeout=args.ready_timeout
    )
    _install_stop_handlers(supervisor)
    roles: dict[str, list[Child]] = {"load": [], "dashboard": [], "stream": [], "worker": []}
    roles.update(upstream=[], redis=[])
    code = 0
    try:
        # 1. Redis and the demo upstream: they depend on nothing.
        redis_child = None
        if embedded_redis:
            redis_child = supervisor.start(
                "redis",
                [*VDM_HUB, "redis", "--host", host, "--port", port(by_child["redis"])],
                base_env,
                wait_ready=False,
            )
            roles["redis"].append(redis_child)
        upstream = supervisor.start(
            "upstream",
            [*VDM_HUB, "demo-upstream", "--host", host, "--port", port(by_child["upstream"])],
            base_env,
            wait_ready=False,
        )
        roles["upstream"].append(upstream)
        if redis_child is not None:
            redis_url = reachable(redis_child.wait_ready(args.ready_timeout, supervisor.stop_event))
        else:
            assert settings.redis_url is not None
            redis_url = settings.redis_url
        upstream_url = reachable(upstream.wait_ready(args.ready_timeout, supervisor.stop_event))
        env = {**base_env, "REDIS_URL": redis_url}
        # A local demo is for trying things: the dashboard's cancel action is on unless the
        # caller says otherwise (a deployment leaves it off by default; docs/security.md).
        cancel_by_default = "VDM_CANCEL_ENABLED" not in env
        env.setdefault("VDM_CANCEL_ENABLED", "true")

        # 2. Workers and the stream service: they need Redis (and the upstream).
        workers = []
        for i in range(1, args.workers + 1):
            name = f"worker-{i}"
            worker = supervisor.start(
                name,
                [
                    *VDM_HUB,
                    "worker",
                    "--upstream",
                    upstream_url,
                    "--host",
                    host,
                    "--port",
                    port(by_child[name]),
                ],
                {**env, "VDM_WORKER_ID": name},
                wait_ready=False,
            )
            workers.append(worker)
        roles["worker"] = workers
        cors = [*settings.cors_origins, *dashboard_origins(host, dashboard_port)]
        stream = supervisor.start(
            "stream",
            [*VDM_HUB, "stream", "--host", host, "--port", port(by_child["stream"])],
            {**env, "VDM_CORS_ORIGINS": ",".join(dict.fromkeys(cors))},
            wait_ready=False,
        )
        roles["stream"].append(stream)
        worker_urls = [
            reachable(w.wait_ready(args.ready_timeout, supervisor.stop_event)) for w in workers
        ]
        stream_url = reachable(stream.wait_ready(args.ready_timeout, supervisor.stop_event))

        # 3. The dashboard: the browser reaches the stream service directly (CORS above).
        dashboard = supervisor.start(
            "dashboard",
            [*VDM_HUB, "dashboard", "--host", host, "--port", str(dashboard_port)],
            {**env, "VDM_STREAM_PUBLIC_URL": stream_url},
        )
        roles["dashboard"].append(dashboard)
        dashboard_url = reachable(dashboard.url or "")

        # 4. Demo traffic, so a newcomer sees rows at once.
        if args.demo_traffic:
            targets = [a for url in worker_urls for a in ("--target", url)]
            load = supervisor.start(
                "load",
                [
                    *VDM_HUB,
                    "load",
                    *targets,
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
                ],
                env,
                wait_ready=False,
                # Its once-a-second progress line would push the URLs off the screen; its
                # output is still kept for the report if it dies.
                echo=False,
            )
            roles["load"].append(load)

        lines = [
            "vdm-hub is up (Ctrl-C stops everything):",
            f"  dashboard: {dashboard_url}/dashboard/metrics",
            f"  stream: {stream_url}/metrics/active-requests/stream",
            f"  prometheus: {stream_url}/metrics",
            *(f"  worker {i}: {url}" for i, url in enumerate(worker_urls, 1)),
            f"  redis: {masked(redis_url)}",
            f"  upstream: {upstream_url} (demo LLM API)",
            "  point an LLM client at a worker: "
            f"OPENAI_BASE_URL={worker_urls[0]}/v1 ANTHROPIC_BASE_URL={worker_urls[0]}",
        ]
        if cancel_by_default:
            lines.append("  cancel: on for this demo (VDM_CANCEL_ENABLED=false turns it off)")
        if args.demo_traffic:
            lines.append(f"  demo traffic: {args.demo_rate:g} requests/s over the workers")
        else:
            lines.append("  demo traffic is off (--no-demo-traffic)")
        _say("\n".join(lines))
        supervisor.watch()
    except Stopped:
        pass
    except ChildFailed as failure:
        _err(failure.report() + _port_hint(failure.child, by_child))
        _err("stopping everything")
        code = 1
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            supervisor.stop(
                [roles[r] for r in ("load", "dashboard", "stream", "worker", "upstream", "redis")]
            )
    if code == 0:
        _say("vdm-hub up: stopped")
    return code
