#!/usr/bin/env bash
# Installs the Debian packages the tests need, if they are missing.
# Usage: scripts/deps.sh PACKAGE...   (command names are checked first)
set -euo pipefail
sudo=""
if [ "$(id -u)" -ne 0 ]; then
	sudo="sudo"
fi
missing=()
for pkg in "$@"; do
	if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
		missing+=("$pkg")
	fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Wait for another apt run (unattended upgrades on a fresh machine) to finish.
for _ in $(seq 1 120); do
	$sudo fuser /var/lib/dpkg/lock-frontend >/dev/null 2>&1 || break
	sleep 1
done
if ! $sudo apt-get install -y --no-install-recommends "${missing[@]}"; then
	$sudo apt-get update
	$sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
