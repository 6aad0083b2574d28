"""Put first on ``PYTHONPATH`` by ``vdm-hub instrument``; Python's ``site`` imports it when
each process of the instrumented command starts, before any app code runs.

It arms vdm-hub's uvicorn hook (:mod:`vdm_hub.services.instrument.hook`), then runs the
``sitecustomize`` it hides, if there is one further down the path (a virtualenv's, a
distribution's, or another tool's that works the same way), so that one keeps working.
Nothing here may stop the process: a failure is one line on stderr.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _arm() -> None:
    try:
        from vdm_hub.services.instrument.hook import install
    except ImportError as exc:
        # The usual cause: vdm-hub is installed in another environment than the app's.
        sys.stderr.write(
            f"vdm-hub instrument: {sys.executable} cannot import vdm_hub ({exc}); this process "
            "is not instrumented: install vdm-hub in the environment that runs the app\n"
        )
        return
    install()


def _chain() -> None:
    """Execute the next ``sitecustomize`` on ``sys.path`` after this file's directory."""
    here = os.path.realpath(os.path.dirname(__file__))
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # site.py reports a failing sitecustomize the same way
        sys.stderr.write(
            f"Error in sitecustomize ({spec.origin}); set PYTHONVERBOSE for a traceback:\n{exc!r}\n"
        )


_arm()
_chain()
