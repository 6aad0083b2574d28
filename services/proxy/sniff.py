"""Read what the hub needs out of request and response bodies, and nothing else.

Only `model`, `stream`, token counts and the moment of a stream's first output event are
taken; the bodies themselves never leave the process. Everything here is best effort on
untrusted bytes: it never raises.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from vdm_hub.shared.schema import MAX_MODEL_CHARS, clamp

# Request bodies larger than this are not parsed as JSON; a regex over the first part finds
# the model instead (LLM requests put it near the top; huge bodies are mostly prompt).
MAX_SNIFF_BYTES = 256 * 1024
# Longest SSE line kept across chunk boundaries while looking for a usage chunk.
MAX_LINE_BYTES = 64 * 1024

_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,128})"')
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_STREAM_FLAG_RE = re.compile(rb'"stream"\s*:\s*(true|false)')
# `"usage"` holding an object: proxies built on the OpenAI SDK (vandamme-proxy, LiteLLM)
# re-serialize every chunk with `"usage": null`, which is not worth decoding.
_USAGE_OBJECT_RE = re.compile(rb'"usage"\s*:\s*\{')
# Longest match of either pattern above (with a little whitespace around the colon): a search
# of a body's newest bytes starts this far back, so a match split across chunks is found.
MAX_MATCH_BYTES = 192

_PROVIDER_BY_PATH = (
    ("/v1/messages", "anthropic"),
    ("/v1/chat/completions", "openai"),
    ("/v1/completions", "openai"),
    ("/v1/responses", "openai"),
    ("/v1/embeddings", "openai"),
)


def provider_for(path: str) -> str | None:
    for suffix, provider in _PROVIDER_BY_PATH:
        if path.endswith(suffix):
            return provider
    return None


def request_fields(body: bytes, complete: bool) -> tuple[str | None, bool]:
    """(model, is_streaming) from a JSON request body (OpenAI and Anthropic shapes)."""
    if complete and len(body) <= MAX_SNIFF_BYTES:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            model = obj.get("model")
            return (
                clamp(model, MAX_MODEL_CHARS) if isinstance(model, str) and model else None,
                obj.get("stream") is True,
            )
        return None, False
    head = body[:MAX_SNIFF_BYTES]
    return model_in(head), bool(_STREAM_RE.search(head))


def model_in(head: bytes) -> str | None:
    """The first `"model": "..."` in part of a JSON body, or None."""
    match = _MODEL_RE.search(head)
    return match.group(1).decode(errors="replace") if match else None


def stream_in(head: bytes) -> bool | None:
    """The first `"stream": true|false` in part of a JSON body, or None when not (yet) seen."""
    match = _STREAM_FLAG_RE.search(head)
    return None if match is None else match.group(1) == b"true"


def _usage_of(obj: Any) -> dict[str, int]:
    """Token counts from a response object or stream event of OpenAI's chat completions or
    Responses API, or Anthropic's Messages API."""
    if not isinstance(obj, dict):
        return {}
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        # Anthropic's message_start carries a `message`, OpenAI's response.completed a
        # `response`, each with its `usage`.
        inner = obj.get("message") or obj.get("response")
        usage = inner.get("usage") if isinstance(inner, dict) else None
    if not isinstance(usage, dict):
        return {}
    out: dict[str, int] = {}
    for name, target in (
        ("prompt_tokens", "input_tokens"),
        ("input_tokens", "input_tokens"),
        ("completion_tokens", "output_tokens"),
        ("output_tokens", "output_tokens"),
    ):
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 53:
            out[target] = value
    return out


def usage_from_json(body: bytes) -> dict[str, int]:
    try:
        return _usage_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return {}


# The fields of an OpenAI chat `choices[].delta` that carry generated output. Reasoning counts:
# it is generated output the client receives (as Anthropic's thinking_delta is a
# content_block_delta); the role-only first chunk (`{"role": "assistant", "content": ""}`)
# does not.
_CHAT_OUTPUT = frozenset(
    {"content", "tool_calls", "function_call", "refusal", "reasoning_content", "reasoning", "audio"}
)


def _has_output_marker(data: bytes) -> bool:
    """Could an event in ``data`` carry generated output? Only lines that say so are
    JSON-decoded, and only until the first output was seen. The markers name the output
    events themselves, so most of a preamble is skipped undecoded (message_start, ping,
    content_block_start, response.created, response.content_part.added...): Anthropic's
    `content_block_delta`, the Responses API's `response.*.delta` types, OpenAI's (and
    legacy completions') `choices`, Gemini's `candidates`. The quotes make them keys or
    whole values: inside a JSON string a quote is escaped."""
    # Spelled out, not any(...) over a tuple: a generator costs more than the searches.
    return (
        b'"choices"' in data
        or b'content_block_delta"' in data
        or b'.delta"' in data
        or b'"candidates"' in data
    )


def carries_output(event: Any) -> bool:
    """Does this decoded SSE event carry generated output (a token, a tool call, reasoning)?

    OpenAI chat completions: a `choices[].delta` with a non-empty output field (or a legacy
    completion's non-empty `choices[].text`); the Responses API: a ``response.*.delta`` event
    with a non-empty `delta` (output text, refusal, function-call arguments, reasoning, audio);
    Anthropic: a `content_block_delta` whose delta is not empty (an empty `partial_json` opens
    every tool call); Gemini: a candidate's non-empty content part. Not: `message_start`,
    `ping`, `content_block_start`, `response.created` and the like, role-only or empty deltas,
    usage-only chunks.
    """
    if not isinstance(event, dict):
        return False
    kind = event.get("type")
    if isinstance(kind, str):
        if kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                for name, value in delta.items():
                    if value and name != "type":
                        return True
            return False
        if kind.startswith("response."):
            return kind.endswith(".delta") and bool(event.get("delta"))
    choices = event.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                # Over the delta's own few fields: cheaper than looking up every output field.
                for name, value in delta.items():
                    if value and name in _CHAT_OUTPUT:
                        return True
            if choice.get("text"):
                return True
        return False
    candidates = event.get("candidates")
    if isinstance(candidates, list):
        for candidate in candidates:
            content = candidate.get("content") if isinstance(candidate, dict) else None
            parts = content.get("parts") if isinstance(content, dict) else None
            if isinstance(parts, list) and any(
                isinstance(p, dict) and any(p.values()) for p in parts
            ):
                return True
    return False


class SSEScanner:
    """Reads an SSE response as it streams past, chunk by chunk: counts its `data:` lines
    (``data_events``: one per event in every LLM API's streams), notices the first event that
    carries generated output (``output_seen``, see :func:`carries_output`) and finds token
    usage (``usage``).

    OpenAI's chat completions send usage in a final chunk, its Responses API in
    `response.completed`; Anthropic sends input tokens in `message_start` and output tokens in
    `message_delta`. Later values win. A line is only decoded when it holds a `"usage"` object
    (not `"usage": null`, which SDK-built proxies put in every chunk), or, until the first
    output was seen, one of the output markers: once streaming, ordinary content chunks cost a
    substring search.
    """

    __slots__ = ("_partial", "_tail", "data_events", "output_seen", "usage")

    def __init__(self) -> None:
        self._partial = b""
        self._tail = b"\n"  # the stream's start counts as a line start
        self.data_events = 0
        self.output_seen = False
        self.usage: dict[str, int] = {}

    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk; True when it completed the stream's first output event."""
        # Hot path (runs for every chunk of every streamed response): SSE chunks usually end
        # on a line break and hold no usage, which costs one count, one rfind and one substring
        # search, with no copy of the chunk (plus the marker search until the first output).
        # `data:` at a line start; one split across chunks is found in the joint (the tail
        # and the head are each too short to hold the whole pattern, so nothing counts twice).
        self.data_events += chunk.count(b"\ndata:") + (self._tail + chunk[:5]).count(b"\ndata:")
        self._tail = chunk[-5:] if len(chunk) >= 5 else (self._tail + chunk)[-5:]
        data = self._partial + chunk if self._partial else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._partial = data if len(data) <= MAX_LINE_BYTES else b""
            return False
        tail = len(data) - cut - 1
        self._partial = data[cut + 1 :] if 0 < tail < MAX_LINE_BYTES else b""
        look = not self.output_seen and _has_output_marker(data)
        # The substring first: it rules out most chunks for less than the pattern costs.
        usage = b'"usage"' in data and _USAGE_OBJECT_RE.search(data) is not None
        if not (look or usage):
            return False
        first = False
        for line in data[:cut].split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            wants_output = look and _has_output_marker(line)
            wants_usage = usage and _USAGE_OBJECT_RE.search(line) is not None
            if not (wants_output or wants_usage):
                continue
            try:
                event = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            if wants_output and carries_output(event):
                self.output_seen = first = True
                look = False
            if wants_usage:
                self.usage.update(_usage_of(event))
        return first
