#!/usr/bin/env bash
# bf16 vs fp32 training step (issue 15): one fresh `foldcube run --backward` process per row, one
# warm-up step then the timed one, AF2 model_1 dims, random weights. Prints the load average
# before each row, the step times (wall, and the process CPU time of the timed step, which a
# loaded machine distorts less), the measured and modelled activation bytes, and the bf16/fp32
# ratios of each policy from the same run. OMP_WAIT_POLICY is passed through (printed).
# Usage: bench/train_bf16.sh [build_dir] [s] [r] [blocks] [policies...]
set -euo pipefail
build=${1:-build}
s=${2:-128}
r=${3:-256}
blocks=${4:-2}
shift $(($# < 4 ? $# : 4))
policies=("$@")
[ ${#policies[@]} -eq 0 ] && policies=(module block)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset}"
printf '| policy | dtype | load (1 min) | step ms | forward ms | backward ms | step CPU ms | activation MiB | model MiB | peak MiB | model peak MiB | RSS MiB |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|---|\n'
for p in "${policies[@]}"; do
  for dt in fp32 bf16; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    "$build/foldcube" run --s "$s" --r "$r" --blocks "$blocks" --backward --policy "$p" \
      --dtype "$dt" --warmup 1 --repeats 1 --quiet --report "$tmp/$p.$dt.json"
    python3 - "$tmp/$p.$dt.json" "$p" "$dt" "$load" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
M = 2.0**20
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {j['time_ms']:.0f} | {j['forward_ms']:.0f} | "
      f"{j['backward_ms']:.0f} | {j['cpu_ms']:.0f} | {j['activation_bytes']/M:.1f} | {j['activation_bytes_model']/M:.1f} | "
      f"{j['step_peak_bytes']/M:.1f} | {j['step_peak_bytes_model']/M:.1f} | {j['peak_rss_bytes']/M:.0f} |")
PY
  done
done
echo
for p in "${policies[@]}"; do
  python3 - "$tmp/$p.fp32.json" "$tmp/$p.bf16.json" "$p" <<'PY'
import json, sys
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(f"{sys.argv[3]}: step fp32/bf16 = {a['time_ms']/b['time_ms']:.2f}x (wall), "
      f"{a['cpu_ms']/b['cpu_ms']:.2f}x (process CPU), "
      f"activation bf16/fp32 = {b['activation_bytes']/a['activation_bytes']:.3f}, "
      f"peak bf16/fp32 = {b['step_peak_bytes']/a['step_peak_bytes']:.3f}")
PY
done
