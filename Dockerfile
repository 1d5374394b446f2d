#
# replayd container image: two stages, only the virtualenv (without pip) reaches the runtime image.
#
#   docker build -t replayd:dev .
#   docker run --rm --read-only --tmpfs /tmp --stop-timeout 30 \
#     -v "$PWD/deploy/compose/replayd.toml:/etc/replayd/replayd.toml:ro" \
#     -e REPLAYD_REDIS__URL=redis://host.docker.internal:6379/0 -p 9464:9464 replayd:dev
#
# A private index or a TLS-intercepting proxy's CA: pass a pip config as a build secret (and the CA bundle
# it names as `cert = /run/secrets/pip-ca.crt`, a second one); they are mounted for the install steps only
# and never land in a layer:
#
#   docker build --secret id=pip.conf,src=pip.conf --secret id=pip-ca.crt,src=ca.crt -t replayd:dev .
#
# No `# syntax=` line: BuildKit would fetch that frontend image from a registry at every build, and the
# built-in frontend has what this file uses (RUN --mount).
#
# Base image: both stages use the same tag so the venv's interpreter symlink (/usr/local/bin/python, 3.12)
# and glibc match. The tag pins the minor Python version and the Debian release; pin it further by
# digest (python:3.12-slim-bookworm@sha256:...) in the release pipeline. The digest is not written here
# because it was authored offline, where it could not be resolved, and a guessed digest would break builds.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# The uv that reads uv.lock; keep it equal to UV_VERSION in the Makefile.
ARG UV_VERSION=0.13.9

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_CONFIG_FILE=/run/secrets/pip.conf \
    PYTHONDONTWRITEBYTECODE=1

# Every runtime dependency (redis/hiredis, uvloop, msgspec, pydantic-core) ships manylinux wheels for
# CPython 3.12 on amd64 and arm64, so no compiler is installed, not even in the builder.
# The tools (pip, uv) live in a venv of their own; the runtime venv gets none, and no pip.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca.crt \
    python -m venv /opt/tools \
    && /opt/tools/bin/pip install --no-cache-dir "uv==${UV_VERSION}" \
    && python -m venv --without-pip /app/.venv

WORKDIR /src
# .dockerignore admits only what the build needs: pyproject.toml, uv.lock, README.md (the package's
# readme), replayd/ and the healthcheck.
COPY pyproject.toml uv.lock README.md ./
# The locked versions with their hashes, exactly: `uv export --locked --offline` fails if uv.lock is out
# of date with pyproject.toml and never resolves anything afresh. pip installs them (it honours the pip
# config secret: a private index, a CA), then the package itself without its dependencies.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca.crt \
    /opt/tools/bin/uv export --locked --offline --no-dev --no-emit-project --format requirements-txt \
       -o /tmp/requirements.txt \
    && /opt/tools/bin/pip --python /app/.venv/bin/python install --no-cache-dir --require-hashes --no-deps \
       -r /tmp/requirements.txt
COPY replayd ./replayd
# pip compiles bytecode as it installs; compileall then rewrites it as unchecked-hash .pyc files, which stay
# valid whatever mtimes COPY --from gives the sources, so a read-only root filesystem costs nothing at
# start. The last step is a smoke test: the console script resolves and the package imports.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca.crt \
    /opt/tools/bin/pip --python /app/.venv/bin/python install --no-cache-dir --no-deps . \
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
COPY deploy/healthcheck.py /app/healthcheck.py

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
USER 10001:10001

# One HTTP listener: /metrics, /healthz (/livez), /readyz. With `run --workers K` the supervisor serves it
# for all K workers.
EXPOSE 9464

# Only plain Docker and Podman use this; Kubernetes ignores HEALTHCHECK and uses the pod's probes.
# /healthz never depends on Redis, so a Redis outage does not mark the container unhealthy; a one-shot
# command (rebuild, verify, replay) that serves no metrics passes (its exit code is what tells).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]

# replayd runs as PID 1 and installs its own SIGTERM/SIGINT handlers (anyio signal receivers): the first
# signal drains, commits and exits 0 within shutdown_timeout_s (20 s), so give the container more than
# that to stop: `docker run --stop-timeout 30`, `podman stop --time 30` (their default is 10 s). No tini:
# the only subprocesses are the `--workers` shards, which replayd's supervisor reaps itself. Exec form,
# so no shell swallows signals.
STOPSIGNAL SIGTERM
ENTRYPOINT ["replayd"]
CMD ["run", "--config", "/etc/replayd/replayd.toml"]
