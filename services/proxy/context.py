"""``current_request()``: the request being served, for the app's own code.

The instrumentation puts each request it reports in a context variable for as long as the app
handles it, so code anywhere below (a route, a dependency, a LiteLLM callback running in a task
the request started) can add what only the app knows::

    from vdm_hub import current_request

    request = current_request()          # None outside a reported request
    if request is not None:
        request.set_label("team", team)  # on the row and in the completed entry
        request.set_usage(input_tokens=12, output_tokens=345)

Nothing here raises into the app: a call after the request ended does nothing, and a label
that does not fit the limits is clamped or left out (logged once per process) — the
instrumentation must never break the request it watches.

Labels are short facts (who and what: ``user``, ``team``, ``key_alias``, ``deployment``...):
at most :data:`MAX_LABELS` string pairs, keys of 1-:data:`MAX_LABEL_KEY_CHARS` characters
(longer: left out), values cut to :data:`MAX_LABEL_VALUE_CHARS`, and at most
:data:`MAX_LABELS_JSON_BYTES` of JSON in all (a label that does not fit is left out). Nothing
becomes a label by itself: no header, key or body ever does unless the app puts it there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Protocol

import orjson

from vdm_hub.shared.schema import (
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_LABELS_JSON_BYTES,
    MAX_MODEL_CHARS,
)

log = logging.getLogger("vdm.instrument")


class Reported(Protocol):
    """What the instrumentation tracks per request (its ``_Tracker``)."""

    request_id: str
    ended: bool

    @property
    def worker_id(self) -> str: ...

    @property
    def labels(self) -> dict[str, str]: ...

    def put_labels(self, labels: dict[str, str]) -> None: ...

    def put_usage(self, input_tokens: int | None, output_tokens: int | None) -> None: ...

    def put_model(self, model: str) -> None: ...


_current: ContextVar[Reported | None] = ContextVar("vdm_hub_current_request", default=None)
_warned: set[str] = set()


def enter(request: Reported) -> object:
    """Make ``request`` the current one; returns the token :func:`leave` takes."""
    return _current.set(request)


def leave(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def current_request() -> RequestHandle | None:
    """The request being served in this context, or None outside one (or when it is not
    reported: an excluded path, instrumentation off)."""
    request = _current.get()
    return None if request is None else RequestHandle(request)


class RequestHandle:
    """The app's view of one reported request; see the module doc."""

    __slots__ = ("_request",)

    def __init__(self, request: Reported) -> None:
        self._request = request

    @property
    def request_id(self) -> str:
        """The id on the hub (the client's ``X-Request-Id`` when it sent a usable one)."""
        return self._request.request_id

    @property
    def worker_id(self) -> str:
        """The id this process publishes under."""
        return self._request.worker_id

    @property
    def labels(self) -> dict[str, str]:
        """A copy of the labels set so far."""
        return dict(self._request.labels)

    def set_label(self, key: str, value: object) -> None:
        """Set one label (``value`` None removes it; anything else is turned into a string)."""
        self.set_labels({key: value})

    def set_labels(self, labels: Mapping[str, object]) -> None:
        """Set several labels at once (one update on the hub)."""
        request = self._request
        if request.ended:
            return
        merged = dict(request.labels)
        for key, value in labels.items():
            if not isinstance(key, str) or not 0 < len(key) <= MAX_LABEL_KEY_CHARS:
                _warn_once("key", f"label key {str(key)[:40]!r} left out: keys are 1-32 characters")
                continue
            if value is None:
                merged.pop(key, None)
                continue
            text = value if isinstance(value, str) else str(value)
            text = text[:MAX_LABEL_VALUE_CHARS]
            if key not in merged and len(merged) >= MAX_LABELS:
                _warn_once("count", f"label {key!r} left out: at most {MAX_LABELS} labels")
                continue
            previous = merged.get(key)
            merged[key] = text
            if len(orjson.dumps(merged)) > MAX_LABELS_JSON_BYTES:
                _warn_once("size", f"label {key!r} left out: labels take at most 1 KiB of JSON")
                if previous is None:
                    del merged[key]
                else:
                    merged[key] = previous
        if merged != request.labels:
            request.put_labels(merged)

    def set_usage(
        self, *, input_tokens: int | None = None, output_tokens: int | None = None
    ) -> None:
        """Token counts the app knows (they win over what the response's ``usage`` says)."""
        if self._request.ended:
            return
        counts = [_count(input_tokens), _count(output_tokens)]
        if counts != [None, None]:
            self._request.put_usage(counts[0], counts[1])

    def set_model(self, model: str) -> None:
        """The model the request is for, when the app knows better than the request body."""
        if not self._request.ended and isinstance(model, str) and model:
            self._request.put_model(model[:MAX_MODEL_CHARS])

    def __repr__(self) -> str:
        return f"RequestHandle(request_id={self.request_id!r}, worker_id={self.worker_id!r})"


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 53:
        return None
    return value


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        log.warning("%s (logged once)", message)
