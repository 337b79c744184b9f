# cxr inference: KServe v2 / Triton-compatible gRPC over onnxruntime. No torch in this image.
#
#   docker build -f deploy/docker/inference.Dockerfile -t cxr/inference .
#
# On this default CUDA base the image gets onnxruntime-gpu (the [inference-gpu] extra, built against CUDA 12.x and
# cuDNN 9, which the base provides; without a GPU it still runs on the CPU provider). On a base without CUDA
# (BASE_IMAGE=python:3.11-slim) it gets the CPU build, onnxruntime ([inference]), which is what CPU serving should
# run: never both, they share one package folder. ONNXRUNTIME=cpu|gpu overrides the choice. Any base with
# python3 >= 3.11, or with apt and a python3 >= 3.11 package (as Ubuntu 24.04 has), works.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# `:-` as well: docker-compose passes BASE_IMAGE as an empty build arg when it is unset in the environment
FROM ${BASE_IMAGE:-nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04}
ARG ONNXRUNTIME=auto
LABEL org.opencontainers.image.title="cxr-inference" \
      org.opencontainers.image.description="KServe v2 / Triton-compatible gRPC inference over onnxruntime for chest X-ray classifiers. Research software: not for clinical use." \
      org.opencontainers.image.licenses="Apache-2.0"

USER root
# Python into its own venv (Debian and Ubuntu pythons are "externally managed"), and an unprivileged user.
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

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes, not on every code change.
# sympy (80 MB) comes with onnxruntime for its offline shape-inference tools only; serving never imports it.
# pyproject.toml alone makes an empty project whose install brings the base dependencies and the inference extra;
# the empty project itself is uninstalled again, and the real one is installed below, without dependencies.
COPY pyproject.toml /tmp/build/
RUN extra=inference \
 && if [ "$ONNXRUNTIME" = gpu ] || { [ "$ONNXRUNTIME" = auto ] && [ -d /usr/local/cuda ]; }; then extra=inference-gpu; fi \
 && echo "onnxruntime build: [$extra]" \
 && touch /tmp/build/README.md \
 && pip install "setuptools>=68" wheel \
 && pip install --no-build-isolation "/tmp/build[$extra]" \
 && pip uninstall -y cxr \
 && pip uninstall -y sympy mpmath \
 && rm -rf /tmp/build

# Our code: the ground floor (cxr/) and the services only; training/ (which needs torch) stays out.
COPY pyproject.toml README.md /tmp/src/
COPY cxr /tmp/src/cxr
COPY services /tmp/src/services
COPY deploy/docker/grpc_health_check.py /opt/cxr/grpc_health_check.py
RUN pip install --no-deps --no-build-isolation /tmp/src \
 && rm -rf /tmp/src \
 && mkdir -p /models && chown cxr:cxr /models

USER 10001:10001
ENV CXR_INFERENCE_PORT=8001 CXR_INFERENCE_METRICS_PORT=8002 CXR_INFERENCE_HOST=0.0.0.0
EXPOSE 8001 8000 8002
VOLUME ["/models"]
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
  CMD python /opt/cxr/grpc_health_check.py "127.0.0.1:${CXR_INFERENCE_PORT}"
ENTRYPOINT ["cxr"]
CMD ["serve", "inference", "--repository", "/models"]
