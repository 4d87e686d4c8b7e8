#!/usr/bin/env bash
# Builds a lossd image with podman on a Debian 12 machine without a Docker engine (`make image`,
# `make image-check`; docs/deployment.md). Installs podman, mmdebstrap and runc when missing;
# creates the base image localhost/debian:12-slim from the Debian mirror with mmdebstrap when it
# is not there yet (about 45 s; kept for later builds), then builds.
#
#   deploy/docker/podman_build.sh TAG [DOCKERFILE] [more podman build arguments]
#   deploy/docker/podman_build.sh --base-only    # only the packages and the base image
#
# crun fails on these machines (cgroups in hybrid mode; RLIMIT_NOFILE/NPROC not permitted):
# runc with cgroupfs and explicit ulimits, for build and run alike. --format docker keeps the
# HEALTHCHECK (the OCI format has none). --network=host lets RUN steps reach the mirror.
# Prints "build seconds: N" and "image size: N bytes" at the end.
set -euo pipefail
tag=${1:?usage: podman_build.sh TAG [DOCKERFILE] [podman build args...]}
dockerfile=${2:-Dockerfile}
shift $(( $# >= 2 ? 2 : 1 ))
base=${LOSSD_PODMAN_BASE:-localhost/debian:12-slim}
cd "$(dirname "$0")/../.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
missing=""
for p in podman mmdebstrap runc; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "Installing Debian packages:$missing"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi

P=(podman --runtime runc --cgroup-manager=cgroupfs)
U=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

if ! "${P[@]}" image exists "$base"; then
  echo "Creating the base image $base with mmdebstrap (Debian 12 minbase)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mmdebstrap --quiet --variant=minbase bookworm "$tmp/bookworm.tar"
  "${P[@]}" import "$tmp/bookworm.tar" "$base" >/dev/null
  rm -f "$tmp/bookworm.tar"
fi

[ "$tag" = --base-only ] && exit 0

start=$(date +%s)
"${P[@]}" build --format docker --network=host --pull=never "${U[@]}" \
  --build-arg DEBIAN_IMAGE="$base" -t "$tag" -f "$dockerfile" "$@" .
echo "build seconds: $(( $(date +%s) - start ))"
echo "image size: $("${P[@]}" image inspect --format '{{.Size}}' "$tag") bytes"
