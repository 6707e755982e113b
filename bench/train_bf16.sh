#!/usr/bin/env bash
# bf16 vs fp32 training step (issue 15): one fresh `foldcube run --backward` process per row, one
# warm-up step then the timed one, AF2 model_1 dims, random weights. Prints the load average
# before each row, the step times (wall, and the process CPU time of the timed step, which a
# loaded machine distorts less), the measured and modelled activation bytes, and the bf16/fp32
# ratios of each policy from the same run. OMP_WAIT_POLICY is passed through (printed).
# PAIRS=N (default 1) runs N interleaved fp32, bf16 pairs per policy and prints each pair's ratios
# and their medians (the load drifts between processes; adjacent pairs see the same load).
# Usage: [PAIRS=N] bench/train_bf16.sh [build_dir] [s] [r] [blocks] [policies...]
set -euo pipefail
build=${1:-build}
s=${2:-128}
r=${3:-256}
blocks=${4:-2}
shift $(($# < 4 ? $# : 4))
policies=("$@")
[ ${#policies[@]} -eq 0 ] && policies=(module block)
pairs=${PAIRS:-1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset}"
printf '| policy | dtype | load (1 min) | step ms | forward ms | backward ms | step CPU ms | activation MiB | model MiB | peak MiB | model peak MiB | RSS MiB |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|---|\n'
for p in "${policies[@]}"; do
  for ((k = 1; k <= pairs; k++)); do
    for dt in fp32 bf16; do
      load=$(cut -d' ' -f1 /proc/loadavg)
      "$build/foldcube" run --s "$s" --r "$r" --blocks "$blocks" --backward --policy "$p" \
        --dtype "$dt" --warmup 1 --repeats 1 --quiet --report "$tmp/$p.$k.$dt.json"
      python3 - "$tmp/$p.$k.$dt.json" "$p" "$dt" "$load" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
M = 2.0**20
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {j['time_ms']:.0f} | {j['forward_ms']:.0f} | "
      f"{j['backward_ms']:.0f} | {j['cpu_ms']:.0f} | {j['activation_bytes']/M:.1f} | {j['activation_bytes_model']/M:.1f} | "
      f"{j['step_peak_bytes']/M:.1f} | {j['step_peak_bytes_model']/M:.1f} | {j['peak_rss_bytes']/M:.0f} |")
PY
    done
  done
done
echo
for p in "${policies[@]}"; do
  python3 - "$tmp" "$p" "$pairs" <<'PY'
import json, statistics, sys
tmp, p, pairs = sys.argv[1], sys.argv[2], int(sys.argv[3])
wall, cpu = [], []
for k in range(1, pairs + 1):
    a, b = (json.load(open(f"{tmp}/{p}.{k}.{dt}.json")) for dt in ("fp32", "bf16"))
    wall.append(a['time_ms'] / b['time_ms'])
    cpu.append(a['cpu_ms'] / b['cpu_ms'])
    print(f"{p} pair {k}: step fp32/bf16 = {wall[-1]:.2f}x (wall), {cpu[-1]:.2f}x (process CPU), "
          f"activation bf16/fp32 = {b['activation_bytes']/a['activation_bytes']:.3f}, "
          f"peak bf16/fp32 = {b['step_peak_bytes']/a['step_peak_bytes']:.3f}")
if pairs > 1:
    print(f"{p}: median of {pairs} pairs {statistics.median(wall):.2f}x (wall), "
          f"{statistics.median(cpu):.2f}x (process CPU)")
PY
done
