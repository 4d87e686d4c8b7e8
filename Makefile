# lossd entry points. Each target installs what it needs on a Debian 12 machine (as root, or
# with sudo), so `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := build

BUILD ?= build
VENV ?= .venv
PYTHON ?= python3
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

APT_PACKAGES := build-essential cmake pkg-config git \
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev \
  libgtest-dev libgmock-dev libbenchmark-dev libhwy-dev prometheus-cpp-dev libmpfr-dev \
  libcivetweb-dev nlohmann-json3-dev libnghttp2-dev \
  python3 python3-venv python3-dev openssl
# Packages whose daemon the tests run as a program of their own (tests/e2e/test_dashboard_e2e.py
# starts /usr/bin/prometheus on a free loopback port): installed without their Recommends and
# with their services neither started nor enabled (tests/deploy/install_service_packages.sh).
SERVICE_APT_PACKAGES := prometheus

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps venv torch-venv build test test-cpp test-py demo clean stubs asan bench-kernels bench-torch golden-venv fuzz fuzz-ci

# Installs the Debian packages that are missing (no-op when all are present).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@tests/deploy/install_service_packages.sh $(SERVICE_APT_PACKAGES)

# Python virtual environment with the test requirements and the client package.
$(VENV)/.stamp: tests/requirements.txt client/python/pyproject.toml $(wildcard client/python/src/lossd/*.py)
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r tests/requirements.txt
	$(VENV)/bin/python -m pip install -q ./client/python
	@touch $@

venv: deps $(VENV)/.stamp

# The torch tests (tests/e2e/test_torch.py: lossd.torch eager and under torch.compile) run in a
# virtual environment of their own: the test requirements plus the torch pinned for the golden
# data (tests/golden/requirements-golden.txt, one pin for both), without torchvision and
# paddlepaddle. torch's Linux wheel needs its CUDA library wheels even on a CPU-only machine
# (about 5.5 GB installed; about 2.5 minutes on a fresh venv here), so the main test venv
# stays without torch.
TORCH_VENV ?= .venv-torch
TORCH_PIN := $(shell grep -E '^torch==' tests/golden/requirements-golden.txt)
$(TORCH_VENV)/.stamp: tests/requirements.txt tests/golden/requirements-golden.txt \
    client/python/pyproject.toml $(wildcard client/python/src/lossd/*.py)
	@[ -n "$(TORCH_PIN)" ] || { echo "no torch== pin in tests/golden/requirements-golden.txt"; exit 1; }
	@[ -x $(TORCH_VENV)/bin/python ] || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install -q -r tests/requirements.txt "$(TORCH_PIN)"
	$(TORCH_VENV)/bin/python -m pip install -q ./client/python
	@touch $@

torch-venv: deps $(TORCH_VENV)/.stamp

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

test-cpp: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

test-py: build venv torch-venv
	LOSSD_BINARY=$(CURDIR)/$(BUILD)/server/lossd $(VENV)/bin/python -m pytest -q tests \
	  --ignore=tests/e2e/test_torch.py
	LOSSD_BINARY=$(CURDIR)/$(BUILD)/server/lossd $(TORCH_VENV)/bin/python -m pytest -q \
	  tests/e2e/test_torch.py

# All tests: C++ (ctest) then Python (pytest). Fails on any failure.
test: test-cpp test-py

# Opt-in large tests (skipped by test-py): 10^8 elements evaluated by evaluate_dataset over
# three lossd replicas on loopback with one SIGKILLed mid-run, bitwise against one server
# (tests/e2e/test_sharded_large_e2e.py). About 20 s and 0.6 GB of client memory on 2 cores.
.PHONY: test-large
test-large: build venv
	LOSSD_LARGE_TESTS=1 LOSSD_BINARY=$(CURDIR)/$(BUILD)/server/lossd $(VENV)/bin/python -m pytest \
	  -q -s tests/e2e/test_sharded_large_e2e.py

# Starts lossd on 127.0.0.1 (CPU), runs the Python client on the example, stops the server.
demo: build venv
	LOSSD_BINARY=$(CURDIR)/$(BUILD)/server/lossd PYTHON=$(VENV)/bin/python scripts/demo.sh

# Regenerates the committed Python stubs from proto/ (needs grpcio-tools in the venv).
stubs: venv
	$(VENV)/bin/python client/python/generate_stubs.py

# CPU kernel benchmark: 10M float32 elements, 1 and 2 threads, each variant beside a
# 2-read-2-write streaming loop run alternately with it (ratios, docs/perf.md).
bench-kernels: build
	$(BUILD)/tools/kernels/cpu_bench --reps=9

# torch CPU forward + backward against the same kernels (ratios). torch lives in the golden
# virtual environment (several GB) and in the torch test venv ($(TORCH_VENV)), never in $(VENV).
GOLDEN_VENV ?= .venv-golden
golden-venv: deps
	@[ -x $(GOLDEN_VENV)/bin/python ] || $(PYTHON) -m venv $(GOLDEN_VENV)
	$(GOLDEN_VENV)/bin/python -m pip install -q -r tests/golden/requirements-golden.txt

bench-torch: build golden-venv
	$(GOLDEN_VENV)/bin/python tools/kernels/torch_cpu_bench.py --cpu-bench $(BUILD)/tools/kernels/cpu_bench

# Service path (docs/perf.md): lossd through its Python client over TCP (and over a Unix socket
# and through shared memory where this lossd and client support them) against a raw gRPC method,
# a protobuf echo, the CPU kernel alone and torch CPU (when importable), interleaved, at 1k, 1M
# and 16M elements; prints rates and ratios. About 10 minutes on 2 cores. More options in
# BENCH_ARGS, e.g. BENCH_ARGS="--reps 5 --lossd-binary /tmp/old/lossd" (list: BENCH_ARGS=--help).
BENCH_ARGS ?=
.PHONY: bench-service
bench-service: build venv
	PYTHONPATH=$(CURDIR)/tools/bench $(VENV)/bin/python -m lossd_bench --build-dir $(BUILD) \
	  $(BENCH_ARGS)

# evaluate_dataset over 1, 2 and 3 local lossd replicas, alternated: elements/s, the client's
# CPU time per element and the final merge's share of the wall time (docs/perf.md, "Sharded
# evaluation across replicas"). About a minute; SHARDING_ARGS, e.g. SHARDING_ARGS="--rounds 5
# --elements 134217728" (list: SHARDING_ARGS=--help).
SHARDING_ARGS ?=
.PHONY: bench-sharding
bench-sharding: build venv
	$(VENV)/bin/python tools/bench/sharding_bench.py --lossd-binary $(BUILD)/server/lossd \
	  $(SHARDING_ARGS)

# lossd against a KServe Python model server serving torch's BCE over the same inference
# protocol (gRPC), both loaded by lossd-bench --protocol=oip at 1Ki and 1Mi elements, c1 and c16
# (docs/perf.md, "lossd against a KServe model server"). KServe and torch live in a venv of
# their own (kserve and tritonclient register the same protobuf package); KSERVE_ARGS, e.g.
# KSERVE_ARGS="--rounds 3 --seconds 5".
KSERVE_VENV ?= .venv-kserve
KSERVE_ARGS ?=
$(KSERVE_VENV)/.stamp: tools/bench/kserve/requirements.txt tests/golden/requirements-golden.txt
	@[ -x $(KSERVE_VENV)/bin/python ] || $(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(KSERVE_VENV)/bin/python -m pip install -q -r tools/bench/kserve/requirements.txt "$(TORCH_PIN)"
	@touch $@

.PHONY: bench-kserve
bench-kserve: build venv $(KSERVE_VENV)/.stamp
	$(VENV)/bin/python tools/bench/kserve/compare.py --build-dir $(BUILD) \
	  --kserve-python $(KSERVE_VENV)/bin/python $(KSERVE_ARGS)

# A short lossd-bench sweep (lossd, echo and raw started here on loopback, closed loop at 1 to
# 8 callers, 1000 elements) written as $(BENCH_REPORT_DIR)/report.json and drawn by
# tools/bench/plot_report.py as report.html (plots inline) and svg/*.svg: latency and calls/s
# against load, the latency histogram and the per-second time series of the last point. About
# 30 s. Other loads with BENCH_REPORT_ARGS, e.g. BENCH_REPORT_ARGS="--rps=500:4000:x2
# --elements=1Mi --baselines=none".
BENCH_REPORT_DIR ?= $(BUILD)/bench-report
BENCH_REPORT_ARGS ?= --concurrency=1:8:x2 --elements=1k --warmup=0.5s --duration=2s --rounds=1
.PHONY: bench-report
bench-report: build venv
	mkdir -p $(BENCH_REPORT_DIR)
	$(BUILD)/client/loadtest/lossd-bench $(BENCH_REPORT_ARGS) --progress=false \
	  --json=$(BENCH_REPORT_DIR)/report.json
	$(VENV)/bin/python tools/bench/plot_report.py $(BENCH_REPORT_DIR)/report.json \
	  --out $(BENCH_REPORT_DIR)/report.html --svg-dir $(BENCH_REPORT_DIR)/svg

clean:
	rm -rf $(BUILD)

# The server and kernel tests under AddressSanitizer + LeakSanitizer + UndefinedBehaviorSanitizer
# (CPU build; any UB report fails the run). CI runs it (.ci/run). Line tables only (-g1): the
# reports keep file and line, and the build is about a quarter faster than with -g.
ASAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
asan: deps
	cmake -S . -B build-asan -DLOSSD_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_CXX_FLAGS="$(ASAN_FLAGS)" -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" \
	  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined"
	cmake --build build-asan -j $(JOBS) --target server_test kernels_test
	ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 build-asan/tests/server_test
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  build-asan/tests/kernels_test

# The structure-aware libFuzzer target (request validation + CPU compute) under ASan + UBSan,
# tests/fuzz/README.md. Builds with clang in $(FUZZ_BUILD) (CPU only, only the fuzzer), fuzzes
# a copy of tests/fuzz/corpus for FUZZ_SECONDS, prints the number of executions and fails on a
# crash, leak, timeout or out-of-memory (the input is left in $(FUZZ_BUILD)/, the log in
# $(FUZZ_BUILD)/fuzz.log).
FUZZ_SECONDS ?= 600
FUZZ_BUILD ?= build-fuzz
FUZZ_APT_PACKAGES := clang libclang-rt-14-dev
FUZZ_CXX_FLAGS := -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined \
  -fno-omit-frame-pointer -g

fuzz: deps
	@missing=$$(for p in $(FUZZ_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	CC=clang CXX=clang++ cmake -S . -B $(FUZZ_BUILD) -DLOSSD_FUZZ=ON -DLOSSD_CUDA=OFF \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$(FUZZ_CXX_FLAGS)" \
	  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined"
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target evaluate_fuzzer
	rm -rf $(FUZZ_BUILD)/corpus && mkdir -p $(FUZZ_BUILD)/corpus
	cp tests/fuzz/corpus/*.pb $(FUZZ_BUILD)/corpus/
	@log=$(FUZZ_BUILD)/fuzz.log; echo "fuzzing for $(FUZZ_SECONDS) s (log: $$log)"; \
	$(FUZZ_BUILD)/tests/fuzz/evaluate_fuzzer $(FUZZ_BUILD)/corpus \
	  -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -malloc_limit_mb=2048 -timeout=20 \
	  -max_len=300000 -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/ >$$log 2>&1; \
	rc=$$?; grep -E '^#[0-9]+' $$log | tail -n 1; \
	grep -E '^stat::number_of_executed_units' $$log || true; \
	if [ $$rc -ne 0 ]; then \
	  grep -vE '^#[0-9]+' $$log | tail -n 60; \
	  echo "fuzz: FAILED (exit $$rc); the input is $(FUZZ_BUILD)/crash-*, leak-*, timeout-* or oom-*"; \
	  exit 1; \
	fi; \
	echo "fuzz: no crash in $(FUZZ_SECONDS) s"

# What CI runs: one minute of `make fuzz`.
fuzz-ci:
	$(MAKE) fuzz FUZZ_SECONDS=60

# The kernels and kernel tests cross-compiled for aarch64 (build-arm) and run under qemu-aarch64,
# once per Highway target (NEON, SVE, SVE_256, SVE2, SVE2_128) at 128 to 512-bit vectors; fails
# when a run fails or did not run on the target it asked for. Installs the cross compiler, qemu
# and the arm64 libraries when missing. Not in CI (about 25 CPU minutes on 2 cores; docs/kernels.md
# section "ARM"). ARM_RUNS="neon sve2-512" picks runs; LOSSD_TEST_SCALE (default 0.25) the draws.
.PHONY: test-arm
test-arm:
	JOBS=$(JOBS) tools/arm/test_arm.sh

# Container images and deployment manifests (docs/deployment.md). Not part of `make test`.
.PHONY: image image-check lint-deploy
IMAGE ?= localhost/lossd:0.1.0
LINT_VENV ?= .venv-lint

# Builds the CPU image (Dockerfile) with podman as $(IMAGE): installs podman, mmdebstrap and runc
# when missing and creates the base image localhost/debian:12-slim once.
image:
	deploy/docker/podman_build.sh $(IMAGE) Dockerfile

# Builds the CPU image, runs it on 127.0.0.1 with free ports, smoke-tests it with the Python
# client (tests/deploy/image_check.sh), then removes the container and the image. Minutes.
image-check: venv
	PYTHON=$(VENV)/bin/python tests/deploy/image_check.sh

# hadolint, checkov, kubernetes-validate (minimum and current Kubernetes), check-jsonschema
# (compose) and a CMake configure of exactly the Docker build context. Installs its pinned tools
# into $(LINT_VENV) (tests/deploy/requirements-lint.txt). CI runs it.
lint-deploy: deps
	LINT_VENV=$(LINT_VENV) PYTHON=$(PYTHON) tests/deploy/lint_deploy.sh
