# hps server image. GPU (default): CUDA runtime base and CuPy from the cuda12 extra.
# CPU only:  docker build --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg HPS_EXTRAS= -t hps:cpu .
# CUDA 13:   docker build --build-arg BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04 --build-arg HPS_EXTRAS=cuda13 .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG BUILD_IMAGE=ubuntu:24.04

# The virtual environment is built here so that pip, python3-venv and build leftovers stay out of the final image;
# both images are Ubuntu 24.04, so the venv's interpreter path (/usr/bin/python3) is the same in both.
FROM ${BUILD_IMAGE} AS build
ARG HPS_EXTRAS=cuda12
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions come with the pinned Ubuntu release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, read from pyproject alone, in a layer of their own: a change to the sources reuses it
# instead of installing CuPy and the rest again.
COPY pyproject.toml ./
RUN python3 -m venv /opt/hps \
    && python3 -c 'import sys, tomllib; \
project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = [e for e in sys.argv[1].split(",") if e]; \
print(*project["dependencies"], *(d for e in extras for d in project["optional-dependencies"][e]), sep="\n")' \
        "${HPS_EXTRAS}" > /tmp/requirements.txt \
    && /opt/hps/bin/pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY README.md LICENSE ./
COPY hps_server ./hps_server
COPY hps_client ./hps_client
COPY hps_wire ./hps_wire
COPY hps_bench ./hps_bench
RUN /opt/hps/bin/pip install --no-cache-dir --no-deps .

FROM ${BASE_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 hps \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home hps \
    && mkdir -p /data /etc/hps \
    && chown hps:hps /data
COPY --from=build /opt/hps /opt/hps
# CuPy's compiled-kernel cache goes to /tmp: the root filesystem may be read-only, and so may /data.
ENV PATH=/opt/hps/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CUPY_CACHE_DIR=/tmp/cupy
USER 10001:10001
WORKDIR /data
# Table files, RocksDB and anything else the server keeps.
VOLUME ["/data"]
# gRPC, Prometheus /metrics.
EXPOSE 8500 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "hps_server.healthcheck", "127.0.0.1:8500"]
# Mount the config at /etc/hps/hps.yaml (the Helm chart's ConfigMap does). hps binds loopback unless told
# otherwise; in a container it serves every interface.
ENTRYPOINT ["hps"]
CMD ["serve", "--config", "/etc/hps/hps.yaml", "--address", "0.0.0.0:8500"]
