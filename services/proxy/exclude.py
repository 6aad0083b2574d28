"""Which requests are not reported: the paths of ``VDM_EXCLUDE_PATHS`` (health and metrics
probes, API docs, static files by default; see ``shared/settings.py``).

An entry ``/x`` matches the path ``/x`` and every path below it (``/x/y``), ``*.ext`` a path
ending in ``.ext``. The check runs on every request, so it is a set lookup, one ``startswith``
and one ``endswith`` over tuples, whatever the number of entries.
"""

from __future__ import annotations

from collections.abc import Iterable


class PathFilter:
    __slots__ = ("exact", "prefixes", "suffixes")

    def __init__(self, entries: Iterable[str]) -> None:
        entries = tuple(entries)
        paths = [e for e in entries if e.startswith("/")]
        self.exact = frozenset(paths)
        self.prefixes = tuple(p.rstrip("/") + "/" for p in paths)
        self.suffixes = tuple(e[1:] for e in entries if e.startswith("*."))

    def __contains__(self, path: str) -> bool:
        return path in self.exact or path.startswith(self.prefixes) or path.endswith(self.suffixes)

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes)
