# A staging PACS for the compose `pacs` profile: Orthanc and its DICOMweb plugin, from Debian's packages, with a
# configuration that knows the cxr DICOM node and routes every new CR/DX instance to it. Not for production.
#
#   docker build -f deploy/docker/orthanc.Dockerfile -t cxr/orthanc .
# Any Debian bookworm base works (python:3.11-slim is one; so is the local stand-in of ../shared/tools/docker-local.sh).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE:-debian:bookworm-slim}
LABEL org.opencontainers.image.title="cxr-orthanc" \
      org.opencontainers.image.description="Staging PACS (Orthanc + DICOMweb) for the cxr DICOM node. Research software: not for clinical use." \
      org.opencontainers.image.licenses="GPL-3.0-or-later"

USER root
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends orthanc orthanc-dicomweb \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/orthanc/db && chown -R orthanc:orthanc /var/lib/orthanc
COPY deploy/orthanc/orthanc.json deploy/orthanc/route-to-cxr.lua /etc/orthanc-cxr/

USER orthanc
VOLUME ["/var/lib/orthanc/db"]
EXPOSE 8042 4242
# no curl in the image: an open HTTP port is the health signal
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8042"]
ENTRYPOINT ["/usr/sbin/Orthanc"]
CMD ["/etc/orthanc-cxr/orthanc.json"]
