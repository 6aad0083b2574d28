"""No function of the production packages is over 80 lines (a long one does several things).

Lines run from ``def`` to the function's last line, nested functions included; decorators
and the blank lines after it are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "shared", "dashboard")
MAX_LINES = 80


def long_functions(root: Path, packages: tuple[str, ...], limit: int) -> list[str]:
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > limit:
                        where = path.relative_to(root)
                        found.append(f"{where}:{node.lineno} {node.name}() is {lines} lines")
    return found


def test_no_production_function_is_over_80_lines() -> None:
    assert long_functions(ROOT, PACKAGES, MAX_LINES) == []


def test_the_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path, ("pkg",), MAX_LINES) == [
        f"pkg/mod.py:5 long() is {MAX_LINES + 1} lines"
    ]
