from __future__ import annotations

import orjson

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
    scanner = sniff.StreamUsageScanner()
    payload = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34}}\n\n'
        b"data: [DONE]\n\n"
    )
    for i in range(0, len(payload), 7):
        scanner.feed(payload[i : i + 7])
    assert scanner.usage == {"input_tokens": 12, "output_tokens": 34}


def test_stream_usage_anthropic_events() -> None:
    scanner = sniff.StreamUsageScanner()
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
    scanner = sniff.StreamUsageScanner()
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
        scanner = sniff.StreamUsageScanner()
        for i in range(0, len(stream), size):
            scanner.feed(stream[i : i + size])
        assert scanner.data_events == expected, size
    # Every split point into two chunks, the hard case for a pattern straddling a boundary.
    for cut in range(len(stream) + 1):
        scanner = sniff.StreamUsageScanner()
        scanner.feed(stream[:cut])
        scanner.feed(stream[cut:])
        assert scanner.data_events == expected, cut


def test_stream_usage_openai_responses_events() -> None:
    scanner = sniff.StreamUsageScanner()
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
