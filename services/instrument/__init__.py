"""``vdm-hub instrument -- COMMAND [ARGS...]``: every ASGI app that uvicorn serves anywhere in
COMMAND's process tree publishes its requests, with no change to the app's code.

The same mechanism as ``opentelemetry-instrument``: the command puts ``boot/`` (which holds only
a ``sitecustomize.py``) first on ``PYTHONPATH`` and execs COMMAND. Every Python process started
under it (COMMAND itself, and the workers it forks or spawns, which inherit the environment)
imports that ``sitecustomize`` at start-up, before any app code, and it arms :mod:`.hook`:
uvicorn's ``Config.load`` then wraps the app it loads with :func:`vdm_hub.instrument`, in the
process that serves it. Configuration comes only from the environment (``REDIS_URL``,
``VDM_WORKER_ID``...), as for every other command.
"""
