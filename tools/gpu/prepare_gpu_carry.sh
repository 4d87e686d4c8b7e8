#!/usr/bin/env bash
# Prepares the CUDA build for a run of tools/gpu/gpu_check.sh on another machine
# (docs/design.md section 9). Run HERE, from anywhere, after building with CUDA for sm_90:
#   cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build -j2 \
#     --target kernels_test gpu_bench lossd lossd_bench
#   tools/gpu/prepare_gpu_carry.sh
# It copies into build/gpulibs/ every shared library that `ldd` lists for the test and bench
# binaries except glibc and the CUDA driver (absl, hwy, libstdc++, libgcc_s, ...: the GPU
# machine runs another Linux image), and glibc itself with its loader into build/gpulibs/glibc/
# (used by gpu_check.sh only if the binaries cannot start on the GPU machine's own glibc).
# Then it prints what to carry and its size (the carry limit is 64 MiB; keep it under 60).
# With LOSSD_BASE_COMMIT=<commit> it also builds gpu_bench at that commit (a temporary git
# worktree, build folder build/base-bench) into build/gpulibs/gpu_bench_base: gpu_check.sh then
# times both builds on the same GPU, one after the other, and prints their Gelem/s side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."

BINS=(build/tests/kernels_test build/tools/gpu/gpu_bench build/server/lossd
      build/client/loadtest/lossd-bench)
for b in "${BINS[@]}"; do
  [[ -x "$b" ]] || { echo "missing $b: build it first (see the header of $0)" >&2; exit 1; }
done

# The device code must be built for sm_90 (H100/H200); nvcc 13 alone defaults to sm_75.
flags=build/kernels/CMakeFiles/lossd_kernels_cuda.dir/flags.make
if ! grep -q 'sm_90' "$flags" 2>/dev/null; then
  echo "build/ does not compile CUDA for sm_90 ($flags); reconfigure with" \
       "-DCMAKE_CUDA_ARCHITECTURES=90" >&2
  exit 1
fi

if [[ -n "${LOSSD_BASE_COMMIT:-}" ]]; then
  base_src="$(mktemp -d)/src"
  git worktree add --detach "$base_src" "$LOSSD_BASE_COMMIT" >/dev/null
  rm -rf build/base-bench  # its cache names the previous (removed) worktree
  cmake -S "$base_src" -B build/base-bench -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
  cmake --build build/base-bench -j2 --target gpu_bench >/dev/null
  git worktree remove --force "$base_src"
  # gpu_bench is built under tools/gpu/ (kernels/ in older commits).
  base_bench=build/base-bench/tools/gpu/gpu_bench
  [[ -x "$base_bench" ]] || base_bench=build/base-bench/kernels/gpu_bench
  BINS+=("$base_bench")
fi

rm -rf build/gpulibs
mkdir -p build/gpulibs/glibc
if [[ -n "${LOSSD_BASE_COMMIT:-}" ]]; then
  strip --strip-debug -o build/gpulibs/gpu_bench_base "$base_bench"
  git rev-parse --short "$LOSSD_BASE_COMMIT" >build/gpulibs/BASE_FROM
fi
declare -A seen=()
for b in "${BINS[@]}"; do
  while read -r path; do
    [[ -n "$path" && -z "${seen[$path]:-}" ]] || continue
    seen[$path]=1
    name=$(basename "$path")
    case "$name" in
      libcuda.so*|libnvidia-*) ;;  # the driver must come from the GPU machine
      ld-linux*|libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|libresolv.so.*|\
      libutil.so.*|libmvec.so.*)
        cp -L "$path" build/gpulibs/glibc/ ;;
      *) cp -L "$path" build/gpulibs/ ;;
    esac
  done < <(ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}')
done
# The loader-mode fallback needs every glibc piece the libraries might pull in.
for extra in libpthread.so.0 libdl.so.2 librt.so.1; do
  for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
    if [[ -e "$dir/$extra" && ! -e "build/gpulibs/glibc/$extra" ]]; then
      cp -L "$dir/$extra" build/gpulibs/glibc/
    fi
  done
done

# The commit the binaries were built from (the GPU machine's checkout may be another one).
echo "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain \
  2>/dev/null | grep -q . && echo ' (with local changes)')" >build/gpulibs/BUILT_FROM

echo "build/gpulibs ($(find build/gpulibs -maxdepth 1 -type f -name '*.so*' | wc -l) libraries):" \
     "$(cd build/gpulibs && ls -p | grep '\.so' | sed 's/\.so.*//' | paste -sd' ')"
echo "build/gpulibs/glibc: $(ls build/gpulibs/glibc | paste -sd' ')"
echo
echo "required GLIBC of the binaries: $(objdump -T "${BINS[@]}" build/gpulibs/*.so* 2>/dev/null |
  grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1) (gpu_check.sh falls back to the bundled glibc)"
echo
CARRY=(build/tests/kernels_test build/tools/gpu/gpu_bench build/server/lossd
       build/client/loadtest/lossd-bench build/gpulibs)
du -shc "${CARRY[@]}" | sed 's/^/  /'
total_kib=$(du -sck "${CARRY[@]}" | tail -1 | cut -f1)
# The same paths in one xz archive (the CUDA code compresses about 2:1): gpu_check.sh unpacks
# build/gpucarry.tar.xz when it finds it, so carrying the archive alone is enough.
tar -cJf build/gpucarry.tar.xz "${CARRY[@]}"
archive_kib=$(du -k build/gpucarry.tar.xz | cut -f1)
echo
echo "carry for the device run (paths relative to the repository root):"
printf '  ["build/gpucarry.tar.xz"]  = %d KiB (or, unpacked: [%s] = %d KiB)\n' "$archive_kib" \
  "$(printf '"%s", ' "${CARRY[@]}" | sed 's/, $//')" "$total_kib"
if (( archive_kib > 60 * 1024 )); then
  echo "  WARNING: the archive is over 60 MiB; strip the binaries (strip --strip-debug)" >&2
fi
echo "whole build/ folder: $(du -sh build | cut -f1) (too big to carry as is; carrying only" \
     "the paths above is enough. To carry build/ itself, first delete what the device" \
     "run does not need: find build -name '*.o' -delete; rm -rf build/server build/proto)"
