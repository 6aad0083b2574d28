import sys

try:
    from bench.run import main
except ModuleNotFoundError as exc:
    if (exc.name or "bench").split(".")[0] == "bench":
        raise
    # Started by a Python without the project's dependencies (the system's python3, say):
    # one line on what to run instead of a traceback.
    print(
        f"python -m bench: cannot import {exc.name!r}; run it as .venv/bin/python -m bench, "
        "after scripts/bootstrap",
        file=sys.stderr,
    )
    sys.exit(2)

sys.exit(main())
