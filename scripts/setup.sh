#!/usr/bin/env bash
# Installs the Debian 12 packages foldcube needs (if missing) and builds it in ./build (Release).
# Usage: bash scripts/setup.sh [extra cmake -D options]
#        bash scripts/setup.sh --deps-only   (install the packages, do not build)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential cmake pkg-config libgtest-dev libgmock-dev libbenchmark-dev libdnnl-dev
          libhwy-dev nlohmann-json3-dev libcli11-dev libopenblas-dev libopenmpi-dev openmpi-bin
          libcairo2-dev libzip-dev)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ "${1:-}" = "--deps-only" ] && exit 0

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j"$(nproc)"
