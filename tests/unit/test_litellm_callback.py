"""vdm-hub's LiteLLM callback without LiteLLM: the facts it reads from LiteLLM's objects, and
that it only ever decorates the current request's row (the real proxy:
tests/system/test_integration_litellm.py)."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(10)


class CustomLogger:  # the stand-in for LiteLLM's base class: hooks that do nothing
    pass


@pytest.fixture
def litellm_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    stub = types.ModuleType("litellm.integrations.custom_logger")
    stub.CustomLogger = CustomLogger  # type: ignore[attr-defined]
    for name in ("litellm", "litellm.integrations"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "litellm.integrations.custom_logger", stub)
    monkeypatch.delitem(sys.modules, "vdm_hub.services.integrations.litellm", raising=False)
    yield importlib.import_module("vdm_hub.services.integrations.litellm")
    sys.modules.pop("vdm_hub.services.integrations.litellm", None)


class Key:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def test_caller_labels_name_the_key_team_and_user_never_the_key(
    litellm_module: types.ModuleType,
) -> None:
    key = Key(api_key="sk-secret", token="hash", key_alias="ci", team_id="t1", user_id="u")
    labels = litellm_module.caller_labels(key)
    assert labels == {"key_alias": "ci", "team": "t1", "user": "u", "end_user": None}
    assert "sk-secret" not in labels.values() and "hash" not in labels.values()
    assert litellm_module.caller_labels(Key(team_alias="ops", team_id="t1"))["team"] == "ops"


def test_deployment_labels_from_the_routers_metadata(litellm_module: types.ModuleType) -> None:
    chosen = {"deployment": "openai/gpt-4o-mini", "model_info": {"id": "east"}}
    assert litellm_module.deployment_labels({"metadata": chosen}) == {
        "deployment": "east",
        "deployment_model": "openai/gpt-4o-mini",
    }
    assert litellm_module.deployment_labels({"litellm_metadata": chosen})["deployment"] == "east"
    assert litellm_module.deployment_labels({"metadata": {"user_api_key": "x"}}) == {}


def test_usage_of_openai_and_anthropic_shapes(litellm_module: types.ModuleType) -> None:
    usage_of = litellm_module.usage_of
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 9}}) == (3, 9)
    assert usage_of(Key(usage=Key(input_tokens=4, output_tokens=2))) == (4, 2)
    assert usage_of({"usage": {"prompt_tokens": True}}) == (None, None)
    assert usage_of(Key()) == (None, None)


async def test_outside_a_reported_request_the_hooks_do_nothing(
    litellm_module: types.ModuleType,
) -> None:
    callback = litellm_module.litellm_callback
    key = Key(key_alias="ci")
    assert await callback.async_pre_call_hook(key, None, {}, "completion") is None
    assert await callback.async_pre_call_deployment_hook({"metadata": {}}, None) is None
    assert await callback.async_post_call_success_hook({}, key, {"usage": {}}) is None


class Reported:
    """What the instrumentation tracks for one request, as current_request() sees it."""

    request_id = "r1"
    worker_id = "w1"
    ended = False

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}
        self.usage: tuple[int | None, int | None] | None = None

    def put_labels(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def put_usage(self, input_tokens: int | None, output_tokens: int | None) -> None:
        self.usage = (input_tokens, output_tokens)

    def put_model(self, model: str) -> None:
        raise AssertionError("the callback never changes the model the client sent")


async def test_inside_a_request_the_hooks_decorate_its_row(
    litellm_module: types.ModuleType,
) -> None:
    from vdm_hub.services.proxy import context

    callback = litellm_module.litellm_callback
    request = Reported()
    token = context.enter(request)
    try:
        await callback.async_pre_call_hook(Key(key_alias="ci", user_id="u"), None, {}, "x")
        chosen = {"deployment": "openai/m", "model_info": {"id": "east"}}
        await callback.async_pre_call_deployment_hook({"metadata": chosen}, None)
        answer = {"usage": {"prompt_tokens": 3, "completion_tokens": 9}}
        await callback.async_post_call_success_hook({}, Key(), answer)
    finally:
        context.leave(token)
    assert request.labels == {
        "key_alias": "ci",
        "user": "u",
        "deployment": "east",
        "deployment_model": "openai/m",
    }
    assert request.usage == (3, 9)
