"""vdm-hub: a Redis-backed live metrics hub for fleets of HTTP/LLM proxy workers.

Installed, the project is this one import package. Its parts live under it
(``vdm_hub.shared``, ``vdm_hub.services``, ``vdm_hub.dashboard``); in the repository they are
the top-level folders ``shared/``, ``services/`` and ``dashboard/``, which ``vdm_hub/`` links
to, so the same tree serves the wheel, editable installs and mypy.

What this module exports (``__all__``) is the public API; everything else may change.
"""

from __future__ import annotations

from vdm_hub.shared import __version__

__all__ = ["__version__"]
