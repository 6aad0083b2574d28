"""A command whose install extra is missing says which one, in one line, and exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A fresh interpreter, so the stream service's modules are not imported already; None in
# sys.modules makes `import fastapi` fail as it does where the extra is not installed.
WITHOUT_FASTAPI = (
    "import sys; sys.modules['fastapi'] = None; "
    "from vdm_hub.services.cli import main; sys.exit(main(['stream']))"
)


@pytest.mark.timeout(30)
def test_stream_without_its_extra_names_the_extra() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_FASTAPI], capture_output=True, text=True, timeout=25
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "vdm-hub stream: needs the 'stream' extra (no module named 'fastapi'): "
        "pip install 'vdm-hub[stream]'"
    ]
