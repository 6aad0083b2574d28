# One image for every vdm-hub part: `docker run IMAGE worker --upstream URL`, `... stream`, etc.
# Build stage makes a wheel; the runtime stage installs only that wheel and its dependencies,
# so no source tree, build tools or pip cache end up in the image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY dashboard ./dashboard
# vdm_hub/ is the import package: relative links to the three folders above
COPY vdm_hub ./vdm_hub
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# The image runs every role but Redis (compose has its own): the core plus the stream and
# dashboard extras.
RUN pip install --no-cache-dir "$(echo /wheels/*.whl)[stream,dashboard]" \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin vdm
USER vdm
WORKDIR /home/vdm
# worker, stream service, dashboard, demo upstream (defaults of the sub-commands)
EXPOSE 8080 8090 8050 8001
ENTRYPOINT ["vdm-hub"]
CMD ["--help"]
