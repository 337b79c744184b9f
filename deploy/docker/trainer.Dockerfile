# cxr trainer: trains the networks with torch and exports them (ONNX, Triton layout) into a model repository.
# Large (torch and its CUDA libraries come from PyPI); only the serving images go to production.
#
#   docker build -f deploy/docker/trainer.Dockerfile -t cxr/trainer .
ARG BASE_IMAGE=python:3.11-slim
# `:-` as well: docker-compose passes BASE_IMAGE as an empty build arg when it is unset in the environment
FROM ${BASE_IMAGE:-python:3.11-slim}
LABEL org.opencontainers.image.title="cxr-trainer" \
      org.opencontainers.image.description="Trains and exports the cxr chest X-ray classifiers (torch to ONNX, Triton layout). Research software: not for clinical use." \
      org.opencontainers.image.licenses="Apache-2.0"

USER root
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv \
 && groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --home-dir /work --create-home --shell /usr/sbin/nologin cxr
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies (torch included) first, in their own layer: several GB, rebuilt only when pyproject.toml changes.
# pyproject.toml alone makes an empty project whose install brings the base dependencies and the [train] extra;
# the empty project itself is uninstalled again, and the real one is installed below, without dependencies.
COPY pyproject.toml /tmp/build/
RUN touch /tmp/build/README.md \
 && pip install "setuptools>=68" wheel \
 && pip install --no-build-isolation "/tmp/build[train]" \
 && pip uninstall -y cxr \
 && rm -rf /tmp/build

COPY pyproject.toml README.md /tmp/src/
COPY cxr /tmp/src/cxr
COPY services /tmp/src/services
COPY training /tmp/src/training
RUN pip install --no-deps --no-build-isolation /tmp/src && rm -rf /tmp/src \
 && mkdir -p /data /models /work/runs && chown cxr:cxr /models /work/runs

USER 10001:10001
WORKDIR /work
ENTRYPOINT ["cxr"]
CMD ["--help"]
