# vdm-hub images, one per role, each with only what its role needs (pyproject.toml extras):
#
#   docker build --target core .        worker, demo-upstream, load  (the core package)
#   docker build --target stream .      the stream service           (+ the `stream` extra)
#   docker build --target dashboard .   the dashboard                (+ the `dashboard` extra)
#
# ENTRYPOINT is `vdm-hub`, so a container's command is a sub-command (`worker --upstream URL`).
# Every image runs as the non-root user `vdm` (uid 10001). Health probes (the ports are the
# sub-commands' defaults): worker GET /_vdm/healthz, stream service GET /healthz (up) and
# /readyz (in sync with Redis), dashboard GET /healthz, demo upstream GET /healthz; the compose
# file runs them as healthchecks. No HEALTHCHECK here: a fixed port would be wrong as soon as
# `--port` moves it.
#
# Layers: the dependencies of each role are installed from pyproject.toml alone, before any
# source is copied, so a rebuild after a code change reinstalls only the project's own wheel
# (no network); the wheel is built in a separate stage, so no source tree, build tool or pip
# cache ends up in an image.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY dashboard ./dashboard
# vdm_hub/ is the import package: relative links to the three folders above
COPY vdm_hub ./vdm_hub
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin vdm
WORKDIR /home/vdm
COPY pyproject.toml /tmp/pyproject.toml
# The core's requirements, read from pyproject.toml (the stages below: one extra's each).
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
      print('\n'.join(p['dependencies']))" >/tmp/r.txt \
    && pip install -r /tmp/r.txt && rm /tmp/r.txt
# worker, stream service, dashboard, demo upstream (defaults of the sub-commands)
EXPOSE 8080 8090 8050 8001
ENTRYPOINT ["vdm-hub"]
CMD ["--help"]

FROM base AS stream-deps
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
      print('\n'.join(p['optional-dependencies']['stream']))" >/tmp/r.txt \
    && pip install -r /tmp/r.txt && rm /tmp/r.txt

FROM base AS dashboard-deps
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
      print('\n'.join(p['optional-dependencies']['dashboard']))" >/tmp/r.txt \
    && pip install -r /tmp/r.txt && rm /tmp/r.txt

# The project's wheel last, without dependencies (each stage above has its role's).
FROM base AS core
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
USER vdm

FROM stream-deps AS stream
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
USER vdm

FROM dashboard-deps AS dashboard
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
USER vdm
