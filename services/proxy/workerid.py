"""A worker id per serving process, from the ``VDM_WORKER_ID`` template.

The template (default ``{host}-{pid}``) is filled in by the process that serves, when its
publisher starts: after any fork, so the children of a pre-fork server (gunicorn
``--preload``, ``uvicorn --workers N``) each get their own id, never the parent's. ``{host}``
is this host's name (characters a worker id cannot hold become ``-``), ``{pid}`` this process's
id. ``{index}`` is a small number unique among the live processes sharing the template: the
publisher tries :meth:`WorkerIdPlan.candidates` in order and registration refuses one that a
live process holds (``shared/lua/register.lua``), so the first free one is claimed atomically.

A template without ``{index}`` names one id. When another live process turns out to hold it
too (two processes given one fixed id, or two containers that share a host name and whose
processes are both pid 1), the one that finds out moves to ``ID-2`` (or the next free
``ID-n``), and says so in one warning.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from vdm_hub.shared.schema import MAX_ID_CHARS

_UNSAFE = re.compile(r"[\s:{}*?\[\]]")
# Far more processes than one template will ever have; a bound, so a full range ends the search.
MAX_INDEX = 100_000


@dataclass(frozen=True, slots=True)
class WorkerIdPlan:
    """The ids one process may publish under, best first."""

    template: str
    host: str
    pid: int

    @classmethod
    def here(cls, template: str) -> WorkerIdPlan:
        """The plan of the calling process (call it in the process that serves)."""
        return cls(template, socket.gethostname(), os.getpid())

    @property
    def indexed(self) -> bool:
        return "{index}" in self.template

    def first(self) -> str:
        """The id to use until a registration has settled it."""
        return next(self.candidates())

    def candidates(self) -> Iterator[str]:
        """``{index}`` = 1, 2, 3...; without ``{index}``: the id, then ID-2, ID-3..."""
        base = self._fill()
        if self.indexed:
            for n in range(1, MAX_INDEX + 1):
                yield _fit(base, "{index}", str(n))
            return
        yield _fit(base, "", "")
        for n in range(2, MAX_INDEX + 1):
            yield _fit(base + "{index}", "{index}", f"-{n}")

    def _fill(self) -> str:
        host = _UNSAFE.sub("-", self.host) or "host"
        return self.template.replace("{pid}", str(self.pid)).replace("{host}", host)


def _fit(base: str, placeholder: str, value: str) -> str:
    """``base`` with ``placeholder`` replaced by ``value``, cut to the longest id allowed: the
    text before the placeholder (where a long host name is) goes first, never the value that
    makes the id unique."""
    head, _, tail = base.partition(placeholder) if placeholder else (base, "", "")
    room = MAX_ID_CHARS - len(value)
    if len(head) + len(tail) > room:
        tail = tail[:room]
        head = head[: room - len(tail)]
    return head + value + tail
