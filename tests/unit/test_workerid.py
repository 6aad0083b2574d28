"""The ids a process may publish under: the template filled in for this process, ``{index}``
counting up, a fixed id moving on to ID-2, ID-3..., and every id within the wire's limits."""

from __future__ import annotations

import itertools
import os
import socket

import pytest

from vdm_hub.services.proxy.workerid import WorkerIdPlan
from vdm_hub.shared.schema import MAX_ID_CHARS
from vdm_hub.shared.settings import ConfigError, Settings


def first(plan: WorkerIdPlan, n: int) -> list[str]:
    return list(itertools.islice(plan.candidates(), n))


def test_the_default_is_this_host_and_process() -> None:
    plan = WorkerIdPlan.here(Settings.from_env({}).worker_id)
    assert plan.first() == f"{socket.gethostname()}-{os.getpid()}"
    assert not plan.indexed


def test_index_counts_up_and_a_fixed_id_moves_on_with_a_suffix() -> None:
    assert first(WorkerIdPlan("gw-{index}.{host}", "h", 7), 3) == ["gw-1.h", "gw-2.h", "gw-3.h"]
    assert first(WorkerIdPlan("{host}-{pid}", "box", 1), 3) == ["box-1", "box-1-2", "box-1-3"]


def test_a_host_name_with_characters_an_id_cannot_hold_is_made_safe() -> None:
    assert WorkerIdPlan("{host}-{pid}", "a b:c{d}", 5).first() == "a-b-c-d--5"


def test_ids_stay_within_the_wire_limit_and_keep_what_makes_them_unique() -> None:
    plan = WorkerIdPlan("{host}-{index}-x", "h" * 300, 1)
    ids = first(plan, 12)
    assert all(len(i) <= MAX_ID_CHARS for i in ids)
    assert len(set(ids)) == 12 and ids[11].endswith("12-x")
    fixed = first(WorkerIdPlan("{host}", "h" * 300, 1), 3)
    assert all(len(i) == MAX_ID_CHARS for i in fixed) and fixed[2].endswith("-3")


@pytest.mark.parametrize("bad", ["gw-{index}-{index}", "gw-{idx}", "gw {pid}", "{pid}:x"])
def test_a_bad_template_is_refused_naming_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match="VDM_WORKER_ID"):
        Settings.from_env({"VDM_WORKER_ID": bad})
