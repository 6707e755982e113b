#!/usr/bin/env bash
# OpenMP waiting behaviour under contention (issue 18, item 4): an Evoformer forward at (128, 256),
# 2 blocks, on 1 thread and on 2 threads with libgomp's default wait policy, OMP_WAIT_POLICY=passive
# and short spins (GOMP_SPINCOUNT), first on the machine as it is, then with one core taken by a
# busy loop. Prints the median forward time of each (3 repeats after a warm-up) and the ratio to
# the 1-thread run of the same condition, with the load average. Run it on an otherwise quiet
# machine for meaningful numbers.
# Usage: bash bench/omp_wait.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-build}/foldcube
JOB="run --s 128 --r 256 --blocks 2 --repeats 3 --warmup 1 --quiet --report"
median_ms() {  # env assignments... -> median forward ms from the report
  local rep
  rep=$(mktemp)
  env "$@" "$BIN" $JOB "$rep" >/dev/null
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['time_ms'])" "$rep"
  rm -f "$rep"
}
table() {
  echo "condition: $1 (load $(cut -d' ' -f1 /proc/loadavg))"
  local one
  one=$(median_ms OMP_NUM_THREADS=1)
  printf '  %-34s %9.1f ms  1.00\n' "1 thread" "$one"
  for cfg in "default" "OMP_WAIT_POLICY=passive" "GOMP_SPINCOUNT=10000" "GOMP_SPINCOUNT=1000"; do
    local envs=(OMP_NUM_THREADS=2)
    [ "$cfg" != default ] && envs+=("$cfg")
    local t
    t=$(median_ms "${envs[@]}")
    printf '  %-34s %9.1f ms  %4.2f\n' "2 threads, $cfg" "$t" "$(python3 -c "print($t / $one)")"
  done
}
table "as is"
( while :; do :; done ) &
BUSY=$!
trap 'kill $BUSY 2>/dev/null' EXIT
table "one core taken by a busy loop"
