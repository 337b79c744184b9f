# cxr gateway: the cxr.v1 gRPC API for PACS integrations. Decodes images and forwards them; no onnxruntime, no torch.
#
#   docker build -f deploy/docker/gateway.Dockerfile -t cxr/gateway .
ARG BASE_IMAGE=python:3.11-slim
# `:-` as well: docker-compose passes BASE_IMAGE as an empty build arg when it is unset in the environment
FROM ${BASE_IMAGE:-python:3.11-slim}
LABEL org.opencontainers.image.title="cxr-gateway" \
      org.opencontainers.image.description="cxr.v1 gRPC gateway for chest X-ray classification (DICOM/PNG/JPEG in, calibrated probabilities out). Research software: not for clinical use." \
      org.opencontainers.image.licenses="Apache-2.0"

USER root
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv \
 && groupadd --system --gid 10001 cxr \
 && useradd --system --uid 10001 --gid cxr --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin cxr
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, in their own layer (rebuilt only when pyproject.toml changes).
# pyproject.toml alone makes an empty project whose install brings the base dependencies and the [gateway] extra;
# the empty project itself is uninstalled again, and the real one is installed below, without dependencies.
COPY pyproject.toml /tmp/build/
RUN touch /tmp/build/README.md \
 && pip install "setuptools>=68" wheel \
 && pip install --no-build-isolation "/tmp/build[gateway]" \
 && pip uninstall -y cxr \
 && rm -rf /tmp/build

COPY pyproject.toml README.md /tmp/src/
COPY cxr /tmp/src/cxr
COPY services /tmp/src/services
COPY deploy/docker/grpc_health_check.py /opt/cxr/grpc_health_check.py
RUN pip install --no-deps --no-build-isolation /tmp/src && rm -rf /tmp/src

USER 10001:10001
ENV CXR_GATEWAY_PORT=50051 CXR_GATEWAY_METRICS_PORT=9090
EXPOSE 50051 8080 9090
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
  CMD python /opt/cxr/grpc_health_check.py "127.0.0.1:${CXR_GATEWAY_PORT}"
ENTRYPOINT ["cxr"]
CMD ["serve", "gateway", "--inference", "inference:8001"]
