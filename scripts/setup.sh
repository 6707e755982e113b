#!/usr/bin/env bash
# Installs the Debian 12 packages foldcube needs (if missing), installs the Python package into
# ./.venv (Debian's python3 with its packages, e.g. numpy and python3-torch when installed; build
# tools from PyPI) and builds foldcube in ./build (Release).
# Usage: bash scripts/setup.sh [extra cmake -D options for ./build]
#        bash scripts/setup.sh --deps-only   (install the packages, do not build)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential cmake pkg-config libgtest-dev libgmock-dev libbenchmark-dev libdnnl-dev
          libhwy-dev nlohmann-json3-dev libcli11-dev libopenblas-dev libopenmpi-dev openmpi-bin
          libcairo2-dev libzip-dev python3-dev python3-venv python3-numpy)
# PyTorch for foldcube.torch and its tests (a large download, so opt-in): FOLDCUBE_WITH_TORCH=1.
[ "${FOLDCUBE_WITH_TORCH:-0}" = 1 ] && PACKAGES+=(python3-torch)
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

# ccache, when installed, serves both builds below (CMake reads the launcher from the environment);
# the base directory makes its hits independent of where the checkout lives.
if command -v ccache >/dev/null; then
  export CMAKE_CXX_COMPILER_LAUNCHER=ccache CMAKE_C_COMPILER_LAUNCHER=ccache
  export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
fi

# The Python package (docs/python.md): built by scikit-build-core from this CMake project into
# build-python/ (incremental on later runs); ctest runs its pytest suite (label python).
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "scikit-build-core>=0.10" \
  "nanobind>=2.0" "pytest>=7" "gemmi>=0.6"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation .

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j"$(nproc)"
