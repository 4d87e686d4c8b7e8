# lossd server image, CPU only (the CUDA image is Dockerfile.cuda). docs/deployment.md.
#   docker build -t lossd:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 lossd:0.1.0
# Runs as UID/GID 10001; gRPC on 50051, Prometheus /metrics on 9090; HEALTHCHECK asks the gRPC
# health service (grpc.health.v1) with the server binary itself: lossd --health_check=HOST:PORT.
#
# Every apt package is pinned to its Debian 12 (bookworm, bookworm-updates, bookworm-security)
# version. When a point release or a security update supersedes one, apt-get fails with
# "Version ... was not found": look the new one up (`apt-get update && apt-cache policy NAME`)
# and update the pin here.
# The base is an argument so that podman builds here can use a local stand-in
# (deploy/docker/podman_build.sh); its default is a fixed Debian release.
# checkov:skip=CKV_DOCKER_7: FROM ${DEBIAN_IMAGE} defaults to debian:12-slim, a fixed version tag
ARG DEBIAN_IMAGE=debian:12-slim

FROM ${DEBIAN_IMAGE} AS build
# libgtest-dev/libgmock-dev only because the top-level CMakeLists.txt calls
# find_package(GTest REQUIRED) even with LOSSD_BUILD_TESTS=OFF; no test is built.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential=12.9 \
      cmake=3.25.1-1 \
      pkg-config=1.8.1-1 \
      libgrpc++-dev=1.51.1-3+b1 \
      protobuf-compiler-grpc=1.51.1-3+b1 \
      libprotobuf-dev=3.21.12-3+deb12u1 \
      protobuf-compiler=3.21.12-3+deb12u1 \
      libabsl-dev=20220623.1-1+deb12u2 \
      libgtest-dev=1.12.1-0.2 \
      libgmock-dev=1.12.1-0.2 \
      libhwy-dev=1.0.3-3+deb12u1 \
      prometheus-cpp-dev=1.0.1-1 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the lossd target needs; tests/ and client/ are not copied (LOSSD_BUILD_TESTS=OFF).
COPY CMakeLists.txt ./
COPY proto proto
COPY kernels kernels
COPY server server
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLOSSD_BUILD_TESTS=OFF -DLOSSD_CUDA=OFF \
 && cmake --build build -j"$(nproc)" --target lossd \
 && strip build/server/lossd

FROM ${DEBIAN_IMAGE}
# The shared libraries of lossd (their own dependencies follow).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libgrpc++1.51=1.51.1-3+b1 \
      libprotobuf32=3.21.12-3+deb12u1 \
      libabsl20220623=20220623.1-1+deb12u2 \
      libhwy1=1.0.3-3+deb12u1 \
      libprometheus-cpp-core1.0=1.0.1-1 \
      libprometheus-cpp-pull1.0=1.0.1-1 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 lossd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin lossd
COPY --from=build /src/build/server/lossd /usr/local/bin/lossd
# Numeric, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 10001:10001
EXPOSE 50051 9090
# One plaintext grpc.health.v1 Check: exit 0 when SERVING within 2 s, else 1 (also while
# draining). Started with another --port: set LOSSD_HEALTH_ADDR=127.0.0.1:PORT (docker run -e).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/bin/sh", "-c", "exec /usr/local/bin/lossd --health_check=\"${LOSSD_HEALTH_ADDR:-127.0.0.1:50051}\""]
ENTRYPOINT ["/usr/local/bin/lossd"]
CMD ["--host=0.0.0.0", "--port=50051", "--device=cpu", "--metrics_host=0.0.0.0", "--metrics_port=9090"]
