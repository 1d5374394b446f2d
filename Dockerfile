# syntax=docker/dockerfile:1
#
# replayd container image: two stages, only the virtualenv reaches the runtime image.
#
#   docker build -t replayd:dev .
#   docker run --rm -v "$PWD/deploy/compose/replayd.toml:/etc/replayd/replayd.toml:ro" \
#     -e REPLAYD_REDIS__URL=redis://host.docker.internal:6379/0 -p 9464:9464 replayd:dev
#
# Base image: both stages use the same tag so the venv's interpreter symlink (/usr/local/bin/python, 3.12)
# and glibc match. The tag pins the minor Python version and the Debian release; pin it further by
# digest (python:3.12-slim-bookworm@sha256:...) in the release pipeline. The digest is not written here
# because it was authored offline, where it could not be resolved, and a guessed digest would break builds.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

# Every runtime dependency (redis/hiredis, uvloop, msgspec, pydantic-core) ships manylinux wheels for
# CPython 3.12 on amd64 and arm64, so no compiler is installed, not even in the builder.
RUN python -m venv /app/.venv

WORKDIR /src
# .dockerignore admits only what the build needs: pyproject.toml, README.md (the package's readme) and
# replayd/. Plain pip, not uv: the build must not depend on fetching an extra tool.
COPY pyproject.toml README.md ./
COPY replayd ./replayd
# pip compiles bytecode as it installs; compileall then rewrites it as unchecked-hash .pyc files, which stay
# valid whatever mtimes COPY --from gives the sources, so a read-only root filesystem costs nothing at
# start. The last step is a smoke test: the console script resolves and the package imports.
RUN /app/.venv/bin/pip install --no-cache-dir . \
    && /app/.venv/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /app/.venv/lib \
    && /app/.venv/bin/replayd --help > /dev/null

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="replayd" \
      org.opencontainers.image.description="Event-replay daemon for Redis Streams" \
      org.opencontainers.image.licenses="MIT"

# Numeric UID/GID: Kubernetes can only verify runAsNonRoot for a numeric image user.
RUN groupadd --system --gid 10001 replayd \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin replayd

COPY --from=builder /app/.venv /app/.venv

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
USER 10001:10001

# One HTTP listener: /metrics, /healthz (/livez), /readyz.
EXPOSE 9464

# Only plain Docker and Compose use this; Kubernetes ignores HEALTHCHECK and uses the pod's probes.
# slim has no curl; urllib exits non-zero on a refused connection or a non-2xx answer. /healthz never
# depends on Redis, so a Redis outage does not mark the container unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REPLAYD_HTTP__PORT', '9464'), timeout=4)"]

# replayd runs as PID 1 and installs its own SIGTERM/SIGINT handlers (anyio signal receivers): the first
# signal drains, commits and exits 0 within shutdown_timeout_s. No tini: the only subprocesses are the
# `--workers` shards, which replayd's supervisor reaps itself. Exec form, so no shell swallows signals.
STOPSIGNAL SIGTERM
ENTRYPOINT ["replayd"]
CMD ["run", "--config", "/etc/replayd/replayd.toml"]
