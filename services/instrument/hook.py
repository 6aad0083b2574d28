"""The uvicorn hook of ``vdm-hub instrument``: the app uvicorn loads is wrapped with
:func:`vdm_hub.instrument` in the process that serves it.

Why ``uvicorn.config.Config.load``: it is where uvicorn turns its ``app`` (an import string, a
factory, or the object gunicorn imported) into the ASGI callable it serves, and every
uvicorn-based server calls it in the serving process, after any fork or spawn:

- ``uvicorn MOD:app`` and ``uvicorn.run(...)``: ``Server._serve`` in the one process;
- ``uvicorn MOD:app --workers N`` (and ``--reload``): each worker is *spawned*, a fresh
  interpreter that runs ``sitecustomize`` and so this hook again, then ``Server._serve``; the
  parent only supervises and never loads the app;
- ``gunicorn -k uvicorn.workers.UvicornWorker`` (or the ``uvicorn-worker`` package), with or
  without ``--preload``: the worker's ``_serve`` hands gunicorn's app object to a ``Config``
  and calls ``load`` in the forked child. With ``--preload`` the app was imported in the
  parent before the fork, but nothing of ours runs there: the publisher (and its Redis
  connection) is created in each child;
- the ``litellm`` proxy CLI, which calls ``uvicorn.run`` (``--num_workers N``: the same as
  ``--workers N``).

The hook waits for ``uvicorn.config`` to be imported (a finder first on ``sys.meta_path``
that wraps that one module's loader), so a process of the tree that never imports uvicorn
pays for this module and nothing else. Arming it twice, or loading twice, wraps once:
``Config.load`` is replaced once, and ``instrument()`` leaves an instrumented app as it is.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

TARGET = "uvicorn.config"
# Set on the replacement ``Config.load``, so a second patch sees the first.
MARK = "__vdm_hub_instrumented__"
# uvicorn's own exit code when it cannot load the app (uvicorn.server.STARTUP_FAILURE).
STARTUP_FAILURE = 3


def install() -> None:
    """Arm the hook in this process (idempotent)."""
    module = sys.modules.get(TARGET)
    if module is not None:
        patch_config(module)
    elif not any(isinstance(finder, AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, AfterImport(TARGET, patch_config))


class AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then(module)`` right after the module ``name`` is executed, on its first import.

    It finds nothing itself: it asks the finders after it for ``name``'s spec and wraps that
    spec's loader. It leaves ``sys.meta_path`` once it has fired.
    """

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        spec: ModuleSpec | None = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = ThenLoader(spec.loader, self._fired)
        return spec

    def _fired(self, module: ModuleType) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.then(module)


class ThenLoader(importlib.abc.Loader):
    """A module's own loader, followed by ``then(module)``; anything else it is asked
    (``get_source`` for tracebacks, ``get_resource_reader``...) goes to the original."""

    def __init__(self, loader: importlib.abc.Loader, then: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.then = then

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.then(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def patch_config(module: ModuleType) -> None:
    """Make ``module.Config.load`` wrap the app it loads (once)."""
    config_class = getattr(module, "Config", None)
    load = getattr(config_class, "load", None)
    if config_class is None or load is None or getattr(load, MARK, False):
        return

    @functools.wraps(load)
    def load_instrumented(self: Any) -> None:
        load(self)
        self.loaded_app = instrumented(self.loaded_app)

    setattr(load_instrumented, MARK, True)
    config_class.load = load_instrumented


def instrumented(app: Any) -> Any:
    """``app`` wrapped with :func:`vdm_hub.instrument`, configured from the environment.

    Imported here, not at the top: a process that never serves pays nothing for it. A bad
    setting stops the process as uvicorn stops on an app it cannot load: one line naming the
    variable, and uvicorn's start-up failure code.
    """
    from vdm_hub import instrument
    from vdm_hub.shared.settings import ConfigError

    try:
        return instrument(app)
    except ConfigError as exc:
        sys.stderr.write(f"vdm-hub instrument: configuration error: {exc}\n")
        raise SystemExit(STARTUP_FAILURE) from None
