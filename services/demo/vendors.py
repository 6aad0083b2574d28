"""OpenAI and Anthropic wire shapes for the demo upstream and the load generator: OpenAI's
chat completions and Responses API, Anthropic's Messages API.

Responses follow each vendor's documented format closely enough that a proxy parsing real
traffic (``model``, ``stream``, the ``usage`` object, the final usage chunk of a stream) parses
these the same way. One deliberate deviation: an OpenAI stream always ends with a usage chunk
(``choices: []``), as if the client had sent ``stream_options.include_usage``, so every demo
stream carries token counts.

Token counts are deterministic: input tokens from the prompt's length (about four characters a
token, as OpenAI's rule of thumb), output tokens one per content chunk.

Every answer carries the vendor's own request id header, as the real APIs do (OpenAI
``x-request-id``, Anthropic ``request-id``), and every stream opens with the vendor's
pre-content preamble (OpenAI's role-only chunk, Anthropic's ``message_start``,
``content_block_start`` and ``ping``, the Responses API's ``response.created`` and friends).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from enum import StrEnum
from itertools import chain
from typing import Any, NamedTuple
from uuid import uuid4

import orjson

# One "token" per chunk; real-looking text so a dashboard demo reads naturally.
_TEXT = (
    "The quick brown fox jumps over the lazy dog while a demo upstream streams tokens to a "
    "proxy that publishes every request it sees into Redis for the live dashboard."
)
_WORDS = tuple(_TEXT.split(" "))

DEFAULT_MODEL = "demo-model"
MODELS = ("demo-model", "gpt-4o-mini", "gpt-4.1", "claude-3-5-haiku-latest", "claude-sonnet-4-0")


class Vendor(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def _text_length(content: Any) -> int:
    """Characters of text in a message ``content``: a string or a list of content blocks."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for block in content:
            if isinstance(block, dict):
                text = block.get("text")
                if isinstance(text, str):
                    total += len(text)
            elif isinstance(block, str):
                total += len(block)
        return total
    return 0


def input_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens: ceil(characters / 4) over messages and system prompt (chat completions,
    Messages API) or input items and instructions (Responses API), at least 1."""
    chars = _text_length(body.get("system")) + _text_length(body.get("instructions"))
    items = body.get("messages")
    if not isinstance(items, list):
        items = body.get("input")
        if isinstance(items, str):
            chars += len(items)
    if isinstance(items, list):
        for message in items:
            if isinstance(message, dict):
                chars += _text_length(message.get("content"))
            elif isinstance(message, str):
                chars += len(message)
    return max(1, (chars + 3) // 4)


def chunk_text(index: int) -> str:
    return _WORDS[index % len(_WORDS)] + " "


def completion_text(chunks: int) -> str:
    return "".join(chunk_text(i) for i in range(chunks))


class SSEStream(NamedTuple):
    """A stream's SSE frames in three parts, so the server can pace the content alone."""

    opening: list[bytes]
    content: Iterator[bytes]  # one frame per content chunk (= output token)
    closing: list[bytes]

    def frames(self) -> Iterator[bytes]:
        return chain(self.opening, self.content, self.closing)


def request_id_header(vendor: Vendor) -> dict[str, str]:
    """The vendor's own request id, under the name its API sends it."""
    if vendor is Vendor.ANTHROPIC:
        return {"request-id": f"req_{uuid4().hex[:24]}"}
    return {"x-request-id": f"req_{uuid4().hex}"}


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else DEFAULT_MODEL


def wants_stream(body: dict[str, Any]) -> bool:
    return body.get("stream") is True


# --- errors ---------------------------------------------------------------------------------


def error_body(vendor: Vendor, status: int, message: str) -> bytes:
    """The vendor's JSON error envelope."""
    if vendor is Vendor.ANTHROPIC:
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}
    )


# --- OpenAI chat completions ----------------------------------------------------------------


def openai_usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def openai_completion(model: str, prompt_tokens: int, chunks: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"chatcmpl-{uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion_text(chunks)},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": openai_usage(prompt_tokens, chunks),
        }
    )


def openai_stream(model: str, prompt_tokens: int, chunks: int) -> SSEStream:
    """A role chunk, one content chunk per token, a finish chunk, a usage chunk (``choices``
    empty), then ``data: [DONE]``."""
    head = {
        "id": f"chatcmpl-{uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

    def delta(content: dict[str, str], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

    return SSEStream(
        opening=[frame(delta({"role": "assistant", "content": ""}))],
        content=(frame(delta({"content": chunk_text(i)})) for i in range(chunks)),
        closing=[
            frame(delta({}, "stop")),
            frame([], usage=openai_usage(prompt_tokens, chunks)),
            b"data: [DONE]\n\n",
        ],
    )


# --- OpenAI Responses API ------------------------------------------------------------------


def responses_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _response_object(
    response_id: str, model: str, status: str, output: list[Any], usage: Any
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": output,
        "usage": usage,
    }


def _output_message(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if text else [],
    }


def responses_answer(model: str, prompt_tokens: int, chunks: int) -> bytes:
    text = completion_text(chunks)
    return orjson.dumps(
        _response_object(
            f"resp_{uuid4().hex[:24]}",
            model,
            "completed",
            [_output_message(f"msg_{uuid4().hex[:24]}", text)],
            responses_usage(prompt_tokens, chunks),
        )
    )


def responses_stream(model: str, prompt_tokens: int, chunks: int) -> SSEStream:
    """Events as the Responses API sends them: response.created, response.in_progress,
    response.output_item.added, response.content_part.added, one response.output_text.delta
    per token, response.output_text.done, response.content_part.done,
    response.output_item.done, then response.completed carrying the usage (no ``[DONE]``)."""
    response_id, item_id = f"resp_{uuid4().hex[:24]}", f"msg_{uuid4().hex[:24]}"
    text = completion_text(chunks)

    def event(seq: int, kind: str, **fields: Any) -> bytes:
        return _event(kind.encode(), {"type": kind, "sequence_number": seq, **fields})

    in_progress = _response_object(response_id, model, "in_progress", [], None)
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    opening = [
        event(0, "response.created", response=in_progress),
        event(1, "response.in_progress", response=in_progress),
        event(
            2,
            "response.output_item.added",
            output_index=0,
            item=_output_message(item_id, "", "in_progress"),
        ),
        event(3, "response.content_part.added", part=part, **where),
    ]
    after = len(opening) + chunks  # the closing events' sequence numbers start here
    done = _response_object(
        response_id,
        model,
        "completed",
        [_output_message(item_id, text)],
        responses_usage(prompt_tokens, chunks),
    )
    return SSEStream(
        opening=opening,
        content=(
            event(len(opening) + i, "response.output_text.delta", delta=chunk_text(i), **where)
            for i in range(chunks)
        ),
        closing=[
            event(after, "response.output_text.done", text=text, **where),
            event(after + 1, "response.content_part.done", part={**part, "text": text}, **where),
            event(
                after + 2,
                "response.output_item.done",
                output_index=0,
                item=_output_message(item_id, text),
            ),
            event(after + 3, "response.completed", response=done),
        ],
    )


# --- Anthropic messages ---------------------------------------------------------------------


def anthropic_message(model: str, prompt_tokens: int, chunks: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"msg_{uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": completion_text(chunks)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": chunks},
        }
    )


def _event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_stream(model: str, prompt_tokens: int, chunks: int) -> SSEStream:
    """Events as the Messages API sends them: message_start (input tokens),
    content_block_start, ping, one content_block_delta per token, content_block_stop,
    message_delta (output tokens), message_stop."""
    start = {
        "type": "message_start",
        "message": {
            "id": f"msg_{uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The real API reports output_tokens 1 here; the final count is in message_delta.
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 1},
        },
    }
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    return SSEStream(
        opening=[
            _event(b"message_start", start),
            _event(b"content_block_start", block),
            _event(b"ping", {"type": "ping"}),
        ],
        content=(
            _event(
                b"content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": chunk_text(i)},
                },
            )
            for i in range(chunks)
        ),
        closing=[
            _event(b"content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event(
                b"message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": chunks},
                },
            ),
            _event(b"message_stop", {"type": "message_stop"}),
        ],
    )


# --- requests (the load generator's side) ---------------------------------------------------

_PROMPTS = (
    "Summarise the plot of a heist film in two sentences.",
    "Write a haiku about distributed systems and cache invalidation.",
    "Explain what a reverse proxy does to a ten-year-old.",
    "List three reasons to batch writes to Redis.",
)


def request_for(vendor: Vendor, model: str, stream: bool, n: int) -> tuple[str, bytes]:
    """(path, JSON body) of the n-th generated request in the vendor's shape."""
    messages = [{"role": "user", "content": _PROMPTS[n % len(_PROMPTS)]}]
    if vendor is Vendor.ANTHROPIC:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": 256,
            "messages": messages,
            "stream": stream,
        }
        return "/v1/messages", orjson.dumps(body)
    body = {"model": model, "messages": messages, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", orjson.dumps(body)
