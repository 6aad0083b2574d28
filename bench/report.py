"""Results: percentiles, tables printed to the terminal, and their blocks in docs/performance.md.

Each scenario owns one block of the results section, between
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``; a run replaces the blocks of
the scenarios it ran and leaves the rest of the document (the prose on method and findings)
as it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
RESULTS_HEADING = "## Results"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def fmt(value: object, digits: int = 1) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[object]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append(list(cells))

    def _cells(self) -> list[list[str]]:
        return [[c if isinstance(c, str) else fmt(c) for c in row] for row in self.rows]

    def text(self) -> str:
        cells = self._cells()
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(self.headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(self.headers, widths, strict=True))
        out = [self.title, line, "-" * len(line)]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |"]
        out.append("|" + "|".join("---" for _ in self.headers) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self._cells()]
        return "\n".join(out)


@dataclass
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: context only, no target

    def line(self) -> str:
        mark = {True: "met", False: "MISSED", None: "info"}[self.met]
        return f"[{mark}] {self.target}: {self.measured}"


@dataclass
class Result:
    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = [f"== {self.title} =="]
        parts += [t.text() for t in self.tables]
        parts += [v.line() for v in self.verdicts]
        parts += [f"note: {n}" for n in self.notes]
        return "\n\n".join(parts)

    def markdown(self, command: str, conditions: str) -> str:
        parts = [f"### {self.title}", f"`{command}` — {conditions}"]
        parts += [t.markdown() for t in self.tables]
        if self.verdicts:
            parts.append("\n".join(f"- {v.line()}" for v in self.verdicts))
        parts += [f"_{n}_" for n in self.notes]
        return "\n\n".join(parts)


def write_doc(results: Sequence[Result], command: str, conditions: str, doc: Path = DOC) -> None:
    text = doc.read_text() if doc.exists() else f"# Performance\n\n{RESULTS_HEADING}\n"
    if RESULTS_HEADING not in text:
        text = text.rstrip() + f"\n\n{RESULTS_HEADING}\n"
    for result in results:
        start, end = f"<!-- bench:{result.name}:start -->", f"<!-- bench:{result.name}:end -->"
        block = f"{start}\n{result.markdown(command, conditions)}\n{end}"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        found = pattern.search(text)
        if found:
            text = text[: found.start()] + block + text[found.end() :]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip() + "\n")
