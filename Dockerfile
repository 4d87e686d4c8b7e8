# lossd server image, CPU only (the CUDA image is Dockerfile.cuda). docs/deployment.md.
#   docker build -t lossd:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 lossd:0.1.0
# Runs as UID/GID 10001; gRPC on 50051, Prometheus /metrics on 9090; HEALTHCHECK asks the gRPC
# health service (grpc.health.v1) with the server binary itself: lossd --health_check=HOST:PORT.
#
# The load tester is a second target of this file (the default target stays the server):
#   docker build --target loadtest -t lossd-loadtest:0.1.0 .
# lossd-bench (client/loadtest) with the baseline server lossd_bench_server (tools/bench) and
# lossd; deploy/compose.yaml runs it under the profile `loadtest`.
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
# No GoogleTest: with LOSSD_BUILD_TESTS=OFF CMake does not look for it.
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
      libhwy-dev=1.0.3-3+deb12u1 \
      libmpfr-dev=4.2.0-1 \
      prometheus-cpp-dev=1.0.1-1 \
      libcivetweb-dev=1.15+dfsg-4 \
      nlohmann-json3-dev=3.11.2-2 \
      libnghttp2-dev=1.52.0-1+deb12u3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the lossd target needs (LOSSD_BUILD_TESTS=OFF): tests/ is never copied, client/ and
# tools/ only by the load tester's stage below.
COPY CMakeLists.txt ./
COPY proto proto
COPY kernels kernels
COPY server server
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLOSSD_BUILD_TESTS=OFF -DLOSSD_CUDA=OFF \
 && cmake --build build -j"$(nproc)" --target lossd \
 && strip build/server/lossd

# The load tester, built in the same tree (lossd is not rebuilt): the loadtest target only.
FROM build AS build-loadtest
COPY client/bench client/bench
COPY client/loadtest client/loadtest
COPY tools/bench tools/bench
RUN cmake -S . -B build -DLOSSD_BUILD_TOOLS=ON \
 && cmake --build build -j"$(nproc)" --target lossd_bench lossd_bench_server \
 && strip build/client/loadtest/lossd-bench build/tools/bench/lossd_bench_server

FROM ${DEBIAN_IMAGE} AS runtime-base
# The shared libraries of lossd and the load tester (their own dependencies follow).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libgrpc++1.51=1.51.1-3+b1 \
      libprotobuf32=3.21.12-3+deb12u1 \
      libabsl20220623=20220623.1-1+deb12u2 \
      libhwy1=1.0.3-3+deb12u1 \
      libmpfr6=4.2.0-1 \
      libprometheus-cpp-core1.0=1.0.1-1 \
      libprometheus-cpp-pull1.0=1.0.1-1 \
      libcivetweb1=1.15+dfsg-4 \
      libnghttp2-14=1.52.0-1+deb12u3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 lossd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin lossd

# lossd-bench finds lossd and lossd_bench_server in its build tree's layout (../../server,
# ../../tools/bench), kept under /opt/lossd: without --target it starts both on loopback and
# measures lossd against the echo and raw baselines in the same run; with --target=HOST:PORT
# it loads that server (deploy/compose.yaml: the lossd service).
FROM runtime-base AS loadtest
COPY --from=build-loadtest /src/build/client/loadtest/lossd-bench /opt/lossd/client/loadtest/
COPY --from=build-loadtest /src/build/tools/bench/lossd_bench_server /opt/lossd/tools/bench/
COPY --from=build-loadtest /src/build/server/lossd /opt/lossd/server/
RUN ln -s /opt/lossd/client/loadtest/lossd-bench /usr/local/bin/lossd-bench
USER 10001:10001
# A client: no port, no health service to ask.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/lossd-bench"]
CMD ["--concurrency=1:4:x2", "--duration=3s", "--verify", "--progress=false"]

# The server image: the default target, so it stays the last stage.
FROM runtime-base
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
