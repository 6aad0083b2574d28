"""vdm-hub: a Redis-backed live metrics hub for fleets of HTTP/LLM proxy workers.

Installed, the project is this one import package. Its parts live under it
(``vdm_hub.shared``, ``vdm_hub.services``, ``vdm_hub.dashboard``); in the repository they are
the top-level folders ``shared/``, ``services/`` and ``dashboard/``, which ``vdm_hub/`` links
to, so the same tree serves the wheel, editable installs and mypy.

What this module exports (``__all__``) is the public API; everything else may change:

- ``instrument(app, **options) -> app`` publishes every HTTP request of an ASGI app to the hub
  and owns the publisher's lifetime;
- ``current_request() -> RequestHandle | None`` is the request being served, for the app to
  add labels, token usage or the model;
- ``ConfigError``: a setting (variable or option) that cannot be used; the message names it;
- ``litellm_callback``: a LiteLLM callback that adds LiteLLM's facts (caller, deployment,
  usage) to an instrumented LiteLLM proxy's rows; its config line is
  ``callbacks: ["vdm_hub.litellm_callback"]``.

``import vdm_hub`` stays cheap: the names load on first use (PEP 562), so an app that imports
us pays for Starlette and redis-py only when it instruments, and never for the dashboard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vdm_hub.shared import __version__

if TYPE_CHECKING:
    from vdm_hub.services.integrations.litellm import litellm_callback
    from vdm_hub.services.proxy.context import RequestHandle, current_request
    from vdm_hub.services.proxy.embed import instrument
    from vdm_hub.shared.settings import ConfigError

__all__ = [
    "ConfigError",
    "RequestHandle",
    "__version__",
    "current_request",
    "instrument",
    "litellm_callback",
]

_LAZY = {
    "instrument": "vdm_hub.services.proxy.embed",
    "current_request": "vdm_hub.services.proxy.context",
    "RequestHandle": "vdm_hub.services.proxy.context",
    "ConfigError": "vdm_hub.shared.settings",
    "litellm_callback": "vdm_hub.services.integrations.litellm",  # imports LiteLLM
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vdm_hub' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
