"""LiteLLM's own facts on the rows of an instrumented LiteLLM proxy: a ``CustomLogger``.

Enabled by one line in the proxy's config, beside ``vdm-hub instrument -- litellm ...``::

    litellm_settings:
      callbacks: ["vdm_hub.litellm_callback"]

The ASGI layer (:func:`vdm_hub.instrument`, which ``vdm-hub instrument`` puts around the
proxy's app) owns every row: it starts when the request arrives and ends when the response is
complete or the client goes away. This callback only decorates the row of the request it runs
for, through :func:`vdm_hub.current_request`; outside a reported request, or after it ended,
that is None or a no-op, so the callback can never start a row or leave one behind (a client
that disconnects before the first token ends its row in the ASGI layer, whatever LiteLLM's
callbacks do afterwards).

Which hooks, and why these: they are the ones LiteLLM awaits inside the request's own task,
where the request's context variables are visible and the row is still open.

- ``async_pre_call_hook`` (after LiteLLM's auth, before routing): who is calling, as labels
  ``key_alias``, ``team`` (the team's alias, else its id), ``user`` and ``end_user``
  (``user`` in the request body). Never the key or its hash.
- ``async_pre_call_deployment_hook`` (once per attempt, after the router chose a
  deployment, before the call): labels ``deployment`` (the deployment's ``model_info.id``)
  and ``deployment_model`` (the provider model it calls, e.g. ``openai/gpt-4o-mini``); after
  a retry or a fallback they name where the request went last.
- ``async_post_call_success_hook`` (a complete, non-streaming response, before it is sent):
  the token usage LiteLLM counted.

Not used: ``async_log_success_event`` / ``async_log_failure_event``, which LiteLLM runs later
on its logging worker, usually after the response (and the row) ended; and the streaming
iterator hook, whose override moves every stream off LiteLLM's fast path. A stream's usage
comes from its own ``usage`` chunk, which the ASGI layer reads (clients that send
``stream_options: {"include_usage": true}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from litellm.integrations.custom_logger import (  # type: ignore[import-not-found, unused-ignore]
    CustomLogger,
)

from vdm_hub import current_request

__all__ = ["LiteLLMCallback", "litellm_callback"]


def caller_labels(user_api_key_dict: object) -> dict[str, str | None]:
    """Labels naming who calls, from LiteLLM's ``UserAPIKeyAuth`` (None: unknown)."""

    def text(name: str) -> str | None:
        value = getattr(user_api_key_dict, name, None)
        return value if isinstance(value, str) and value else None

    return {
        "key_alias": text("key_alias"),
        "team": text("team_alias") or text("team_id"),
        "user": text("user_id"),
        "end_user": text("end_user_id"),
    }


def deployment_labels(kwargs: Mapping[str, Any]) -> dict[str, str | None]:
    """Labels naming the deployment the router chose, from the call's kwargs (the router puts
    it in ``metadata``, or ``litellm_metadata`` for some call types)."""
    for key in ("metadata", "litellm_metadata"):
        metadata = kwargs.get(key)
        if isinstance(metadata, Mapping) and metadata.get("deployment"):
            info = metadata.get("model_info")
            ident = info.get("id") if isinstance(info, Mapping) else None
            return {
                "deployment": str(ident) if ident else None,
                "deployment_model": str(metadata["deployment"]),
            }
    return {}


def usage_of(response: object) -> tuple[int | None, int | None]:
    """(input, output) tokens of a LiteLLM response: an OpenAI-style ``usage`` with
    ``prompt_tokens``/``completion_tokens``, or an Anthropic-style one with
    ``input_tokens``/``output_tokens``; an object or a dict."""
    usage = response.get("usage") if isinstance(response, Mapping) else None
    if usage is None:
        usage = getattr(response, "usage", None)
    if usage is None:
        return None, None

    def count(*names: str) -> int | None:
        for name in names:
            value = usage.get(name) if isinstance(usage, Mapping) else getattr(usage, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    return count("prompt_tokens", "input_tokens"), count("completion_tokens", "output_tokens")


def _label(labels: Mapping[str, str | None]) -> None:
    request = current_request()
    if request is not None and labels:
        request.set_labels({k: v for k, v in labels.items() if v is not None})


class LiteLLMCallback(CustomLogger):  # type: ignore[misc, unused-ignore]
    """See the module docstring. Every hook returns None: it never changes the request."""

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> None:
        _label(caller_labels(user_api_key_dict))

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> None:
        _label(deployment_labels(kwargs))

    async def async_post_call_success_hook(
        self, data: dict[str, Any], user_api_key_dict: Any, response: Any
    ) -> None:
        request = current_request()
        if request is not None:
            input_tokens, output_tokens = usage_of(response)
            request.set_usage(input_tokens=input_tokens, output_tokens=output_tokens)


# What the LiteLLM config names: ``vdm_hub.litellm_callback`` is this object.
litellm_callback = LiteLLMCallback()
