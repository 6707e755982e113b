#!/usr/bin/env bash
# ThreadSanitizer on the threaded code, run by hand (not part of CI: docs/reliability.md has its
# time and findings). GCC's libgomp synchronises its barriers with futexes TSan cannot see, so
# every OpenMP region would report false races; this build uses clang with LLVM's OpenMP runtime
# (libomp) and its OMPT tool Archer (libarcher.so, shipped with libomp-dev on Debian), which
# tells TSan about OpenMP's barriers, tasks, locks and reductions.
# Builds foldcube_tests in BUILD (default build-tsan/, -fsanitize=thread, RelWithDebInfo, no MPI)
# and runs the threaded kernels' tests, one Evoformer forward and one training step (golden
# evo_tiny), the feature pipeline and the cancel helper thread on 2 OpenMP threads. DAP is out of
# scope (MPI ranks are processes).
# Usage: bash scripts/tsan.sh [BUILD_DIR] [extra GoogleTest args, e.g. --gtest_filter=...]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-tsan}
shift || true

bash scripts/ensure_packages.sh clang libomp-dev
bash scripts/setup.sh --deps-only

# Archer from the clang in use (Debian: /usr/lib/llvm-<major>/lib/libarcher.so).
ARCHER=$(clang++ -print-resource-dir)/../../libarcher.so
[ -f "$ARCHER" ] || ARCHER=$(ls /usr/lib/llvm-*/lib/libarcher.so 2>/dev/null | sort -V | tail -1)
if [ ! -f "$ARCHER" ]; then
  echo "tsan: libarcher.so not found (Debian: libomp-dev); OpenMP regions would give false reports" >&2
  exit 1
fi

LAUNCHER=()
command -v ccache >/dev/null && LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread" -DFOLDCUBE_BUILD_BENCH=OFF -DFOLDCUBE_MPI=OFF \
  -DCMAKE_GTEST_DISCOVER_TESTS_DISCOVERY_MODE=PRE_TEST \
  "${LAUNCHER[@]}" >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target foldcube_tests

# Kernels (GEMM, attention, elementwise, backward, fused, typed/bf16, conversions), the Evoformer
# forward and training step on evo_tiny, features, the cancel thread. Slow af2-dimension and CLI
# cases are left out (the CLI runs the same kernels).
FILTER='GemmTest.*:Gemm.*:GemmTyped.*:Linear.*:Layout.*:AttentionTest.*:Shapes/*:Attention*'
FILTER+=':Elementwise*:*Backward*:FusedLayerNormLinear.*:FusedLinearResidual.*:FusedTransition.*'
FILTER+=':FusedBlock.EvoformerAndExtraMsaMatchUnfused:FusedBlock.PairformerMatchesUnfused'
FILTER+=':Typed*:Convert.*:Cases/GoldenEvoformer.*/evo_tiny_chunk0:Cases/GoldenGrad.*/evo_tiny'
FILTER+=':Golden/FeatureGolden.*:NearestCentres.*:Cancel.*'
FILTER+='-*af2dims*:*Af2Dims*:*Cli*'

# Reports from the uninstrumented runtimes (libomp itself, oneDNN and its libgomp threads) are
# ignored: TSan sees only instrumented code, i.e. foldcube's. Every report is printed; any
# report makes the exit code 66.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export OMP_TOOL_LIBRARIES=$ARCHER
export TSAN_OPTIONS=${TSAN_OPTIONS:-ignore_noninstrumented_modules=1:second_deadlock_stack=1}
exec "$BUILD"/foldcube_tests --gtest_filter="$FILTER" "$@"
