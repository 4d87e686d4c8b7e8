#!/usr/bin/env bash
# Exercises Dockerfile.cuda where NVIDIA's base images cannot be pulled (docs/deployment.md):
# builds it with podman on stand-in bases, runs the result without a GPU and checks it.
#   devel stand-in:   localhost/debian:12-slim + this machine's CUDA toolkit (/usr/local/cuda,
#                     nvcc 13.0 on the project's machines), copied in as /usr/local/cuda;
#   runtime stand-in: localhost/debian:12-slim.
# The apt step pins Ubuntu 24.04 versions, which a Debian stand-in cannot install: the build
# uses a copy of Dockerfile.cuda whose pins are replaced by those of the same packages in
# Dockerfile (Debian 12; every package must be there), nothing else changed.
# Checks: the build (apt steps, CMake with CUDA ON and the image's architectures, nvcc, the
# library bundle), that every shared library of lossd resolves in the runtime image, the
# embedded device code (cuobjdump: sm_80/86/89/90 SASS + compute_90 PTX), and then, on the CPU
# (--device=auto without a GPU): the smoke test, the HEALTHCHECK, non-root, drain.
# Not exercised: NVIDIA's Ubuntu 24.04 bases, the GPU itself (see tools/gpu/gpu_check.sh).
# Manual (not CI, not a make target): minutes, most of it nvcc. CUDA_ARCHITECTURES=90 in the
# environment builds one architecture only (faster).
#   bash tests/deploy/cuda_standin_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/deploy/podman_lib.sh
. tests/deploy/podman_lib.sh
PYTHON=${PYTHON:-.venv/bin/python}
cuda=$(readlink -f /usr/local/cuda)
[ -x "$cuda/bin/nvcc" ] || { echo "no CUDA toolkit at /usr/local/cuda"; exit 1; }
devel=localhost/lossd-cuda-standin:devel-$$
tag=localhost/lossd-cuda:standin-$$
name=lossd-cuda-standin-$$
stage=$(mktemp -d)
fail=0
cleanup() { podman_cleanup "$name" "$stage" "$tag" "$devel"; }
trap cleanup EXIT

echo "== devel stand-in from $cuda"
mkdir -p "$stage/cuda/lib"
cp -a "$cuda/bin" "$cuda/include" "$cuda/nvvm" "$cuda/targets" "$stage/cuda/"
# lib/ without the large math libraries, which lossd does not use.
find "$cuda/lib/" -mindepth 1 -maxdepth 1 | grep -vE 'cublas|cudnn|cufft|cusolver|cusparse|curand|nccl' |
  xargs cp -a -t "$stage/cuda/lib/"
ln -s lib "$stage/cuda/lib64"
# No libnvToolsExt placeholder: the top-level CMakeLists.txt works around the stock
# FindCUDAToolkit of Debian 12's CMake 3.25.1, which this build uses.
printf 'FROM localhost/debian:12-slim\nCOPY cuda /usr/local/cuda\n' > "$stage/Dockerfile"
deploy/docker/podman_build.sh --base-only
"${P[@]}" build --format docker --pull=never --layers=false "${U[@]}" -t "$devel" "$stage" >/dev/null

echo "== build Dockerfile.cuda on the stand-ins (apt pins of Dockerfile)"
python3 - "$stage/Dockerfile.cuda" <<'PY' || exit 1
import re, sys
pin = re.compile(r"^(\s+)([a-z0-9][a-z0-9+.-]*)=(\S+)( \\)$", re.M)
debian = {m.group(2): m.group(3) for m in pin.finditer(open("Dockerfile").read())}
def swap(m):
    if m.group(2) not in debian:
        sys.exit(f"FAIL: {m.group(2)} has no Debian 12 pin in Dockerfile")
    return f"{m.group(1)}{m.group(2)}={debian[m.group(2)]}{m.group(4)}"
text, n = pin.subn(swap, open("Dockerfile.cuda").read())
open(sys.argv[1], "w").write(text)
print(f"{n} Ubuntu pins replaced by Debian 12's")
PY
start=$(date +%s)
archs=()
[ -n "${CUDA_ARCHITECTURES:-}" ] && archs=(--build-arg "CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES")
"${P[@]}" build --format docker --network=host --pull=never --layers=false "${U[@]}" \
  --build-arg CUDA_DEVEL_IMAGE="$devel" --build-arg CUDA_RUNTIME_IMAGE=localhost/debian:12-slim \
  "${archs[@]}" -t "$tag" -f "$stage/Dockerfile.cuda" . > /tmp/lossd-cuda-standin-build.log 2>&1 ||
  { tail -40 /tmp/lossd-cuda-standin-build.log; echo "FAIL: build (log /tmp/lossd-cuda-standin-build.log)"; exit 1; }
echo "build seconds: $(( $(date +%s) - start ))"
echo "image size: $("${P[@]}" image inspect --format '{{.Size}}' "$tag") bytes"
grep -E "CUDA backend ON|^lib.*\.so" /tmp/lossd-cuda-standin-build.log | head -3 || true
echo "bundled libraries: $(grep -cE '^lib.*\.so' /tmp/lossd-cuda-standin-build.log || true)"

echo "== shared libraries and device code"
"${P[@]}" run --rm "${U[@]}" --entrypoint /bin/sh "$tag" -c \
  'ldd /usr/local/bin/lossd | grep -E "not found|libgrpc\+\+|libcuda" || true' 2>&1 | grep -v "systemd connection"
if [[ "$("${P[@]}" run --rm "${U[@]}" --entrypoint /bin/sh "$tag" -c 'ldd /usr/local/bin/lossd' 2>/dev/null)" == *"not found"* ]]; then
  echo "FAIL: unresolved shared libraries"; fail=1; fi
cid=$("${P[@]}" create "$tag" 2>/dev/null)
"${P[@]}" cp "$cid:/usr/local/bin/lossd" "$stage/lossd" >/dev/null
"${P[@]}" rm "$cid" >/dev/null
# cuobjdump: the toolkit's, else NVIDIA's PyPI wheel (13.2 is the oldest there; it reads the
# fat binaries of older nvcc releases).
objdump="$cuda/bin/cuobjdump"
if [ ! -x "$objdump" ]; then
  python3 -m venv "$stage/venv" && "$stage/venv/bin/pip" install -q nvidia-cuda-cuobjdump==13.2.86
  objdump=$(find "$stage/venv" -name cuobjdump -type f | head -n 1)
fi
elf=$("$objdump" --list-elf "$stage/lossd" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')
ptx=$("$objdump" --list-ptx "$stage/lossd" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')
echo "SASS: $elf; PTX: $ptx"
if [ -z "${CUDA_ARCHITECTURES:-}" ]; then
  [ "$elf" = "sm_80 sm_86 sm_89 sm_90 " ] && [ "$ptx" = "sm_90 " ] ||
    { echo "FAIL: device code is not sm_80/86/89/90 + compute_90 PTX"; fail=1; }
fi

echo "== run without a GPU (--device=auto falls back to the CPU)"
read -r port mport < <(free_ports)
"${P[@]}" run -d --name "$name" --network=host "${U[@]}" --read-only --cap-drop=ALL \
  --security-opt=no-new-privileges -e LOSSD_HEALTH_ADDR="127.0.0.1:$port" "$tag" \
  --host=127.0.0.1 --port="$port" --device=auto --metrics_host=127.0.0.1 \
  --metrics_port="$mport" --drain_timeout=10s 2>&1 | grep -v "systemd connection" >/dev/null || true
wait_listening "$name"
"${P[@]}" logs "$name" 2>&1 | grep -E "devices=|listening" | cut -c1-160
"$PYTHON" tests/deploy/smoke_image.py --addr "127.0.0.1:$port" --metrics-port "$mport" || fail=1
"${P[@]}" healthcheck run "$name" && echo "healthcheck: healthy" || { echo "FAIL: HEALTHCHECK"; fail=1; }
puid=$("${P[@]}" exec "$name" sh -c 'awk "/^Uid:/ {print \$2}" /proc/1/status')
echo "lossd uid=$puid"
[ "$puid" = 10001 ] || { echo "FAIL: not UID 10001"; fail=1; }
code=$(stop_exit_code "$name")
echo "exit code after SIGTERM: $code"
[ "$code" = 0 ] || fail=1

if [ "$fail" = 0 ]; then echo "cuda stand-in check: OK"; else echo "cuda stand-in check: FAILED"; fi
exit "$fail"
