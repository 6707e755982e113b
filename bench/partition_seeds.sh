#!/usr/bin/env bash
# The seeds' Table 2/3 settings (48 blocks, 40 GB, batch 1, fp16; 2 and 4 devices; (128, 256),
# (512, 256), (512, 384)) planned with the profiles fitted to the seeds' rows (issue 19 item 5,
# issue 20 item 3; docs/planner.md, "The planner on the seeds' Table 2/3 settings"). Per setting
# and profile: foldcube's plan with `--split-policy auto` (its partitions, recompute, estimate and
# search time), pure DAP under the same limit (`--split-policy dap`), pure DAP with the seeds' DAP
# policy (block recompute for all 48 blocks), their gains, and the fastest split list regardless
# of memory with its step-time terms relative to pure DAP (`--explain-splits`); dap_coll: pure
# DAP's own layer collectives per step (link + latency, ms), the most a partition could save there.
#
# Usage: bench/partition_seeds.sh [BUILD_DIR]   env: PROFILES="seeds-fitted-fp16 ..." OUT=DIR
set -euo pipefail
build=${1:-build}
fc=$build/foldcube
profiles=${PROFILES:-"seeds-fitted-fp16 seeds-fitted-link-fp16"}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
echo "# out: $out"
printf '%-22s %-2s %-8s %-52s %8s %8s %8s %7s %7s %8s %8s %-44s %6s\n' profile N shape \
  "auto plan" auto_ms dap_ms dapblk_ms gain gain_blk search_s dap_coll \
  "fastest list: dt (compute/link/lat) +peak" load1
for prof in $profiles; do
  for n in 2 4; do
    for sh in 128:256 512:256 512:384; do
      s=${sh%%:*} r=${sh##*:}
      base=$out/${prof}_n${n}_s${s}_r${r}
      common=(--s "$s" --r "$r" --blocks 48 --train --devices "$n" --memory 40GB --dp 1
              --profile "docs/profiles/$prof.json")
      "$fc" plan "${common[@]}" --split-policy auto --explain-splits --out "$base.auto.json" \
        >"$base.auto.txt"
      "$fc" plan "${common[@]}" --split-policy dap --out "$base.dap.json" >/dev/null
      "$fc" plan "${common[@]}" --split-policy dap --policy block --out "$base.blk.json" >/dev/null
      load=$(cut -d' ' -f1 /proc/loadavg)
      python3 - "$base" "$prof" "$n" "$s:$r" "$load" <<'PY'
import json, sys
base, prof, n, shape, load = sys.argv[1:]
a, d, b = (json.load(open(f"{base}.{k}.json")) for k in ("auto", "dap", "blk"))
pol = a["policy"]
counts = " + ".join(f"{pol.count(p)} {p}" for p in ("none", "module", "block") if pol.count(p))
parts = "partitions" if a.get("partitions") else "no partitions"
plan = f"DAP {a['dap']}, {counts}, {parts}"
best, coll = "", ""
for line in open(f"{base}.auto.txt"):
    f = line.split()
    if f[:3] == ["pure", "DAP's", "layer"]:
        coll = f"{float(f[7]) + float(f[11]):.1f}"
    if f[:2] == ["best", "list"]:
        best = f"{float(f[5]):+.1f} ({float(f[2]):+.1f}/{float(f[3]):+.1f}/{float(f[4]):+.1f}) {float(f[6]):+.0f}MiB"
t_a, t_d, t_b = a["time_ms_estimate"], d["time_ms_estimate"], b["time_ms_estimate"]
print(f"{prof:<22} {n:<2} {shape:<8} {plan:<52} {t_a:8.1f} {t_d:8.1f} {t_b:8.1f} "
      f"{1 - t_a / t_d:7.1%} {1 - t_a / t_b:7.1%} {a['search_ms'] / 1e3:8.2f} {coll:>8} {best:<44} {load:>6}")
PY
    done
  done
done
