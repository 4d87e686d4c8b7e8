# lossd server image (CPU; the CUDA backend is compiled in when built with nvcc available).
# Build:  docker build -t lossd .
# Run:    docker run -p 50051:50051 lossd
FROM debian:12-slim AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev \
      protobuf-compiler libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev libhwy-dev \
      prometheus-cpp-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY proto proto
COPY kernels kernels
COPY server server
COPY tests tests
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DLOSSD_CUDA=OFF \
 && cmake --build build -j"$(nproc)" --target lossd

FROM debian:12-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libgrpc++1.51 libprotobuf32 libabsl20220623 libhwy1 libprometheus-cpp-core1.0 \
      libprometheus-cpp-pull1.0 ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 lossd
COPY --from=build /src/build/server/lossd /usr/local/bin/lossd
USER 10001
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/lossd"]
CMD ["--host=0.0.0.0", "--port=50051", "--device=auto"]
