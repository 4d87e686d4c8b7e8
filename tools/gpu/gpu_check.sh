#!/usr/bin/env bash
# The GPU validation run of docs/design.md section 9, for a machine with an NVIDIA H100/H200.
# Run from the repository root (or anywhere: it cds there) after carrying what
# tools/gpu/prepare_gpu_carry.sh prepared here (build/gpucarry.tar.xz, unpacked first, or):
# build/tests/kernels_test,
# build/tools/gpu/gpu_bench and build/gpulibs/. Steps, each bounded by a timeout:
#   1. card, driver, date, commit;
#   2. the CUDA tests (kernels_test --gtest_filter='Cuda*'), which compare the backend with the
#      float64 reference and the CPU backend;
#   3. gpu_bench: validation on ~1M elements, then kernel vs device-to-device copy bandwidth;
#      and, when build/gpulibs/gpu_bench_base exists (prepare_gpu_carry.sh with
#      LOSSD_BASE_COMMIT), the same timings of that baseline build, side by side;
#   4. tools/kernels/torch_cuda_bench.py: torch CUDA forward+backward on the same problems;
#   5. our Gelem/s over torch's, per problem;
#   6. build/server/lossd on this GPU through the Python client (tools/gpu/server_gpu_check.py),
#      CUDA vs CPU, with the default (all-float) element math and with --cuda_float_math=false;
#   7. the serving benchmark (tools/gpu/serving_bench.py; skipped with LOSSD_SERVING=0): CUDA
#      IPC end to end from torch, dynamic batching of 1k-element requests at c1/c16/c64, 64M
#      requests through TCP and shared memory, each against the kernel's own rate;
#   8. with LOSSD_NCU=1 and Nsight Compute's ncu on PATH: one profiled launch of each gpu_bench
#      variant named in LOSSD_NCU_VARIANTS (default "none/wC none/wC/f32") at 64M elements:
#      speed of light, occupancy, launch, memory, compute and warp-state sections ($OUT/ncu.txt
#      when $OUT is set, else printed).
# Everything printed also goes to $OUT/gpu_check.log when $OUT is set. Exit status: 0 when the
# tests and the validation pass (timings are reported, never judged here), 1 otherwise.
# Takes about 1-2 minutes on an H100 (the torch import and CUDA start-up dominate).
set -u -o pipefail
cd "$(dirname "$0")/../.."

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
# prepare_gpu_carry.sh's archive of the binaries and their libraries, when carried instead.
if [[ -f build/gpucarry.tar.xz ]]; then
  tar -xJf build/gpucarry.tar.xz || { echo "FAIL: cannot unpack build/gpucarry.tar.xz"; exit 1; }
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
status=0

echo "== lossd GPU check: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "binaries built from: $(cat build/gpulibs/BUILT_FROM 2>/dev/null || echo unknown)"
echo "checkout here: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
     "$(git status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
nvidia-smi -L || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
  --format=csv,noheader 2>/dev/null || true

# Our binaries link Debian 12's absl/libstdc++; they run either with build/gpulibs on
# LD_LIBRARY_PATH (if this glibc is new enough) or under the bundled glibc loader. Only our
# binaries get this environment: python/torch keep the machine's own libraries.
LIBS="$PWD/build/gpulibs"
RUN=(env "LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
if ! "${RUN[@]}" build/tests/kernels_test --gtest_list_tests >/dev/null 2>"$TMP/probe"; then
  echo "binaries do not start with this glibc ($(head -c 300 "$TMP/probe"));" \
       "using the bundled glibc loader"
  RUN=("$LIBS/glibc/ld-linux-x86-64.so.2" --library-path
       "$LIBS/glibc:$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  if ! "${RUN[@]}" build/tests/kernels_test --gtest_list_tests >/dev/null; then
    echo "FAIL: cannot start build/tests/kernels_test"
    exit 1
  fi
fi

echo
echo "== CUDA tests (kernels_test --gtest_filter='Cuda*')"
timeout 300 "${RUN[@]}" build/tests/kernels_test --gtest_filter='Cuda*' --gtest_color=no 2>&1 |
  tee "$TMP/tests.txt" | grep -v '^\[ RUN      \]'
tests_rc=${PIPESTATUS[0]}
if grep -q '\[  SKIPPED \] Cuda' "$TMP/tests.txt"; then
  echo "FAIL: CUDA tests were skipped: no usable device seen by the test binary"
  tests_rc=1
fi
echo "CUDA tests: $([[ $tests_rc == 0 ]] && echo PASS || echo "FAIL (rc $tests_rc)")"
[[ $tests_rc == 0 ]] || status=1

echo
echo "== gpu_bench"
timeout 240 "${RUN[@]}" build/tools/gpu/gpu_bench 2>&1 | tee "$TMP/bench.txt" | grep -v '^RESULT '
bench_rc=${PIPESTATUS[0]}
[[ $bench_rc == 0 ]] || { echo "gpu_bench: FAIL (rc $bench_rc)"; status=1; }

if [[ -x build/gpulibs/gpu_bench_base ]]; then
  echo
  echo "== baseline gpu_bench (built from $(cat build/gpulibs/BASE_FROM 2>/dev/null)), timed" \
       "after this build's on the same GPU"
  timeout 240 "${RUN[@]}" build/gpulibs/gpu_bench_base --skip-validation >"$TMP/base.txt" 2>&1 ||
    echo "baseline gpu_bench failed (rc $?)"
  # A row of this build is compared with the baseline's row of the same name, else with its
  # name without "/f32" or "/hard" (e.g. label smoothing, which moved to the fused kernel).
  awk '
    $1 == "RESULT" && FILENAME == ARGV[1] { base[$2 " " $3] = $6 }
    $1 == "RESULT" && FILENAME == ARGV[2] { now[$2 " " $3] = $6; order[++n] = $2 " " $3 }
    END {
      printf "%-20s %11s %-16s %11s %11s %7s\n", "variant", "elements", "baseline row",
             "base Gel/s", "now Gel/s", "now/base"
      for (i = 1; i <= n; ++i) {
        k = order[i]; split(k, f, " "); name = f[1]
        alt = name; sub(/\/(f32|hard)$/, "", alt)
        b = (k in base) ? name : (((alt " " f[2]) in base) ? alt : "")
        if (b == "") { printf "%-20s %11s %-16s\n", name, f[2], "-"; continue }
        bv = base[b " " f[2]]
        printf "%-20s %11s %-16s %11.2f %11.2f %7.3f\n", name, f[2], b, bv, now[k], now[k] / bv
      }
    }' "$TMP/base.txt" "$TMP/bench.txt"
fi

echo
echo "== torch CUDA forward+backward"
timeout 300 python3 tools/kernels/torch_cuda_bench.py 2>&1 | tee "$TMP/torch.txt" |
  grep -v '^TORCH '
torch_rc=${PIPESTATUS[0]}
[[ $torch_rc == 0 ]] || echo "torch bench failed (rc $torch_rc); no ratios for what is missing"

echo
echo "== lossd CUDA kernel vs torch CUDA (forward+backward), elements per second"
awk '
  $1 == "RESULT" { ours[$2 " " $3] = $6; order[++n] = $2 " " $3 }
  $1 == "TORCH"  { torch[$2 " " $3] = $4 }
  END {
    printf "%-18s %11s %12s %12s %8s\n", "variant", "elements", "ours Gel/s", "torch Gel/s", "ratio"
    for (i = 1; i <= n; ++i) {
      k = order[i]; split(k, f, " ")
      base = f[1]; sub(/\/f32$/, "", base)  # the float_math rows compare with the same problem
      t = ((base " " f[2]) in torch) ? torch[base " " f[2]] : 0
      if (t > 0) printf "%-18s %11s %12.2f %12.3f %8.1fx\n", f[1], f[2], ours[k], t, ours[k] / t
      else       printf "%-18s %11s %12.2f %12s %8s\n", f[1], f[2], ours[k], "-", "-"
    }
  }' "$TMP/bench.txt" "$TMP/torch.txt"

# One server run: lossd with the given extra flags, the Python client's checks against it.
server_check() {
  local rc=1 port="" pid
  "${RUN[@]}" build/server/lossd --host 127.0.0.1 --port 0 --device auto "$@" \
    2>"$TMP/server.log" &
  pid=$!
  for _ in $(seq 1 100); do
    port=$(sed -n 's/^lossd listening on .*:\([0-9]*\)$/\1/p' "$TMP/server.log" | head -1)
    [[ -n "$port" ]] && break
    sleep 0.2
  done
  grep -m1 "config:" "$TMP/server.log" || true
  if [[ -n "$port" ]]; then
    LOSSD_TARGET="127.0.0.1:$port" PYTHONPATH="$PWD/client/python/src" \
      timeout 180 python3 tools/gpu/server_gpu_check.py
    rc=$?
  else
    echo "server did not start:"; cat "$TMP/server.log"
  fi
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  echo "server exit after SIGTERM: $?"
  return $rc
}

echo
echo "== lossd server on this GPU: CUDA vs CPU through the Python client"
server_check; server_rc=$?
echo
echo "== the same with --cuda_float_math=false"
server_check --cuda_float_math=false; server_f32_rc=$?
[[ $server_f32_rc == 0 ]] || server_rc=1
[[ $server_rc == 0 ]] || status=1

serving_rc=0
if [[ "${LOSSD_SERVING:-1}" == 1 ]]; then
  echo
  echo "== serving benchmark (tools/gpu/serving_bench.py)"
  # Wrappers that start our binaries with this machine's library setup ("${RUN[@]}"), so that
  # lossd-bench's own start of lossd gets it too.
  mkdir -p "$TMP/bin"
  for b in build/server/lossd build/client/loadtest/lossd-bench build/tools/gpu/gpu_bench; do
    printf '#!/bin/bash\nexec %s "$@"\n' "$(printf '%q ' "${RUN[@]}" "$PWD/$b")" \
      >"$TMP/bin/$(basename "$b")"
    chmod +x "$TMP/bin/$(basename "$b")"
  done
  timeout 420 python3 tools/gpu/serving_bench.py --bin-dir "$TMP/bin" ${LOSSD_SERVING_ARGS:-}
  serving_rc=$?
fi

if [[ "${LOSSD_NCU:-0}" == 1 ]] && command -v ncu >/dev/null; then
  echo
  echo "== ncu: one launch per variant at 64M elements"
  ncu_out="${OUT:-$TMP}/ncu.txt"
  for variant in ${LOSSD_NCU_VARIANTS:-none/wC none/wC/f32}; do
    timeout 120 ncu -k regex:BceKernel --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats \
      "${RUN[@]}" build/tools/gpu/gpu_bench --skip-validation --only "$variant" \
      --min-elements 67108864 --max-elements 67108864 >>"$ncu_out" 2>&1 ||
      echo "ncu on $variant failed (rc $?)"
  done
  grep -E '^  [A-Za-z].*BceKernel|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Duration|Registers Per|Achieved Occupancy|Executed Ipc Active' \
    "$ncu_out" || tail -20 "$ncu_out"
fi

echo
echo "== summary: server $([[ $server_rc == 0 ]] && echo PASS || echo FAIL), tests $([[ $tests_rc == 0 ]] && echo PASS || echo FAIL)," \
     "gpu_bench $([[ $bench_rc == 0 ]] && echo PASS || echo FAIL)," \
     "serving bench $([[ $serving_rc == 0 ]] && echo ran || echo "failed (rc $serving_rc)")," \
     "torch bench $([[ $torch_rc == 0 ]] && echo ran || echo failed)"
exit $status
