# syntax=docker/dockerfile:1
# The trainer that TrainingService's Kubernetes launcher runs as a Job on GPU nodes
# (`python -m tunefleet.trainer --spec /etc/tunefleet/spec.json`, under torchrun for several GPUs):
# tunefleet[train] with PyPI's CUDA build of torch and bitsandbytes. The CUDA libraries come as
# wheels; the node's NVIDIA driver is all the host provides.
# From the repository root: make images (docker build -f deploy/images/trainer.Dockerfile .)
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tunefleet
# Every package is pinned in the lock (deploy/images/lock.py), hence --no-deps.
COPY deploy/images/trainer.txt /tmp/requirements.txt
RUN /opt/tunefleet/bin/pip install --no-deps -r /tmp/requirements.txt
COPY pyproject.toml setup.py README.md /src/
COPY gen/python /src/gen/python
COPY services /src/services
COPY clients /src/clients
RUN /opt/tunefleet/bin/pip install --no-deps --no-build-isolation /src \
    && /opt/tunefleet/bin/pip check

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /scratch --shell /usr/sbin/nologin tunefleet
COPY --from=build /opt/tunefleet /opt/tunefleet
# The Job mounts the spec at /etc/tunefleet, scratch space at /scratch (HOME, HF_HOME and the
# output) and /tmp; the root filesystem is read-only (tunefleet.training.manifests).
ENV PATH=/opt/tunefleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /scratch
CMD ["python", "-m", "tunefleet.trainer", "--help"]
