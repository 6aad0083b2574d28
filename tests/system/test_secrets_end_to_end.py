"""Secrets sent through a worker never reach Redis, pub/sub, the stream, the dashboard or logs.

Real processes (demo-upstream, a worker, the stream service with ``VDM_AUTH_TOKEN``, and the
dashboard when it starts), all at ``--log-level DEBUG``. Requests carry secrets in the
Authorization header, an ``x-api-key`` header, a cookie, the query string and the JSON body,
and are held open upstream (``x-demo-delay-ms``) so their rows are in flight while Redis, the
stream and the pages are inspected; then they finish and everything is inspected again (the
completed stream and stats exist only then). A control request to ``/echo`` proves the secrets
really went through the worker, so "not found" means "not copied", not "never sent". A
WebSocket upgrade with the same secrets in its query string and headers is refused by the
worker (it proxies HTTP only), and its handshake is not logged either.

The scenario runs once per module; each test checks one place, so a failure names the leak.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import redis
from httpx_sse import connect_sse
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as websocket_connect

from tests.procs import Proc, vdm_hub, wait_for
from tests.stream_support import FAST
from vdm_hub.shared.children import ChildFailed
from vdm_hub.shared.embedded_redis import EmbeddedRedis
from vdm_hub.shared.keys import Keys

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

STREAM = "/metrics/active-requests/stream"
HOLD_MS = "6000"  # long enough to look at Redis, the stream and the pages meanwhile


def _secret(label: str) -> str:
    return f"{label}{secrets.token_hex(12)}"


SECRETS = {
    "bearer": _secret("sk-live-"),
    "x-api-key": _secret("xkey"),
    "cookie": _secret("cookie"),
    "query": _secret("qkey"),
    "body": _secret("bodykey"),
    "prompt": _secret("prompt"),
}
TOKEN = _secret("hubtoken")  # the hub's own VDM_AUTH_TOKEN must not leak either


@dataclass
class Evidence:
    request_ids: list[str] = field(default_factory=list)
    redis_dumps: list[str] = field(default_factory=list)
    pubsub: list[bytes] = field(default_factory=list)
    sse_events: list[tuple[str, str]] = field(default_factory=list)
    http_bodies: dict[str, str] = field(default_factory=dict)
    dashboard_pages: dict[str, str] = field(default_factory=dict)
    dashboard_note: str = ""
    echo: dict[str, Any] = field(default_factory=dict)
    statuses: list[int] = field(default_factory=list)
    websocket_status: int = 0
    logs: dict[str, str] = field(default_factory=dict)


def leaks(text: str | bytes, secrets_: dict[str, str] | None = None) -> list[str]:
    """Names of the secrets (and the hub token) found in ``text``."""
    haystack = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    found = [name for name, value in (secrets_ or SECRETS).items() if value in haystack]
    return found + (["VDM_AUTH_TOKEN"] if TOKEN in haystack else [])


def dump_redis(client: redis.Redis, prefix: str) -> str:
    """Every key under the prefix with its whole value, whatever its type."""
    out: list[str] = []
    for raw_key in client.scan_iter(match=f"{prefix}:*", count=500):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        raw_kind: bytes | str = client.type(key)
        kind = raw_kind.decode() if isinstance(raw_kind, bytes) else raw_kind
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = client.xrange(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = client.smembers(key)
        else:
            value = f"<{kind}>"
        out.append(f"{key} ({kind}): {value!r}")
    return "\n".join(out)


def _send_with_secrets(worker: str, request_id: str, how: str) -> int:
    headers = {"x-request-id": request_id, "x-demo-delay-ms": HOLD_MS}
    url = f"{worker}/v1/chat/completions"
    body: dict[str, Any] = {"model": "gpt-demo", "messages": [{"role": "user", "content": "hi"}]}
    if how == "bearer":
        headers["authorization"] = f"Bearer {SECRETS['bearer']}"
        headers["cookie"] = f"session={SECRETS['cookie']}"
    elif how == "x-api-key":
        headers["x-api-key"] = SECRETS["x-api-key"]
    elif how == "query":
        url += f"?api_key={SECRETS['query']}&stream=false"
    elif how == "body":
        body["api_key"] = SECRETS["body"]
        body["messages"][0]["content"] = f"my password is {SECRETS['prompt']}"
    r = httpx.post(url, headers=headers, content=orjson.dumps(body), timeout=30)
    return r.status_code


class _PubSubTap:
    """Collects every message on P:events; subscribed (acknowledged) before it returns."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.messages: list[bytes] = []
        self._stop = threading.Event()
        self._pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(channel)
        wait_for(
            lambda: (m := self._pubsub.get_message(timeout=0.5)) and m["type"] == "subscribe",
            10,
            message="the SUBSCRIBE acknowledgement",
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                self.messages.append(bytes(message["data"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()


class _SSETap:
    """Reads the stream service's SSE (with the bearer token) on a thread."""

    def __init__(self, url: str) -> None:
        self.events: list[tuple[str, str]] = []
        self._client = httpx.Client(
            headers={"authorization": f"Bearer {TOKEN}"}, timeout=httpx.Timeout(10, read=30)
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        try:
            with connect_sse(self._client, "GET", url) as source:
                for event in source.iter_sse():
                    self.events.append((event.event, event.data))
                    if self._stop.is_set():
                        return
        except httpx.HTTPError:
            return

    def latest_update(self) -> dict[str, Any] | None:
        updates = [data for kind, data in self.events if kind == "update"]
        return orjson.loads(updates[-1]) if updates else None

    def close(self) -> None:
        # Heartbeats (0.2 s) wake the reader, which sees the flag and leaves the stream itself.
        self._stop.set()
        self._thread.join(5)
        self._client.close()


def _start(procs: list[Proc], command: str, *args: str, env: dict[str, str]) -> str:
    proc = vdm_hub(command, "--log-level", "DEBUG", *args, "--port", "0", env=env)
    procs.append(proc)
    return proc.wait_ready(30)


def _dashboard_pages(url: str, evidence: Evidence) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        first = client.get("/dashboard/metrics", headers={"accept": "text/html"})
        if first.status_code in (302, 303) and "login" in first.headers.get("location", ""):
            r = client.post("/dashboard/login", data={"token": TOKEN, "next": "/dashboard/"})
            assert r.status_code == 303, r.text
        for path in ("/dashboard/", "/dashboard/metrics", "/dashboard/_dash-layout",
                     "/dashboard/_dash-dependencies"):  # fmt: skip
            r = client.get(path, headers={"accept": "text/html"})
            assert r.status_code == 200, (path, r.status_code)
            evidence.dashboard_pages[path] = r.text


@pytest.fixture(scope="module")
def evidence(redis_server: EmbeddedRedis) -> Iterator[Evidence]:
    prefix = f"sec{uuid.uuid4().hex[:10]}"
    keys = Keys(prefix)
    env = {
        "REDIS_URL": redis_server.url,
        "VDM_KEY_PREFIX": prefix,
        "VDM_AUTH_TOKEN": TOKEN,
        "VDM_CORS_ORIGINS": "http://localhost:8050",
        **FAST,
    }
    found = Evidence()
    procs: list[Proc] = []
    client = redis.Redis.from_url(redis_server.url)
    tap = _PubSubTap(client, keys.events)  # before any worker exists: sees every batch
    sse: _SSETap | None = None
    try:
        upstream = _start(procs, "demo-upstream", env=env)
        worker = _start(procs, "worker", "--upstream", upstream, env=env)
        stream = _start(procs, "stream", env=env)
        try:
            dashboard = _start(procs, "dashboard", env={**env, "VDM_STREAM_PUBLIC_URL": stream})
        except ChildFailed as exc:
            dashboard = ""
            found.dashboard_note = f"dashboard did not start: {str(exc)[:500]}"
        sse = _SSETap(stream + STREAM)

        hows = ["bearer", "x-api-key", "query", "body"]
        found.request_ids = [f"sec-{how}-{uuid.uuid4().hex[:8]}" for how in hows]
        with ThreadPoolExecutor(len(hows)) as pool:
            futures: list[Future[int]] = [
                pool.submit(_send_with_secrets, worker, rid, how)
                for rid, how in zip(found.request_ids, hows, strict=True)
            ]
            wanted = set(found.request_ids)

            def all_in_flight() -> bool:
                update = sse.latest_update() if sse else None
                rows = {r["request_id"] for r in (update or {}).get("active_requests", [])}
                return wanted <= rows

            wait_for(all_in_flight, 15, message="all four requests in flight on the stream")
            # While they are held upstream: Redis, the JSON endpoints and the pages.
            found.redis_dumps.append(dump_redis(client, prefix))
            _collect_http(stream, found, "in flight")
            if dashboard:
                _dashboard_pages(dashboard, found)
            found.statuses = [f.result(timeout=30) for f in futures]

        # The control: the same secrets do reach the upstream through the worker.
        echo = httpx.post(
            f"{worker}/echo/v1/chat?api_key={SECRETS['query']}",
            headers={
                "authorization": f"Bearer {SECRETS['bearer']}",
                "x-api-key": SECRETS["x-api-key"],
            },
            content=orjson.dumps({"api_key": SECRETS["body"]}),
            timeout=10,
        )
        found.echo = echo.json()
        found.websocket_status = _websocket_with_secrets(worker)

        def finished() -> bool:
            update = sse.latest_update() if sse else None
            rows = {r["request_id"] for r in (update or {}).get("active_requests", [])}
            stats = any(kind == "stats" for kind, _ in sse.events) if sse else False
            return stats and not (wanted & rows) and client.xlen(keys.completed) >= 5

        wait_for(finished, 15, message="the requests to finish and reach the completed stream")
        found.redis_dumps.append(dump_redis(client, prefix))
        _collect_http(stream, found, "finished")
    finally:
        if sse is not None:
            sse.close()
            found.sse_events = list(sse.events)
        tap.close()
        found.pubsub = list(tap.messages)
        for proc in reversed(procs):
            proc.stop()
            found.logs[proc.name] = proc.output
        for raw_key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(raw_key)
        client.close()
    yield found


def _websocket_with_secrets(worker: str) -> int:
    """Status of a WebSocket upgrade to the worker carrying secrets (it is refused)."""
    url = worker.replace("http://", "ws://") + f"/v1/realtime?api_key={SECRETS['query']}"
    headers = {"authorization": f"Bearer {SECRETS['bearer']}", "x-api-key": SECRETS["x-api-key"]}
    try:
        with websocket_connect(url, additional_headers=headers, open_timeout=10):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def _collect_http(stream: str, found: Evidence, when: str) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=stream, headers=headers, timeout=10) as client:
        for path in ("/metrics", "/metrics/active-requests", "/metrics/summary"):
            r = client.get(path)
            assert r.status_code == 200, (path, r.status_code)
            found.http_bodies[f"{path} ({when})"] = r.text


def test_the_secrets_really_went_through_the_worker(evidence: Evidence) -> None:
    assert evidence.statuses == [200, 200, 200, 200]
    echoed = orjson.dumps(evidence.echo).decode()
    assert set(leaks(echoed)) >= {"bearer", "x-api-key", "query"}, echoed[:2000]


def test_the_worker_refused_the_websocket_upgrade(evidence: Evidence) -> None:
    assert evidence.websocket_status == 403


def test_secrets_never_reach_redis(evidence: Evidence) -> None:
    in_flight, finished = evidence.redis_dumps
    # The rows were there to look at (a dump of nothing would prove nothing).
    assert all(rid in in_flight for rid in evidence.request_ids), in_flight[:2000]
    assert all(rid in finished for rid in evidence.request_ids), "completed stream entries"
    for dump in evidence.redis_dumps:
        assert leaks(dump) == [], dump[:4000]


def test_secrets_never_reach_pubsub(evidence: Evidence) -> None:
    joined = b"\n".join(evidence.pubsub)
    assert all(rid.encode() in joined for rid in evidence.request_ids)
    for message in evidence.pubsub:
        assert leaks(message) == [], message[:2000]


def test_secrets_never_reach_the_stream(evidence: Evidence) -> None:
    kinds = {kind for kind, _ in evidence.sse_events}
    assert {"update", "stats"} <= kinds
    paths = set()
    for kind, data in evidence.sse_events:
        assert leaks(data) == [], (kind, data[:2000])
        if kind == "update":
            paths |= {row["path"] for row in orjson.loads(data)["active_requests"]}
    # The query string was cut off the path (the /echo control may show up too).
    assert "/v1/chat/completions" in paths
    assert paths <= {"/v1/chat/completions", "/echo/v1/chat"}
    assert len(evidence.http_bodies) == 6
    for name, body in evidence.http_bodies.items():
        assert leaks(body) == [], (name, body[:2000])


def test_secrets_never_reach_the_dashboard(evidence: Evidence) -> None:
    if not evidence.dashboard_pages:
        pytest.skip(evidence.dashboard_note or "dashboard pages were not fetched")
    for path, page in evidence.dashboard_pages.items():
        assert leaks(page) == [], (path, page[:2000])


def test_secrets_never_reach_the_logs(evidence: Evidence) -> None:
    assert {"vdm-hub worker", "vdm-hub stream", "vdm-hub demo-upstream"} <= set(evidence.logs)
    for name, output in evidence.logs.items():
        assert "DEBUG" in output or "ready on" in output, (name, output[:500])
        # The upstream is the intended recipient of the client's secrets, but it does not log
        # them either; the hub's token it never sees at all.
        found = leaks(output)
        assert found == [], (name, found, [ln for ln in output.splitlines() if leaks(ln)][:5])
