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
  libgtest-dev libgmock-dev libbenchmark-dev libhwy-dev prometheus-cpp-dev \
  python3 python3-venv python3-dev openssl

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps venv build test test-cpp test-py demo clean stubs asan bench-kernels bench-torch golden-venv

# Installs the Debian packages that are missing (no-op when all are present).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Python virtual environment with the test requirements and the client package.
$(VENV)/.stamp: tests/requirements.txt client/python/pyproject.toml $(wildcard client/python/src/lossd/*.py)
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r tests/requirements.txt
	$(VENV)/bin/python -m pip install -q ./client/python
	@touch $@

venv: deps $(VENV)/.stamp

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

test-cpp: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

test-py: build venv
	LOSSD_BINARY=$(CURDIR)/$(BUILD)/server/lossd $(VENV)/bin/python -m pytest -q tests

# All tests: C++ (ctest) then Python (pytest). Fails on any failure.
test: test-cpp test-py

# Starts lossd on 127.0.0.1 (CPU), runs the Python client on the example, stops the server.
demo: build venv
	LOSSD_BINARY=$(CURDIR)/$(BUILD)/server/lossd PYTHON=$(VENV)/bin/python scripts/demo.sh

# Regenerates the committed Python stubs from proto/ (needs grpcio-tools in the venv).
stubs: venv
	$(VENV)/bin/python client/python/generate_stubs.py

# CPU kernel benchmark: 10M float32 elements, 1 and 2 threads, each variant beside a
# 2-read-2-write streaming loop run alternately with it (ratios, docs/perf.md).
bench-kernels: build
	$(BUILD)/kernels/cpu_bench --reps=9

# torch CPU forward + backward against the same kernels (ratios). torch lives only in the golden
# virtual environment (several GB), never in the test venv.
GOLDEN_VENV ?= .venv-golden
golden-venv: deps
	@[ -x $(GOLDEN_VENV)/bin/python ] || $(PYTHON) -m venv $(GOLDEN_VENV)
	$(GOLDEN_VENV)/bin/python -m pip install -q -r tests/golden/requirements-golden.txt

bench-torch: build golden-venv
	$(GOLDEN_VENV)/bin/python kernels/bench/torch_cpu_bench.py --cpu-bench $(BUILD)/kernels/cpu_bench

clean:
	rm -rf $(BUILD)

# The server tests under AddressSanitizer + LeakSanitizer (CPU build; a few minutes).
asan: deps
	cmake -S . -B build-asan -DLOSSD_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" \
	  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address"
	cmake --build build-asan -j $(JOBS) --target server_test kernels_test
	ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp \
	  build-asan/tests/server_test
	ASAN_OPTIONS=detect_leaks=1 build-asan/tests/kernels_test
