#!/usr/bin/env bash
# `make image-check`: builds the CPU image from Dockerfile with podman (reusing the base image
# localhost/debian:12-slim when present), runs it on the host's loopback with free ports, and
# checks it (docs/deployment.md):
#   1. the image config: numeric non-root USER, HEALTHCHECK, ports 50051 and 9090;
#   2. the server inside answers: tests/deploy/smoke_image.py through lossd.Client from the repo
#      venv (health SERVING, BCE against a float64 reference within 1e-6, /metrics);
#   3. the image's own HEALTHCHECK passes (`podman healthcheck run`);
#   4. the process runs as UID 10001, not root;
#   5. the load tester image (Dockerfile --target loadtest, as deploy/compose.yaml's loadtest
#      service builds it) runs as non-root and, with --verify and --json, loads the running
#      container through --target (no failed or wrong call), then measures lossd against the
#      echo and raw baselines that it starts itself inside its own container;
#   6. SIGTERM (podman stop) drains and exits 0.
# Then it stops and removes the containers and the images it built (--layers=false: no
# intermediate images are kept; the base image stays).
# Not part of CI: the first run takes minutes (compiling lossd in the image, and again with
# the load tester for the loadtest target: the two builds share no layer).
# podman logs "unable to get systemd connection" for images with a HEALTHCHECK on machines
# without systemd (it cannot schedule the periodic check); harmless, filtered out below.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/deploy/podman_lib.sh
. tests/deploy/podman_lib.sh
PYTHON=${PYTHON:-.venv/bin/python}
tag=localhost/lossd:image-check-$$
ltag=localhost/lossd-loadtest:image-check-$$
name=lossd-image-check-$$
out=$(mktemp -d)
fail=0

cleanup() { podman_cleanup "$name" "$out" "$tag" "$ltag"; }
trap cleanup EXIT

deploy/docker/podman_build.sh "$tag" Dockerfile --layers=false 2>&1 |
  tee /tmp/lossd-image-check-build.log | grep -E "^(STEP|COMMIT|build seconds|image size)|rror" || true
[ "${PIPESTATUS[0]}" = 0 ] || { echo "image-check: build FAILED (log: /tmp/lossd-image-check-build.log)"; exit 1; }
echo "== build the load tester (--target loadtest)"
deploy/docker/podman_build.sh "$ltag" Dockerfile --layers=false --target loadtest 2>&1 |
  tee /tmp/lossd-image-check-loadtest-build.log | grep -E "^(build seconds|image size)|rror" || true
[ "${PIPESTATUS[0]}" = 0 ] ||
  { echo "image-check: loadtest build FAILED (log: /tmp/lossd-image-check-loadtest-build.log)"; exit 1; }

echo "== image config"
user=$("${P[@]}" image inspect --format '{{.Config.User}}' "$tag")
health=$("${P[@]}" image inspect --format '{{json .Config.Healthcheck}}' "$tag")
ports=$("${P[@]}" image inspect --format '{{json .Config.ExposedPorts}}' "$tag")
echo "user=$user ports=$ports"
echo "healthcheck=$health"
[[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || { echo "FAIL: USER is not a numeric non-root UID"; fail=1; }
[[ "$health" == *--health_check* ]] || { echo "FAIL: no HEALTHCHECK in the image"; fail=1; }
[[ "$ports" == *50051/tcp* && "$ports" == *9090/tcp* ]] || { echo "FAIL: ports"; fail=1; }

read -r port mport < <(free_ports)
echo "== run on 127.0.0.1:$port (metrics $mport)"
# As deploy/k8s runs it: read-only root file system, no capabilities, no privilege escalation.
"${P[@]}" run -d --name "$name" --network=host "${U[@]}" \
  --read-only --cap-drop=ALL --security-opt=no-new-privileges --memory=4g --cpus=2 \
  -e LOSSD_HEALTH_ADDR="127.0.0.1:$port" "$tag" \
  --host=127.0.0.1 --port="$port" --device=cpu --metrics_host=127.0.0.1 \
  --metrics_port="$mport" --drain_timeout=10s 2>&1 | grep -v "systemd connection" >/dev/null || true
wait_listening "$name"
"${P[@]}" logs "$name" 2>&1 | grep -v "systemd connection" | tail -n 4
# The memory budget follows the container's limit (as with the Kubernetes limit of 4Gi).
startup_log=$("${P[@]}" logs "$name" 2>&1)
[[ "$startup_log" == *"0.6 x memory 4 GiB (cgroup"* ]] ||
  { echo "FAIL: --max_inflight_bytes does not follow the 4 GiB cgroup limit"; fail=1; }

echo "== smoke test (lossd.Client)"
"$PYTHON" tests/deploy/smoke_image.py --addr "127.0.0.1:$port" --metrics-port "$mport" || fail=1

echo "== HEALTHCHECK"
if "${P[@]}" healthcheck run "$name"; then echo "healthcheck: healthy"; else
  echo "FAIL: the image's HEALTHCHECK reports unhealthy"; fail=1; fi

if "${P[@]}" exec "$name" /usr/local/bin/lossd --health_check=127.0.0.1:1 2>/dev/null; then
  echo "FAIL: the health check passes against a port where nothing listens"; fail=1
else echo "health check of a closed port: exit 1 (as it should)"; fi

echo "== non-root"
uid=$("${P[@]}" exec "$name" id -u)
puid=$("${P[@]}" exec "$name" sh -c 'awk "/^Uid:/ {print \$2}" /proc/1/status')
echo "exec uid=$uid, lossd (pid 1) uid=$puid"
[ "$uid" != 0 ] && [ "$puid" = 10001 ] || { echo "FAIL: runs as root"; fail=1; }

echo "== load tester image"
luser=$("${P[@]}" image inspect --format '{{.Config.User}}' "$ltag")
echo "user=$luser"
[[ "$luser" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || { echo "FAIL: loadtest USER is not a numeric non-root UID"; fail=1; }
chmod 0777 "$out"
# Reads a lossd-bench --json report: every row of the servers named (by prefix) has calls that
# succeeded and none that failed or mismatched.
check_report() {
  python3 - "$@" <<'PY'
import json, sys
path, servers = sys.argv[1], sys.argv[2:]
report = json.load(open(path))
bad = []
for name in servers:
    rows = [r for r in report["rows"] if r["server"].startswith(name)]
    if not rows:
        bad.append(f"no row for {name!r}")
    for r in rows:
        print(f"  {r['server']} {r['load']}: ok {r['ok']}, errors {r['errors']}, mismatches "
              f"{r['mismatches']}, {r['qps']:.0f} calls/s, p50 {r['latency_us']['p50']:.0f} us")
        if r["ok"] <= 0 or r["errors"] or r["mismatches"]:
            bad.append(f"{r['server']} {r['load']}: ok {r['ok']}, errors {r['errors']}, "
                       f"mismatches {r['mismatches']}")
if report.get("stopped"):
    bad.append(f"stopped: {report['stopped']}")
print("\n".join(f"FAIL: {b}" for b in bad) if bad else "  report OK")
sys.exit(1 if bad else 0)
PY
}
LT=("${P[@]}" run --rm "${U[@]}" --network=host --read-only --cap-drop=ALL
    --security-opt=no-new-privileges -v "$out:/out" "$ltag")
echo "-- lossd-bench --target=127.0.0.1:$port (the container above)"
"${LT[@]}" --target="127.0.0.1:$port" --concurrency=1:2:x2 --elements=4k --duration=2s \
  --warmup=0.5s --rounds=1 --verify --progress=false --json=/out/target.json \
  2>&1 | grep -v "systemd connection" | tail -n 4
check_report "$out/target.json" "" || fail=1
echo "-- lossd-bench without --target (lossd, echo and raw inside the loadtest container)"
"${LT[@]}" --elements=1k --duration=1s --warmup=0.3s --rounds=1 --verify --progress=false \
  --json=/out/self.json 2>&1 | grep -v "systemd connection" | tail -n 5
check_report "$out/self.json" lossd echo raw || fail=1

echo "== drain on SIGTERM"
code=$(stop_exit_code "$name")
"${P[@]}" logs "$name" 2>&1 | grep -v "systemd connection" | tail -n 2
echo "exit code $code"
[ "$code" = 0 ] || { echo "FAIL: exit code $code after SIGTERM"; fail=1; }

if [ "$fail" = 0 ]; then echo "image-check: OK"; else echo "image-check: FAILED"; fi
exit "$fail"
