# runnerd worker image. Build: docker build -t runnerd .   Run: see docker-compose.yml.
#
# The container runs as root on purpose: only root can give each sandboxed step its own
# unprivileged uid (setresuid in the zygote), which is the isolation that remains on ECS Fargate.
# Steps themselves never run as root. With no extra capabilities (Fargate, Docker defaults) the
# sandbox uses: per-step uid, rlimits, seccomp, no_new_privs. Adding --cap-add SYS_ADMIN and a
# seccomp profile that allows clone(2) with namespace flags turns on the namespace layers too.

# node >= 20 for JavaScript steps (its --disable-wasm-trap-handler lets fetch() work under
# RLIMIT_AS); Debian bookworm's own nodejs is 18.
FROM node:20-bookworm-slim AS node

FROM python:3.11-slim-bookworm AS build
# A C compiler for the node fork addon (JavaScript steps forked from a warm node zygote); only
# the built addon goes into the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.* libc6-dev=2.36-* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runnerd ./runnerd
COPY sandbox ./sandbox
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && pip install --no-cache-dir /wheels/*.whl \
    && python -m sandbox.node_fork build /addon

FROM python:3.11-slim-bookworm
# libseccomp2 backs the seccomp layer; python3 on PATH serves exec steps that call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libseccomp2=2.5.* \
    && rm -rf /var/lib/apt/lists/*
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY --from=build /addon/ /usr/local/lib/python3.11/site-packages/sandbox/runtimes/
ENV RUNNERD_SANDBOX_MODE=strict \
    RUNNERD_HTTP_PORT=8080 \
    RUNNERD_DRAIN_S=25 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 CMD ["runnerd", "healthcheck"]
# Zombie reaping: run with `docker run --init` (compose: init: true; ECS: initProcessEnabled).
ENTRYPOINT ["runnerd"]
CMD ["serve"]
