# syntax=docker/dockerfile:1
# InferenceService with the vLLM engine on a GPU node (deploy/overlays/gpu): tunefleet[server] with
# the official vllm package, which brings its CUDA build of torch. Python 3.12, as vLLM's own
# images use.
# From the repository root: make images (docker build -f deploy/images/vllm.Dockerfile .)
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tunefleet
# Every package is pinned in the lock (deploy/images/lock.py), hence --no-deps.
COPY deploy/images/vllm.txt /tmp/requirements.txt
RUN /opt/tunefleet/bin/pip install --no-deps -r /tmp/requirements.txt
COPY pyproject.toml setup.py README.md /src/
COPY gen/python /src/gen/python
COPY services /src/services
COPY clients /src/clients
RUN /opt/tunefleet/bin/pip install --no-deps --no-build-isolation /src \
    && /opt/tunefleet/bin/pip check

FROM ${PYTHON_IMAGE}
# Triton (under vLLM) compiles its kernel launchers with a C compiler when a model first loads.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev=2.36-9+deb12u14 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tunefleet
COPY --from=build /opt/tunefleet /opt/tunefleet
# The root filesystem is read-only in the Deployment: caches (vLLM, Triton, torch.compile) go to
# /tmp, an emptyDir.
ENV PATH=/opt/tunefleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    VLLM_CACHE_ROOT=/tmp/vllm
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9090
ENTRYPOINT ["tunefleet"]
CMD ["serve", "--help"]
