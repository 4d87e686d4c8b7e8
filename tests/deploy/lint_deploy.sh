#!/usr/bin/env bash
# `make lint-deploy`: lints the container and Kubernetes files (docs/deployment.md). CI runs it.
#   1. hadolint on Dockerfile and Dockerfile.cuda: no finding of any level (inline ignores carry a
#      reason);
#   2. deploy/k8s/lossd*.yaml are what deploy/k8s/render.py makes of the overlays, and, where
#      kubectl is installed, equal to `kubectl kustomize` of them;
#   3. kubernetes-validate --strict of the rendered manifests and optional/ for the minimum
#      Kubernetes version (1.27, gRPC probes GA) and a current one (1.37), except CRD kinds
#      (ServiceMonitor: the validator has no schema for them);
#   4. checkov on deploy/k8s and both Dockerfiles: no failed check (each skip gives its reason);
#   5. check-jsonschema of deploy/compose.yaml against the Compose specification;
#   6. a CMake configure of exactly the build context each Dockerfile target copies
#      (tests/deploy/check_docker_context.py): the server images and Dockerfile's loadtest
#      target, with find_package(GTest) disabled (the images are built without GoogleTest).
# Installs its pinned tools (tests/deploy/requirements-lint.txt) into $LINT_VENV (.venv-lint)
# on the first run or when the pins change.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
LINT_VENV=${LINT_VENV:-.venv-lint}
PYTHON=${PYTHON:-python3}
K8S_MIN=1.27.0
K8S_CURRENT=1.37.0
req=tests/deploy/requirements-lint.txt
fail=0
step() { echo; echo "== $*"; }
check() { if "$@"; then :; else echo "FAILED: $*"; fail=1; fi; }

if ! cmp -s "$req" "$LINT_VENV/.requirements" 2>/dev/null; then
  step "installing the lint tools into $LINT_VENV"
  [ -x "$LINT_VENV/bin/python" ] || "$PYTHON" -m venv "$LINT_VENV" || exit 1
  "$LINT_VENV/bin/python" -m pip install -q --upgrade pip &&
    "$LINT_VENV/bin/python" -m pip install -q -r "$req" || exit 1
  cp "$req" "$LINT_VENV/.requirements"
fi
B="$LINT_VENV/bin"

step "hadolint $("$B/hadolint" --version | grep -o '[0-9.]*$')"
check "$B/hadolint" --no-color --failure-threshold info Dockerfile Dockerfile.cuda
[ "$fail" = 0 ] && echo "hadolint: no warnings"

step "rendered manifests"
check "$B/python" deploy/k8s/render.py --check
if command -v kubectl >/dev/null 2>&1; then
  check "$B/python" - <<'PY'
import subprocess, sys, yaml
sys.path.insert(0, "deploy/k8s")
import render
ok = True
for overlay in ("overlays/cpu", "overlays/gpu"):
    out = subprocess.run(["kubectl", "kustomize", "deploy/k8s/" + overlay], check=True,
                         capture_output=True, text=True).stdout
    key = lambda d: (d["kind"], d["metadata"]["name"])
    theirs = {key(d): d for d in yaml.safe_load_all(out) if d}
    ours = {key(d): d for d in render.render("deploy/k8s/" + overlay)}
    same = theirs == ours
    ok &= same
    print(f"{overlay}: render.py {'==' if same else '!='} kubectl kustomize "
          f"({len(ours)} resources)")
sys.exit(0 if ok else 1)
PY
else
  echo "kubectl not installed: render.py output not compared with kubectl kustomize"
fi

step "kubernetes-validate --strict ($K8S_MIN, $K8S_CURRENT)"
# optional/servicemonitor.yaml is a CRD kind (monitoring.coreos.com/v1) for which the
# validator has no schema: checked by checkov only.
manifests=(deploy/k8s/lossd.yaml deploy/k8s/lossd-gpu.yaml deploy/k8s/optional/hpa-queued-requests.yaml)
for v in "$K8S_MIN" "$K8S_CURRENT"; do
  if "$B/kubernetes-validate" --strict --quiet -k "$v" "${manifests[@]}"; then
    echo "Kubernetes $v: ${#manifests[@]} files valid"
  else
    echo "FAILED: kubernetes-validate -k $v"; fail=1
  fi
done

step "checkov $("$B/checkov" --version)"
# --skip-download: no network calls to the vendor's API (not reachable from CI).
check "$B/checkov" --quiet --compact --skip-download --framework kubernetes -d deploy/k8s
check "$B/checkov" --quiet --compact --skip-download --framework dockerfile \
  -f Dockerfile -f Dockerfile.cuda

step "check-jsonschema (Compose specification)"
check "$B/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

step "CMake configure of each Dockerfile's build context"
# CMAKE_DISABLE_FIND_PACKAGE_GTest: fails the configure if it still asks for GoogleTest.
nogtest=-DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON
check "$B/python" tests/deploy/check_docker_context.py Dockerfile -- \
  -DLOSSD_BUILD_TESTS=OFF -DLOSSD_CUDA=OFF "$nogtest"
check "$B/python" tests/deploy/check_docker_context.py Dockerfile --target loadtest -- \
  -DLOSSD_BUILD_TESTS=OFF -DLOSSD_BUILD_TOOLS=ON -DLOSSD_CUDA=OFF "$nogtest"
# Dockerfile.cuda: with its CUDA architectures where nvcc is installed (/usr/local/cuda, as on
# the project's machines), else CPU only (the context is the same).
# With the CMake modules exactly as Debian ships them: the project's machines may carry a
# patched FindCUDAToolkit.cmake (CMake 3.25.1's fails with CUDA >= 12 unless the top-level
# CMakeLists.txt works around it), so a stock copy of cmake-data is fetched and used.
if [ -x /usr/local/cuda/bin/nvcc ]; then
  archs=$(sed -n 's/^ARG CUDA_ARCHITECTURES="\(.*\)"$/\1/p' Dockerfile.cuda)
  stock=$(mktemp -d)
  modules=()
  cmake_data=$(dpkg-query -W -f='${Version}' cmake-data 2>/dev/null || true)
  if [ -n "$cmake_data" ] &&
     (cd "$stock" && apt-get -qq -o APT::Sandbox::User=root download "cmake-data=$cmake_data") &&
     dpkg-deb -x "$stock"/cmake-data_*.deb "$stock/x"; then
    dir=$(dirname "$(find "$stock/x" -name FindCUDAToolkit.cmake | head -n 1)")
    modules=("-DCMAKE_MODULE_PATH=$dir")
    echo "CMake modules: Debian's cmake-data $cmake_data as packaged"
  else
    echo "CMake modules: the installed ones (could not fetch cmake-data $cmake_data)"
  fi
  check "$B/python" tests/deploy/check_docker_context.py Dockerfile.cuda -- \
    -DLOSSD_BUILD_TESTS=OFF -DLOSSD_CUDA=ON -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc \
    "-DCMAKE_CUDA_ARCHITECTURES=$archs" "$nogtest" "${modules[@]}"
  rm -rf "$stock"
else
  check "$B/python" tests/deploy/check_docker_context.py Dockerfile.cuda -- \
    -DLOSSD_BUILD_TESTS=OFF -DLOSSD_CUDA=OFF "$nogtest"
fi

echo
if [ "$fail" = 0 ]; then echo "lint-deploy: OK"; else echo "lint-deploy: FAILED"; fi
exit "$fail"
