"""The LiteLLM proxy (``litellm[proxy]``) with ``--num_workers 2`` under ``vdm-hub instrument``,
and vdm-hub's LiteLLM callback enabled by its one config line.

LiteLLM starts uvicorn with ``workers=2`` (spawned processes), in front of the demo upstream,
with a stream service on the same Redis. Its config names a deployment (``model_info.id``) and
a ``custom_auth`` that gives every caller a key alias, a team and a user, as LiteLLM's virtual
keys do (those need a database). The tests check what the ASGI layer owns (every held stream in
every sample, two worker ids, the model as sent, TTFT, cancel) and what the callback adds to
those rows (the labels and, for a complete response, the token usage) — and that a client
that leaves before the first token leaves no row behind, whatever LiteLLM's callbacks do after.

LiteLLM is installed once into its own virtualenv (``$VDM_BENCH_CACHE/litellm-VERSION``); the
first install downloads ~750 MB (2-6 minutes measured here). It must not phone home: the
environment below turns off every fetch its start-up makes (model cost map, Anthropic beta
headers, blog posts, autorouter presets) and points their URLs at a closed local port.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bench.peer import PeerVenv, vdm_hub_requirements
from tests.procs import Proc, vdm_hub
from tests.system.integration_harness import (
    CANCEL_BOUND,
    Instrumented,
    View,
    all_rows_in_every_sample,
    cancel_cuts_the_client,
    completed,
    every_worker_answers,
    holding,
    installed,
    peer_env,
    stream_service,
    until,
)
from vdm_hub.shared.embedded_redis import free_port
from vdm_hub.shared.keys import Keys

# The first test installs LiteLLM; the rest reuse its two-worker proxy.
pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

VERSION = "1.108.0"  # the newest 1.108 whose [proxy] extra's pinned packages are all on PyPI
LITELLM = PeerVenv("litellm", VERSION, [f"litellm[proxy]=={VERSION}", *vdm_hub_requirements()])
MASTER_KEY = "sk-test-master-not-secret"
AUTH = {"authorization": f"Bearer {MASTER_KEY}"}
CALLER = {"key_alias": "ci-key", "team": "ci-team", "user": "ci-user"}
DEPLOYMENT = {"deployment": "demo-east", "deployment_model": "openai/gpt-4o-mini"}
FIRST_TOKEN_MS = 1500
LATE_FIRST_BYTE_MS = 4000  # `very-slow-gpt`: the upstream's answer starts this late
HELD = 6
# Every start-up fetch LiteLLM would make, off (or at a closed port, should one remain).
OFFLINE = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_MODEL_COST_MAP_URL": "http://127.0.0.1:9/",
    "LITELLM_ANTHROPIC_BETA_HEADERS_URL": "http://127.0.0.1:9/",
    "LITELLM_BLOG_POSTS_URL": "http://127.0.0.1:9/",
    "LITELLM_AUTOROUTER_PRESETS_URL": "http://127.0.0.1:9/",
    "DISABLE_ADMIN_UI": "True",
}

CONFIG = """\
model_list:
  - model_name: slow-gpt
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {upstream}/v1
      api_key: sk-test-upstream-not-secret
      extra_headers:
        x-demo-delay-ms: "{first_token_ms}"
        x-demo-chunk-delay-ms: "250"
        x-demo-chunks: "120"
    model_info:
      id: demo-east
  - model_name: very-slow-gpt
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {upstream}/v1
      api_key: sk-test-upstream-not-secret
      extra_headers:
        x-demo-delay-ms: "{late_first_byte_ms}"
    model_info:
      id: demo-west
litellm_settings:
  callbacks: ["vdm_hub.litellm_callback"]
general_settings:
  master_key: {master_key}
  custom_auth: custom_auth.user_api_key_auth
"""

# What LiteLLM's virtual keys would know about the caller, without their database.
CUSTOM_AUTH = """\
from fastapi import Request
from litellm.proxy._types import UserAPIKeyAuth


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    return UserAPIKeyAuth(
        api_key=api_key, key_alias="ci-key", team_id="team-1", team_alias="ci-team",
        user_id="ci-user",
    )
"""


class Proxy:
    def __init__(
        self, url: str, stream: str, redis_url: str, key_prefix: str, server: Instrumented
    ) -> None:
        self.url = url
        self.redis_url = redis_url
        self.stream = stream
        self.key_prefix = key_prefix
        self.server = server


@pytest.fixture(scope="module")
def proxy(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    venv = installed(LITELLM)
    key_prefix = f"llm{os.getpid()}"
    home = tmp_path_factory.mktemp("litellm")
    upstream: Proc = vdm_hub("demo-upstream", "--port", "0")
    stream: Proc = stream_service(redis_server.url, key_prefix)
    server: Instrumented | None = None
    try:
        up = upstream.wait_ready(60)
        config = CONFIG.format(
            upstream=up,
            first_token_ms=FIRST_TOKEN_MS,
            late_first_byte_ms=LATE_FIRST_BYTE_MS,
            master_key=MASTER_KEY,
        )
        (home / "config.yaml").write_text(config)
        (home / "custom_auth.py").write_text(CUSTOM_AUTH)
        port = free_port()
        command = [
            str(venv.bin("litellm")), "--config", "config.yaml", "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "2",
            # Each worker imports all of LiteLLM (~15 s of CPU): uvicorn's default 5 s health
            # check kills it mid-import on a busy machine, again and again.
            "--timeout_worker_healthcheck", "120",
        ]  # fmt: skip
        env = peer_env(home, redis_server.url, key_prefix, **OFFLINE)
        server = Instrumented(f"litellm {VERSION} --num_workers 2", command, env, home)
        stream_url = stream.wait_ready(60)
        yield Proxy(f"http://127.0.0.1:{port}", stream_url, redis_server.url, key_prefix, server)
    finally:
        if server is not None:
            server.stop()
        stream.stop()
        upstream.stop()


@pytest.fixture
async def view(proxy: Proxy) -> Any:
    async with httpx.AsyncClient(trust_env=False) as client:
        view = View(proxy.stream, client)
        workers = await view.workers_up(2, proxy.server)
        assert proxy.server.pid not in {w["pid"] for w in workers}  # the parent never serves
        async with aioredis.Redis.from_url(proxy.redis_url) as redis:
            # A token count: LiteLLM loads its tokenizer (tiktoken's o200k_base, ~2 s of CPU
            # in the event loop, once per process) the first time it counts tokens, which a
            # cut stream makes it do; done here, the cancel's bound below times the hub's
            # cancel, not that one-time load (docs/integrations.md).
            await every_worker_answers(
                client,
                proxy.url + "/utils/token_counter",
                redis,
                proxy.key_prefix,
                {w["worker_id"] for w in workers},
                proxy.server,
                AUTH,
                body={"model": "slow-gpt", "messages": [{"role": "user", "content": "hi"}]},
            )
        yield view


def chat(stream: bool, user: str | None = None, model: str = "slow-gpt") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if user is not None:
        body["user"] = user
    return body


async def test_held_streams_carry_litellms_facts_and_cancel_cuts_the_client(
    proxy: Proxy, view: View, redis: aioredis.Redis
) -> None:
    bodies = ((f"ll-{i}", chat(stream=True)) for i in itertools.count())
    async with holding(proxy.url + "/v1/chat/completions", AUTH) as holds:
        rows = await holds.on_every_worker(
            view, bodies, at_least=HELD, workers=2, server=proxy.server
        )
        held = holds.streams
        owners = await all_rows_in_every_sample(view, held, samples=30)
        assert len(owners) == 2, owners
        for row in rows.values():
            assert row["model"] == "slow-gpt"  # as the client sent it, not the deployment's
            assert row["is_streaming"] is True
            assert row.get("labels") == {**CALLER, **DEPLOYMENT}
        # TTFT is the first token, which the upstream holds back for FIRST_TOKEN_MS.
        for row in (await holds.first_tokens(view, proxy.server)).values():
            assert row["ttft_ms"] >= FIRST_TOKEN_MS, row
        victim = held[0]
        cut = await cancel_cuts_the_client(view, victim, rows[victim.request_id]["worker_id"])
        assert cut <= CANCEL_BOUND, f"the cancelled client's stream ran on for {cut:.2f}s"
        assert "[DONE]" not in victim.events  # cut off, not finished
        entry = await completed(redis, proxy.key_prefix, victim.request_id)
        assert entry["outcome"] == "cancelled"
        assert not any(h.done() for h in held[1:])
    await until(lambda: _gone(view, {h.request_id for h in held}), 20, "the held rows to end")


async def test_a_complete_answer_has_litellms_usage_and_labels_in_its_entry(
    proxy: Proxy, view: View, redis: aioredis.Redis
) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
        answer = await client.post(
            proxy.url + "/v1/chat/completions",
            json=chat(stream=False, user="end-user-7"),
            headers={**AUTH, "x-request-id": "ll-complete"},
        )
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    entry = await completed(redis, proxy.key_prefix, "ll-complete")
    assert entry["outcome"] == "ok" and entry["model"] == "slow-gpt"
    assert (entry["input_tokens"], entry["output_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert entry.get("labels") == {**CALLER, **DEPLOYMENT, "end_user": "end-user-7"}


async def test_a_client_gone_before_the_first_token_leaves_no_row(
    proxy: Proxy, view: View, redis: aioredis.Redis
) -> None:
    labels = {**CALLER, "deployment": "demo-west", "deployment_model": "openai/gpt-4o-mini"}
    async with holding(proxy.url + "/v1/chat/completions", AUTH) as holds:
        early = holds.start("ll-early", chat(stream=True, model="very-slow-gpt"))

        async def decorated() -> dict[str, Any] | None:
            row = (await view.rows()).get("ll-early")
            return row if row is not None and row.get("labels") == labels else None

        # The callback has run (labels on the row) and LiteLLM waits for its upstream.
        row = await until(decorated, 60, "the early row, decorated", proxy.server)
        assert row["phase"] == "upstream" and row["ttft_ms"] is None
        assert early.task is not None
        early.task.cancel()  # the client goes away: its connection closes
    # LiteLLM listens for a disconnect only once it streams: it notices when the upstream's
    # answer starts (LATE_FIRST_BYTE_MS), and the row ends then, as the client's.
    entry = await completed(
        redis, proxy.key_prefix, "ll-early", timeout=LATE_FIRST_BYTE_MS / 1000 + 20
    )
    assert entry["outcome"] == "client_closed"
    assert entry["labels"] == labels
    # LiteLLM's own handling runs on after that (its failure callbacks fire on its logging
    # worker): for two seconds of it, nothing brings the row back.
    active = Keys(proxy.key_prefix).active(row["worker_id"])
    for _ in range(20):
        assert "ll-early" not in await view.rows()
        assert not await redis.hexists(active, "ll-early")
        await asyncio.sleep(0.1)


async def _row(view: View, request_id: str) -> dict[str, Any] | None:
    return (await view.rows()).get(request_id)


async def _gone(view: View, request_ids: set[str]) -> bool:
    return not request_ids & (await view.rows()).keys()
