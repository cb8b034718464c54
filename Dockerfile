# syntax=docker/dockerfile:1
#
# irsa-cache, the image deploy/base/daemonset.yaml runs:
#   docker build -t irsa-cache:0.1.0 .
#
# Two stages. The builder makes a self-contained venv at /opt/irsa-cache: the
# runtime dependencies exactly as requirements.lock pins them (every file checked
# against its hash, wheels only, so nothing is compiled and no compiler is needed),
# then irsa-cache's own wheel. The final image is the same slim Python with that
# venv copied in: no pip, no setuptools, no compiler, non-root.
#
# Pin the base by digest as well where the registry is reachable:
#   docker buildx imagetools inspect python:3.11.17-slim-bookworm
#   docker build --build-arg PYTHON_IMAGE=python:3.11.17-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

# Build tooling (setuptools, to build irsa-cache's wheel) goes in a venv of its own
# that the final stage never sees.
COPY requirements-build.lock /tmp/
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements-build.lock

# The runtime venv has no pip or setuptools of its own: the build venv's pip installs
# into it (--python). `--copies` gives it its own interpreter binary, so the file
# capability set in the final stage marks the daemon's interpreter and nothing else.
COPY requirements.lock /tmp/
RUN python -m venv --copies --without-pip /opt/irsa-cache \
 && /opt/build/bin/pip --python /opt/irsa-cache/bin/python install --no-cache-dir \
        --require-hashes --only-binary=:all: --no-deps -r /tmp/requirements.lock

WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon/ daemon/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
 && /opt/build/bin/pip --python /opt/irsa-cache/bin/python install --no-cache-dir --no-deps /tmp/wheels/irsa_cache-*.whl


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="irsa-cache" \
      org.opencontainers.image.description="Node-local cache of IRSA credentials for Kubernetes on AWS" \
      org.opencontainers.image.licenses="Apache-2.0"

# The base image's pip, setuptools and wheel are build tools the daemon never uses.
# A fixed numeric user (65532, as distroless uses) that deploy/base/daemonset.yaml names.
RUN python -m pip uninstall --no-cache-dir --yes pip setuptools wheel \
 && groupadd --system --gid 65532 irsa-cache \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin irsa-cache

COPY --from=builder /opt/irsa-cache /opt/irsa-cache

# Port 80 as a non-root user. Kubernetes' `capabilities.add: [NET_BIND_SERVICE]` does
# not reach a non-root process (no ambient capabilities: kubernetes/kubernetes#56374),
# so the daemon's interpreter carries the capability as a file capability,
# cap_net_bind_service=ep (what `setcap` writes; setcap itself is not in this image).
# The kernel grants it only within the container's bounding set: with the manifest's
# `drop: [ALL]`, `add: [NET_BIND_SERVICE]` this is the one capability the daemon has.
# It also works with allowPrivilegeEscalation: false, because the runtime already put
# NET_BIND_SERVICE in the permitted set. A container whose bounding set lacks
# NET_BIND_SERVICE cannot exec this interpreter at all (EPERM): see the init container.
RUN python -c "import os, struct; \
exe = open('/opt/irsa-cache/bin/irsa-cache').readline()[2:].strip(); \
assert os.path.realpath(exe).startswith('/opt/irsa-cache/bin/'), exe; \
os.setxattr(os.path.realpath(exe), 'security.capability', struct.pack('<5I', 0x02000001, 1 << 10, 0, 0, 0)); \
print('cap_net_bind_service=ep on', os.path.realpath(exe))"

ENV PATH=/opt/irsa-cache/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 65532:65532
# 80: credentials (169.254.170.23); 9464: /metrics, /healthz, /readyz.
EXPOSE 80 9464
ENTRYPOINT ["/opt/irsa-cache/bin/irsa-cache"]
CMD ["--help"]
