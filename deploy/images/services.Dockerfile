# syntax=docker/dockerfile:1
# The four services: `tunefleet serve datasets|training|adapters|inference` (deploy/base), with the
# CPU build of torch for the dev overlay's local trainer and PEFT engine.
# From the repository root: make images (docker build -f deploy/images/services.Dockerfile .)
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tunefleet
# Every package is pinned in the lock (deploy/images/lock.py), hence --no-deps; torch's CPU build
# comes from PyTorch's own index.
COPY deploy/images/services.txt /tmp/requirements.txt
RUN /opt/tunefleet/bin/pip install --no-deps \
      --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements.txt
COPY pyproject.toml setup.py README.md /src/
COPY gen/python /src/gen/python
COPY services /src/services
COPY clients /src/clients
RUN /opt/tunefleet/bin/pip install --no-deps --no-build-isolation /src \
    && /opt/tunefleet/bin/pip check

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tunefleet
COPY --from=build /opt/tunefleet /opt/tunefleet
# The root filesystem is read-only in the Deployments: caches go to /tmp (an emptyDir there).
ENV PATH=/opt/tunefleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9090
ENTRYPOINT ["tunefleet"]
CMD ["serve", "--help"]
