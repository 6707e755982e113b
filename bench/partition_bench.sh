#!/usr/bin/env bash
# Per-layer partitions vs pure DAP (issue 19; docs/planner.md, "Per-layer partitioning").
# For each rank count and shape: the planner's pure-DAP plan (--split-policy dap), its own choice
# (--split-policy auto) and a fixed mixed list (row and triangle attention on heads, the
# transitions, triangle multiplications and OPM on channels), each run once under mpirun
# (`run --plan`). Prints per run the estimate, the measured wall time and CPU time (max rank), their
# ratios to pure DAP of the same shape, est/meas (meas: the wall time on a quiet machine, the CPU
# time when the 1-minute load average exceeds the cores: column `by`), and the load beside each run.
# When auto keeps pure DAP (the model says DAP wins), it says so and is not run again.
#
# Usage: bench/partition_bench.sh [BUILD_DIR]
#   env: NPS="2 4" SHAPES="128:256 512:256" BLOCKS=2 THREADS=1 TRAIN=0|1 OUT=DIR CALIBRATE=0|1
#        LAYERS=0|1 (1: run --profile, the per-layer estimate beside the measured wall and CPU time
#        in $OUT/np*_s*_r*.<plan>.log and the reports' "layers")
# The plans use this machine's calibrated profile at THREADS threads (a rank's thread count) with
# the collectives measured for each rank count (`profile link`, run first); CALIBRATE=1
# calibrates it afresh first (an empty profile cache under OUT), so that the estimates and the
# runs see the same machine state. Rerun on a quiet machine for the timing targets; under
# load the ratios are the comparison.
set -euo pipefail
build=${1:-build}
fc=$build/foldcube
nps=${NPS:-"2 4"}
shapes=${SHAPES:-"128:256 512:256"}
blocks=${BLOCKS:-2}
threads=${THREADS:-1}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
[ "${CALIBRATE:-0}" = 1 ] && export XDG_CACHE_HOME=$out/cache
train=()
[ "${TRAIN:-0}" = 1 ] && train=(--train)
layers=()
[ "${LAYERS:-0}" = 1 ] && layers=(--profile)
mpi=(mpirun)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)

# Adds the fixed mixed list to a plan JSON (one list for every block).
mix() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))
heads = ["msa_att_row", "tri_att_start", "tri_att_end"]
channels = ["msa_transition", "outer_product_mean", "tri_mul_out", "tri_mul_in",
            "pair_transition"]
p["partitions"] = [[{"layer": l, "split": "heads"} for l in heads] +
                   [{"layer": l, "split": "channels"} for l in channels]]
json.dump(p, open(sys.argv[2], "w"))
EOF
}

echo "# out: $out  blocks=$blocks threads=$threads train=${TRAIN:-0}"
printf '%-3s %-8s %-6s %11s %11s %11s %9s %9s %9s %9s %-4s %6s\n' np shape plan est_ms wall_ms \
  cpu_ms est/dap wall/dap cpu/dap est/meas by load1
for np in $nps; do
  over=()
  [ "$np" -gt 2 ] && over=(--oversubscribe)
  # This machine's profile (calibrated by this first plan if missing) and its collectives over np
  # ranks, measured under mpirun and cached with it (link_by_ranks), before any plan is made.
  OMP_NUM_THREADS=$threads "$fc" plan --s 8 --r 8 --blocks 1 >/dev/null
  "${mpi[@]}" -np "$np" "${over[@]}" "$fc" profile link --threads "$threads" | sed 's/^/# /'
  for sh in $shapes; do
    s=${sh%%:*} r=${sh##*:}
    base=$out/np${np}_s${s}_r${r}
    common=(--s "$s" --r "$r" --blocks "$blocks" --dap "$np" --devices "$np" "${train[@]}")
    OMP_NUM_THREADS=$threads "$fc" plan "${common[@]}" --split-policy dap --out "$base.dap.json" \
      >/dev/null
    OMP_NUM_THREADS=$threads "$fc" plan "${common[@]}" --split-policy auto \
      --out "$base.auto.json" >/dev/null
    mix "$base.dap.json" "$base.mixed.json"
    kinds="dap mixed"
    if python3 -c "import json,sys; sys.exit(0 if json.load(open('$base.auto.json')).get('partitions') else 1)"; then
      kinds="dap auto mixed"
    else
      echo "# np=$np ($s, $r): auto keeps pure DAP (the model says DAP wins)"
    fi
    for kind in $kinds; do
      "${mpi[@]}" -np "$np" "${over[@]}" "$fc" run --plan "$base.$kind.json" --threads "$threads" \
        "${layers[@]}" --report "$base.$kind.report.json" >"$base.$kind.log" 2>&1
      load=$(cut -d' ' -f1 /proc/loadavg)
      python3 - "$base" "$kind" "$np" "$s:$r" "$load" "$(nproc)" <<'EOF'
import json, sys
base, kind, np, shape, load, cores = sys.argv[1:]
j = json.load(open(f"{base}.{kind}.report.json"))
d = json.load(open(f"{base}.dap.report.json"))
by_cpu = float(load) > int(cores)
meas = j["cpu_ms"] if by_cpu else j["time_ms"]
print(f"{np:<3} {shape:<8} {kind:<6} {j['time_ms_estimate']:11.1f} {j['time_ms']:11.1f} "
      f"{j['cpu_ms']:11.1f} {j['time_ms_estimate'] / d['time_ms_estimate']:9.3f} "
      f"{j['time_ms'] / d['time_ms']:9.3f} {j['cpu_ms'] / d['cpu_ms']:9.3f} "
      f"{j['time_ms_estimate'] / meas:9.3f} {'cpu' if by_cpu else 'wall':<4} {load:>6}")
EOF
    done
  done
done
