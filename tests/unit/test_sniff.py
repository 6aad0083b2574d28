from __future__ import annotations

import orjson
import pytest

from vdm_hub.services.demo import vendors
from vdm_hub.services.proxy import sniff


def test_request_fields_from_openai_and_anthropic_bodies() -> None:
    body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": []})
    assert sniff.request_fields(body, complete=True) == ("gpt-4o", True)
    assert sniff.request_fields(b'{"model":"claude"}', complete=True) == ("claude", False)
    assert sniff.request_fields(b"not json", complete=True) == (None, False)
    assert sniff.request_fields(b'["model"]', complete=True) == (None, False)


def test_request_fields_of_huge_or_partial_body_use_the_head() -> None:
    head = b'{"model": "big-model", "stream": true, "messages": ["' + b"x" * 1000
    assert sniff.request_fields(head, complete=False) == ("big-model", True)


def test_model_is_clamped() -> None:
    model, _ = sniff.request_fields(orjson.dumps({"model": "m" * 1000}), complete=True)
    assert model is not None and len(model) == 128


def test_provider_by_path() -> None:
    assert sniff.provider_for("/v1/messages") == "anthropic"
    assert sniff.provider_for("/v1/chat/completions") == "openai"
    assert sniff.provider_for("/other") is None


def test_stream_usage_split_across_chunks_openai() -> None:
    scanner = sniff.SSEScanner()
    payload = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34}}\n\n'
        b"data: [DONE]\n\n"
    )
    for i in range(0, len(payload), 7):
        scanner.feed(payload[i : i + 7])
    assert scanner.usage == {"input_tokens": 12, "output_tokens": 34}


def test_stream_usage_anthropic_events() -> None:
    scanner = sniff.SSEScanner()
    scanner.feed(
        b"event: message_start\n"
        b'data: {"type":"message_start",'
        b'"message":{"usage":{"input_tokens":9,"output_tokens":1}}}\n\n'
        b"event: message_delta\n"
        b'data: {"type":"message_delta","usage":{"output_tokens":40}}\n\n'
    )
    assert scanner.usage == {"input_tokens": 9, "output_tokens": 40}


def test_usage_ignores_garbage() -> None:
    assert (
        sniff.usage_from_json(b'{"usage": {"prompt_tokens": -1, "completion_tokens": true}}') == {}
    )
    scanner = sniff.SSEScanner()
    scanner.feed(b'data: {"usage": broken\n')
    assert scanner.usage == {}


def test_data_events_are_counted_whatever_the_chunking() -> None:
    stream = (
        b"event: message_start\ndata: {}\n\n"
        b'data: {"text": "a line with data: inside"}\n\n'
        b"data: one\r\ndata: two\r\n\r\n"
        b": a comment, not data\n\n"
        b"data: [DONE]\n\n"
    )
    expected = 5  # `data:` at a line start; "data:" inside a payload does not count
    for size in range(1, len(stream) + 1):
        scanner = sniff.SSEScanner()
        for i in range(0, len(stream), size):
            scanner.feed(stream[i : i + size])
        assert scanner.data_events == expected, size
    # Every split point into two chunks, the hard case for a pattern straddling a boundary.
    for cut in range(len(stream) + 1):
        scanner = sniff.SSEScanner()
        scanner.feed(stream[:cut])
        scanner.feed(stream[cut:])
        assert scanner.data_events == expected, cut


def test_stream_usage_openai_responses_events() -> None:
    scanner = sniff.SSEScanner()
    scanner.feed(
        b"event: response.created\n"
        b'data: {"type":"response.created","response":{"status":"in_progress","usage":null}}\n\n'
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"status":"completed",'
        b'"usage":{"input_tokens":21,"output_tokens":8,"total_tokens":29}}}\n\n'
    )
    assert scanner.usage == {"input_tokens": 21, "output_tokens": 8}
    assert scanner.data_events == 3


def test_usage_of_a_responses_api_answer_and_its_request_fields() -> None:
    answer = {"object": "response", "usage": {"input_tokens": 5, "output_tokens": 7}}
    assert sniff.usage_from_json(orjson.dumps(answer)) == {"input_tokens": 5, "output_tokens": 7}
    body = orjson.dumps({"model": "gpt-4.1", "input": "hi", "stream": True})
    assert sniff.request_fields(body, complete=True) == ("gpt-4.1", True)
    assert sniff.provider_for("/v1/responses") == "openai"


def test_model_and_stream_in_part_of_a_body() -> None:
    assert sniff.model_in(b'{"messages": [], "model": "m-1", "str') == "m-1"
    assert sniff.stream_in(b'{"messages": [], "model": "m-1", "str') is None
    assert sniff.stream_in(b'"stream" : false,') is False
    assert sniff.stream_in(b'"stream_options": {}, "stream": true') is True
    assert sniff.model_in(b'{"content": "say \\"model\\": \\"x\\""}') is None


# --- first output (time to first token) ------------------------------------------------------
# Recorded shapes (field for field as each API sends them, ids shortened): what comes before
# the first token, then the first event that carries output.


def _sse(*events: dict[str, object], named: bool = False) -> list[bytes]:
    """One frame per event; ``named`` adds the `event:` line (Anthropic, Responses API)."""
    frames = []
    for event in events:
        head = b"event: %s\n" % str(event["type"]).encode() if named else b""
        frames.append(head + b"data: " + orjson.dumps(event) + b"\n\n")
    return frames


def _chat(delta: dict[str, object], **extra: object) -> dict[str, object]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1764036000,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
        **extra,
    }


OPENAI_CHAT_PREAMBLE = _sse(_chat({"role": "assistant", "content": "", "refusal": None}))
ANTHROPIC_PREAMBLE = _sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-0",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    named=True,
)
RESPONSES_PREAMBLE = _sse(
    {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1"}},
    {"type": "response.in_progress", "sequence_number": 1, "response": {"id": "resp_1"}},
    {
        "type": "response.output_item.added",
        "sequence_number": 2,
        "output_index": 0,
        "item": {"id": "msg_1", "type": "message", "status": "in_progress", "content": []},
    },
    {
        "type": "response.content_part.added",
        "sequence_number": 3,
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "part": {"type": "output_text", "text": "", "annotations": []},
    },
    named=True,
)

FIRST_OUTPUT = {
    "openai chat content": (OPENAI_CHAT_PREAMBLE, _sse(_chat({"content": "Hello"}))),
    "openai chat tool call": (
        OPENAI_CHAT_PREAMBLE,
        _sse(
            _chat(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            )
        ),
    ),
    "openai chat reasoning": (OPENAI_CHAT_PREAMBLE, _sse(_chat({"reasoning_content": "Hm"}))),
    "openai legacy completion": (
        [],
        _sse({"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "Hi"}]}),
    ),
    "anthropic text": (
        ANTHROPIC_PREAMBLE,
        _sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hello"},
            },
            named=True,
        ),
    ),
    "anthropic thinking": (
        ANTHROPIC_PREAMBLE,
        _sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me"},
            },
            named=True,
        ),
    ),
    "anthropic tool use": (
        # A tool call opens with an empty input_json_delta: no output yet.
        ANTHROPIC_PREAMBLE
        + _sse(
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
            },
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": ""},
            },
            named=True,
        ),
        _sse(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": '},
            },
            named=True,
        ),
    ),
    "responses text": (
        RESPONSES_PREAMBLE,
        _sse(
            {
                "type": "response.output_text.delta",
                "sequence_number": 4,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": "Hello",
            },
            named=True,
        ),
    ),
    "responses function call": (
        RESPONSES_PREAMBLE[:2],
        _sse(
            {
                "type": "response.function_call_arguments.delta",
                "sequence_number": 3,
                "item_id": "fc_1",
                "output_index": 0,
                "delta": '{"',
            },
            named=True,
        ),
    ),
    "responses refusal": (
        RESPONSES_PREAMBLE,
        _sse(
            {
                "type": "response.refusal.delta",
                "sequence_number": 4,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": "I can't",
            },
            named=True,
        ),
    ),
    "gemini": (
        [],
        _sse(
            {
                "candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}],
                "modelVersion": "gemini-2.5-flash",
            }
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(FIRST_OUTPUT))
def test_first_output_is_the_first_event_that_carries_generated_output(case: str) -> None:
    preamble, first = FIRST_OUTPUT[case]
    scanner = sniff.SSEScanner()
    for frame in preamble:
        assert scanner.feed(frame) is False, frame
    assert scanner.output_seen is False
    assert scanner.feed(first[0]) is True
    assert scanner.output_seen is True
    # Reported once: later output is not "first" again.
    assert scanner.feed(first[0]) is False


@pytest.mark.parametrize("case", sorted(FIRST_OUTPUT))
def test_first_output_is_found_in_the_chunk_that_completes_it_whatever_the_split(
    case: str,
) -> None:
    preamble, first = FIRST_OUTPUT[case]
    stream = b"".join(preamble) + first[0]
    # The line break that ends the event's data line completes it.
    end_of_first = stream.rindex(b"\n", 0, len(stream) - 1)
    for cut in range(1, len(stream)):
        scanner = sniff.SSEScanner()
        found = [scanner.feed(stream[:cut]), scanner.feed(stream[cut:])]
        assert found == ([True, False] if cut > end_of_first else [False, True]), cut


def test_events_without_output_are_not_the_first_token() -> None:
    silent = [
        *OPENAI_CHAT_PREAMBLE,
        *_sse(_chat({"content": None})),
        *_sse(_chat({}, usage=None)),
        *_sse({**_chat({}), "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0}}),
        *_sse({"type": "response.output_text.delta", "delta": ""}),
        *_sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}),
        *_sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {}}),
        *_sse({"candidates": [{"content": {"parts": [{"text": ""}]}}]}),
        b'data: {"text": broken json\n\n',
        b"data: [DONE]\n\n",
        b": keep-alive comment\n\n",
    ]
    scanner = sniff.SSEScanner()
    assert not any(scanner.feed(frame) for frame in silent)
    assert scanner.output_seen is False
    assert scanner.data_events == len(silent) - 1  # the comment is no data event


def test_usage_and_first_output_in_one_event_are_both_read() -> None:
    # Some OpenAI-compatible servers put usage on every chunk.
    scanner = sniff.SSEScanner()
    event = _chat({"content": "Hi"}, usage={"prompt_tokens": 3, "completion_tokens": 1})
    assert scanner.feed(_sse(event)[0]) is True
    assert scanner.usage == {"input_tokens": 3, "output_tokens": 1}


def test_the_demo_upstream_streams_have_their_first_output_in_the_first_content_frame() -> None:
    for make in (vendors.openai_stream, vendors.responses_stream, vendors.anthropic_stream):
        stream = make("m", 3, 2)
        scanner = sniff.SSEScanner()
        assert [scanner.feed(f) for f in stream.opening] == [False] * len(stream.opening)
        assert [scanner.feed(f) for f in stream.content] == [True, False], make.__name__


def test_usage_null_in_every_chunk_is_not_decoded_and_the_real_usage_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Proxies built on the OpenAI SDK (vandamme-proxy, LiteLLM) re-serialize each chunk with
    `"usage": null`; once the first output is seen, such a chunk costs no JSON decode."""
    sdk = {"usage": None, "service_tier": None}
    frames = [
        *_sse(_chat({"role": "assistant", "content": ""}, **sdk)),
        *_sse(*(_chat({"content": f"t{i} "}, **sdk) for i in range(8))),
        *_sse({**_chat({}), "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 8}}),
        b"data: [DONE]\n\n",
    ]
    decoded: list[bytes] = []
    real_loads = sniff.orjson.loads

    def counting_loads(data: bytes) -> object:
        decoded.append(data)
        return real_loads(data)

    monkeypatch.setattr(sniff.orjson, "loads", counting_loads)
    scanner = sniff.SSEScanner()
    assert [scanner.feed(f) for f in frames].index(True) == 1
    assert scanner.usage == {"input_tokens": 5, "output_tokens": 8}
    # The role-only preamble and the first token (looking for the first output), the usage.
    assert len(decoded) == 3
    assert scanner.data_events == len(frames)
