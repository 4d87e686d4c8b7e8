#!/usr/bin/env bash
# `make test-arm`: cross-compiles the kernels and kernels_test for aarch64 and runs the kernel
# test suite under qemu-aarch64 once per Highway target of the arm64 build, each on an emulated
# CPU that has the target (docs/kernels.md section "ARM").
#
# Per run: tools/arm/hwy_only_target.cc is preloaded and leaves Highway only the requested
# target; the run passes when kernels_test passes AND three reports name that target:
#   - cpu_bench (a short run): the target lossd's kernels dispatch to (CpuSimdTarget's source),
#   - kernels_test itself at exit: the target Highway's dispatch chose in that process,
#   - kernels_test's EveryTarget/AccuracyTest instances: exactly one, named after the target,
# so a silent fallback to NEON cannot pass as SVE.
#
# Environment:
#   ARM_BUILD   build directory (default build-arm)
#   ARM_RUNS    the runs to do, by label (default: all of RUNS below), e.g. "neon sve2-512"
#   JOBS        parallel compile jobs (default: nproc)
#   LOSSD_TEST_SCALE  passed to the tests (default 0.25 here; tests/kernels/test_util.h)
set -euo pipefail
cd "$(dirname "$0")/../.."

BUILD=${ARM_BUILD:-build-arm}
JOBS=${JOBS:-$(nproc)}
export LOSSD_TEST_SCALE=${LOSSD_TEST_SCALE:-0.25}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

# label  qemu -cpu  Highway target. a64fx: SVE without SVE2; max: SVE2 (and SVE). qemu-user
# runs SVE at the largest enabled length up to 512 bits (sveN=on caps it at N).
RUNS=(
  "neon      max,sve=off      NEON"
  "sve-128   a64fx,sve128=on  SVE"
  "sve-256   a64fx,sve256=on  SVE"
  "sve_256   a64fx,sve256=on  SVE_256"
  "sve-512   a64fx            SVE"
  "sve2_128  max,sve128=on    SVE2_128"
  "sve2-256  max,sve256=on    SVE2"
  "sve2-512  max              SVE2"
)

# --- 1. Packages (installed only when missing) -------------------------------------------------
ARM_PACKAGES="cmake make g++-aarch64-linux-gnu qemu-user libhwy-dev:arm64 libabsl-dev:arm64 libgtest-dev:arm64
  libmpfr-dev:arm64"
installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=""
for p in $ARM_PACKAGES; do installed "$p" || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "Adding the arm64 architecture to dpkg"
    $SUDO dpkg --add-architecture arm64
  fi
  echo "Installing Debian packages:$missing"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# --- 2. Cross build ------------------------------------------------------------------------------
# (The toolchain file is read once, when the build directory is created; CMake keeps it.)
toolchain=()
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  toolchain=(-DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake)
elif ! grep -q '^CMAKE_AR:FILEPATH=.*aarch64-linux-gnu' "$BUILD/CMakeCache.txt"; then
  echo "test_arm.sh: $BUILD is not an aarch64 cross build; remove it or set ARM_BUILD" >&2
  exit 1
fi
cmake -S . -B "$BUILD" "${toolchain[@]}" -DLOSSD_KERNELS_ONLY=ON -DLOSSD_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
unset MAKEFLAGS MFLAGS MAKELEVEL  # no "Entering directory" lines from make's own settings
cmake --build "$BUILD" -j "$JOBS" --target kernels_test cpu_bench
SHIM="$BUILD/libhwy_only_target.so"
if [ ! -f "$SHIM" ] || [ tools/arm/hwy_only_target.cc -nt "$SHIM" ]; then
  aarch64-linux-gnu-g++ -std=c++17 -O2 -Wall -Wextra -fPIC -shared \
    -o "$SHIM" tools/arm/hwy_only_target.cc -lhwy
fi
SHIM=$(realpath "$SHIM")
TEST_BIN="$BUILD/tests/kernels_test"
BENCH_BIN="$BUILD/tools/kernels/cpu_bench"
LOGS="$BUILD/arm-logs"
mkdir -p "$LOGS"

# --- 3. One run per target -----------------------------------------------------------------------
selected=${ARM_RUNS:-$(for r in "${RUNS[@]}"; do echo "${r%% *}"; done)}
SUMMARY=()
failed=0
t_all=$(date +%s)
for r in "${RUNS[@]}"; do
  read -r label cpu target <<<"$r"
  echo " $selected " | tr '\n' ' ' | grep -q " $label " || continue
  env_guest="LOSSD_HWY_TARGET=$target,LD_PRELOAD=$SHIM,LOSSD_TEST_SCALE=$LOSSD_TEST_SCALE"
  log="$LOGS/$label.log"
  echo "=== $label: qemu -cpu $cpu, Highway target $target (log: $log)"

  # What lossd's dispatch reports (the same dispatch as CpuSimdTarget()).
  bench_target=$(QEMU_CPU=$cpu QEMU_SET_ENV=$env_guest qemu-aarch64 "$BENCH_BIN" \
      --n=65536 --reps=1 --only=main 2>&1 | sed -n 's/.*SIMD target \([A-Z0-9_]*\).*/\1/p')

  # Wall and CPU seconds (user + system: steadier than wall time on a busy machine).
  rc=0
  TIMEFORMAT='%R %U %S'
  { time QEMU_CPU=$cpu QEMU_SET_ENV=$env_guest qemu-aarch64 "$TEST_BIN" --gtest_brief=1 \
      >"$log" 2>&1 || rc=$?; } 2>"$LOGS/$label.time"
  read -r wall usr sys <"$LOGS/$label.time"
  secs=$(printf "%.0f" "$wall")
  cpu_secs=$(awk -v u="$usr" -v s="$sys" 'BEGIN { printf "%.0f", u + s }')
  test_target=$(sed -n 's/^hwy dispatch target: //p' "$log" | tail -n 1)
  # The parameterized accuracy suite is instantiated once per target Highway supports here.
  instances=$(QEMU_CPU=$cpu QEMU_SET_ENV=$env_guest qemu-aarch64 "$TEST_BIN" \
      --gtest_list_tests --gtest_filter='EveryTarget/*' 2>/dev/null \
      | sed -n 's/^  [A-Za-z0-9_]*\/\([A-Z0-9_]*\).*/\1/p' | sort -u | tr '\n' ' ' | sed 's/ $//')
  passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -n 1)
  skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test.*/\1/p' "$log" | tail -n 1)
  nfail=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -n 1)
  ran=$(sed -n 's/^\[==========\] \([0-9]*\) tests\? from .* ran.*/\1/p' "$log" | tail -n 1)
  status=ok
  why=""
  if [ "$rc" -ne 0 ]; then status=FAIL; why="exit $rc; "; fi
  if [ "$bench_target" != "$target" ]; then status=FAIL; why="${why}cpu_bench reports '$bench_target'; "; fi
  if [ "$test_target" != "$target" ]; then status=FAIL; why="${why}kernels_test dispatched to '$test_target'; "; fi
  if [ "$instances" != "$target" ]; then status=FAIL; why="${why}EveryTarget instances '$instances'; "; fi
  line=$(printf "%-9s %-16s %-9s %-9s %3s ran %3s passed %3s skipped %3s failed %5ss %5ss  %s" \
    "$label" "$cpu" "$target" "${test_target:-?}" "${ran:-?}" "${passed:-0}" "${skipped:-0}" \
    "${nfail:-0}" "$secs" "$cpu_secs" "$status")
  [ -n "$why" ] && line="$line ($why)"
  echo "$line"
  grep -E "^\[  FAILED  \] [A-Za-z]" "$log" | sort -u | sed 's/^/    /' || true
  SUMMARY+=("$line")
  [ "$status" = ok ] || failed=1
done

if [ "${#SUMMARY[@]}" -eq 0 ]; then
  echo "test-arm: ARM_RUNS='$selected' names none of the runs:" \
    "$(for r in "${RUNS[@]}"; do echo -n "${r%% *} "; done)" >&2
  exit 1
fi
echo
echo "test-arm (LOSSD_TEST_SCALE=$LOSSD_TEST_SCALE), $(( $(date +%s) - t_all )) s in all:"
printf "%-9s %-16s %-9s %-9s %-41s %6s %6s\n" "run" "qemu -cpu" "asked" "ran" "tests" "wall" "cpu"
for line in "${SUMMARY[@]}"; do echo "$line"; done
if [ "$failed" -ne 0 ]; then
  echo "test-arm: FAILED"
  exit 1
fi
echo "test-arm: all runs passed on their targets"
