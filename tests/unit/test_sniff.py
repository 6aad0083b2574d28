from __future__ import annotations

import orjson

from services.proxy import sniff


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
