#!/usr/bin/env bash
# Installs Debian packages that ship a daemon the tests only run as a program of their own
# (`make deps`: `prometheus`, whose /usr/bin/prometheus tests/e2e/test_dashboard_e2e.py starts
# on a free loopback port with a temporary storage folder), without leaving the daemon running
# or enabled. Installed as they are, Debian's packages start and enable their services: a
# system Prometheus on port 9090 (lossd's default metrics port) scraping into /var/lib, and,
# through the Recommends, prometheus-node-exporter on 9100. So, for the packages that are
# missing (one already installed is left exactly as it is):
#   1. installed without their Recommends;
#   2. with service starts denied during the install: a temporary /usr/sbin/policy-rc.d that
#      exits 101 (honoured by invoke-rc.d and deb-systemd-invoke), unless the machine has one
#      already (e.g. in a container image), which is then left alone;
#   3. then each systemd unit they ship is disabled: `systemctl disable --now` where systemd
#      runs, else `deb-systemd-helper disable` (no systemd as PID 1: a container, a chroot),
#      and there their SysV init scripts too (`update-rc.d NAME disable`). Package upgrades
#      keep them disabled. To run the service after all: `systemctl enable --now prometheus`.
#
#   tests/deploy/install_service_packages.sh PACKAGE...
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -gt 0 ] || exit 0
echo "Installing Debian packages (without their services): ${missing[*]}"

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# Temporary (lossd tests/deploy/install_service_packages.sh): no service starts.\nexit 101\n' |
    $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  trap '$SUDO rm -f "$policy"' EXIT
fi

$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

for p in "${missing[@]}"; do
  units=$(dpkg-query -L "$p" | grep -E '^(/usr)?/lib/systemd/system/[^/]+\.(service|socket|timer)$' |
    xargs -r -n 1 basename | sort -u)
  for unit in $units; do
    if [ -d /run/systemd/system ]; then
      $SUDO systemctl disable --now --quiet "$unit"
    else
      # It acts only for a package's maintainer scripts: say for which one.
      $SUDO env DPKG_MAINTSCRIPT_PACKAGE="$p" DPKG_MAINTSCRIPT_NAME=postinst \
        deb-systemd-helper disable "$unit"
    fi
    echo "  $p: $unit disabled (not started)"
  done
  # Without systemd, a SysV init script of the package (prometheus ships one) would start at
  # boot through its /etc/rc?.d links.
  for script in $(dpkg-query -L "$p" | grep -E '^/etc/init\.d/[^/]+$' || true); do
    if [ ! -d /run/systemd/system ] && [ -x "$script" ]; then
      $SUDO update-rc.d "$(basename "$script")" disable >/dev/null
      echo "  $p: $script disabled (not started)"
    fi
  done
done
