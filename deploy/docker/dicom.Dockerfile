# cxr DICOM node: C-STORE SCP that classifies through the gateway and sends SR + Secondary Capture back to the PACS.
# No onnxruntime, no torch: it only speaks DICOM and gRPC.
#
#   docker build -f deploy/docker/dicom.Dockerfile -t cxr/dicom .
ARG BASE_IMAGE=python:3.11-slim
# `:-` as well: docker-compose passes BASE_IMAGE as an empty build arg when it is unset in the environment
FROM ${BASE_IMAGE:-python:3.11-slim}
LABEL org.opencontainers.image.title="cxr-dicom" \
      org.opencontainers.image.description="cxr DICOM node: receives chest radiographs by C-STORE, classifies them through the cxr gateway, returns a TID 1500 SR and a Secondary Capture to the PACS. Research software: not for clinical use." \
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
# pyproject.toml alone makes an empty project whose install brings the base dependencies and the [dicom] extra;
# the empty project itself is uninstalled again, and the real one is installed below, without dependencies.
COPY pyproject.toml /tmp/build/
RUN touch /tmp/build/README.md \
 && pip install "setuptools>=68" wheel \
 && pip install --no-build-isolation "/tmp/build[dicom]" \
 && pip uninstall -y cxr \
 && rm -rf /tmp/build

COPY pyproject.toml README.md /tmp/src/
COPY cxr /tmp/src/cxr
COPY services /tmp/src/services
RUN pip install --no-deps --no-build-isolation /tmp/src && rm -rf /tmp/src \
 && mkdir -p /spool && chown cxr:cxr /spool

USER 10001:10001
# the spool must outlive the container: what the node acknowledged is there until its results are stored
VOLUME ["/spool"]
ENV CXR_DICOM_PORT=11112 CXR_DICOM_METRICS_PORT=9091 CXR_DICOM_SPOOL=/spool
EXPOSE 11112 9091
HEALTHCHECK --interval=5s --timeout=5s --start-period=20s --retries=3 \
  CMD python -m services.dicom.echo "127.0.0.1:${CXR_DICOM_PORT}"
ENTRYPOINT ["cxr"]
CMD ["serve", "dicom", "--gateway", "gateway:50051"]
