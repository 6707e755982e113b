#!/usr/bin/env bash
# The sanitizer stage of CI (also run by hand): builds foldcube with ASan + UBSan
# (-fno-sanitize-recover, FOLDCUBE_SANITIZE) in build-asan/ and runs the fast suite, i.e. every
# CTest test except the slow ones (SLOW below), plus the fuzz corpus replays
# (CTest label "fuzz": every seed and regression input through each fuzz target once).
# Usage: bash scripts/sanitize.sh [BUILD_DIR] [extra ctest args]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-asan}
shift || true

# Slow tests, left out under sanitizers: every test that takes 10 s or more in the Release suite
# (docs/reliability.md has the measurement); under ASan they take 2-4x longer. The families stay
# covered by their small cases (e.g. GoldenGrad/evo_tiny, the tiny golden cases).
SLOW='af2dims|af2_s|ChunkedTraining|ModelEqualsAllocator|WorkspaceMatchesTrackedPeak'
SLOW+='|RunPlanAutoWithinBudget|RunSavedPlanAndErrors|TrainingProfilePerModule|PeakWithinSixTimes'
SLOW+='|DropoutStep|ExtraMsa\.ExportRoundTrip|FullyMaskedColumnIsFinite|InferenceBudget'
SLOW+='|TriMulGroups|evo_tiny_chunk5|dap_mpi_cli|dap_mpi_af3_cli'

bash scripts/setup.sh --deps-only
LAUNCHER=()
command -v ccache >/dev/null && LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DFOLDCUBE_SANITIZE=ON -DFOLDCUBE_BUILD_BENCH=OFF \
  "${LAUNCHER[@]}" >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
# halt_on_error and abort: the first report fails the test; detect_leaks stays on (except the
# MPI tests, CMakeLists.txt).
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# Third-party process-lifetime caches (fontconfig via cairo) are not leaks of ours.
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/scripts/lsan.supp:print_suppressions=0}
ctest --test-dir "$BUILD" --output-on-failure -j2 -E "$SLOW" "$@"
