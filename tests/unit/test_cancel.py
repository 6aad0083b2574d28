"""The worker's in-flight registry and cancel messages, without Redis."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from vdm_hub.services.proxy.cancel import CancelListener, CancelResult, InFlight, parse_cancel


def test_cancel_calls_the_abort_hook_and_marks_who_asked() -> None:
    in_flight = InFlight()
    aborted: list[bool] = []
    vdm: dict[str, Any] = {"abort": lambda: aborted.append(True)}
    rid = in_flight.claim("r1", vdm)
    assert in_flight.cancel(rid, "session") is CancelResult.ABORTED
    assert aborted == [True] and vdm["cancelled"] == "session"
    in_flight.release(rid)
    assert in_flight.cancel(rid, "session") is CancelResult.UNKNOWN


def test_a_request_whose_app_cannot_stop_it_is_left_alone() -> None:
    in_flight = InFlight()
    vdm: dict[str, Any] = {}
    in_flight.claim("r1", vdm)
    assert in_flight.cancel("r1", "bearer") is CancelResult.NOT_ABORTABLE
    assert "cancelled" not in vdm  # its outcome must stay what really happens


def test_ids_are_unique_while_in_flight() -> None:
    in_flight = InFlight()
    first = in_flight.claim("same", {})
    second = in_flight.claim("same", {})
    fresh = in_flight.claim(None, {})
    assert first == "same" and second != "same" and len({first, second, fresh}) == 3
    assert len(in_flight) == 3


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b"[]",
        b'{"by": "x"}',
        b'{"request_id": ""}',
        b'{"request_id": 5}',
        b'{"request_id": "r", "by": 5}',
        b'{"request_id": "' + b"r" * 129 + b'"}',
        b"\xff\xfe",
        b"x" * 5000,
        None,
        17,
    ],
)
def test_anything_but_a_cancel_object_is_rejected(raw: Any) -> None:
    assert parse_cancel(raw) is None


def test_a_cancel_message_and_its_by_clamped() -> None:
    assert parse_cancel(b'{"request_id": "r1"}') == ("r1", "")
    parsed = parse_cancel(orjson.dumps({"request_id": "r1", "by": "b" * 500, "extra": 1}))
    assert parsed == ("r1", "b" * 128)


def test_the_listener_counts_what_it_handles() -> None:
    in_flight = InFlight()
    in_flight.claim("r1", {"abort": lambda: None})
    listener = CancelListener(None, "p:cancel:w1", in_flight)  # type: ignore[arg-type]
    for raw in (b'{"request_id": "r1", "by": "a"}', b'{"request_id": "r2"}', b"junk"):
        listener.handle(raw)
    assert (listener.cancelled, listener.unknown, listener.malformed) == (1, 1, 1)
