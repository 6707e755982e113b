#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/*_fuzz.cc; clang + ASan + UBSan) in build-fuzz/ and runs each
# for SECONDS (default 60), one after another, on a scratch copy of its seed corpus (fuzz/corpus/
# stays as committed; new interesting inputs are merged into it only with --merge).
# A finding stops that target: the input is saved as build-fuzz/findings/<target>/crash-* and the
# script exits 1 at the end. Turn each finding into a fix plus a regression (docs/reliability.md).
# Usage: bash scripts/fuzz.sh [SECONDS] [--merge] [--only NAME] [-- extra libFuzzer flags]
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=60
MERGE=0
ONLY=""
EXTRA=()
while (($#)); do
  case "$1" in
    --merge) MERGE=1 ;;
    --only) ONLY="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) SECONDS_PER_TARGET="$1" ;;
  esac
  shift
done

# clang, its compiler-rt (libFuzzer, sanitizer runtimes) and LLVM's OpenMP runtime.
bash scripts/ensure_packages.sh clang libclang-rt-dev libomp-dev
bash scripts/setup.sh --deps-only

LAUNCHER=()
command -v ccache >/dev/null && LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DFOLDCUBE_FUZZ=ON -DFOLDCUBE_BUILD_TESTS=OFF -DFOLDCUBE_BUILD_BENCH=OFF -DFOLDCUBE_MPI=OFF \
  "${LAUNCHER[@]}" >/dev/null
targets=()
for src in fuzz/*_fuzz.cc; do
  name=$(basename "$src" _fuzz.cc)
  [ -n "$ONLY" ] && [ "$name" != "$ONLY" ] && continue
  targets+=("$name")
done
cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]/#/fuzz_}"

status=0
for name in "${targets[@]}"; do
  work=build-fuzz/corpus/$name
  findings=build-fuzz/findings/$name
  rm -rf "$work" && mkdir -p "$work" "$findings"
  cp fuzz/corpus/"$name"/* fuzz/regressions/"$name"/* "$work"/ 2>/dev/null || true
  dict=()
  [ -f fuzz/"$name".dict ] && dict=(-dict=fuzz/"$name".dict)
  echo "== fuzz_$name: ${SECONDS_PER_TARGET}s"
  # One process; rss/malloc limits make an input that would exhaust memory a finding too.
  if ! OMP_NUM_THREADS=1 build-fuzz/fuzz/fuzz_"$name" "$work" "${dict[@]}" \
      -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
      -timeout=10 -print_final_stats=1 -artifact_prefix="$findings"/ "${EXTRA[@]}" \
      2> build-fuzz/fuzz_"$name".log; then
    status=1
    echo "   FINDING: see build-fuzz/fuzz_$name.log and $findings/"
  fi
  grep -E "^stat::number_of_executed_units|^Done [0-9]+ runs" build-fuzz/fuzz_"$name".log | tail -2 || true
  if ((MERGE)); then
    build-fuzz/fuzz/fuzz_"$name" -merge=1 fuzz/corpus/"$name" "$work" -max_len=65536 \
      2>/dev/null >/dev/null || true
  fi
done
exit $status
