#!/usr/bin/env bash
# bf16 vs fp32 under DAP (issue 15): `mpirun -np N foldcube run --dap N` on the Evoformer stack,
# forward and training step, fp32 then bf16 in the same run, one thread per rank, AF2 model_1
# dims, random weights. Prints the same-run oneDNN GEMM rates (f32 and bf16 inputs, one thread,
# the MSA transition's second product at (128, 256): M = 32768, N = 256, K = 1024) before and
# after, the load average before each row, the median times, every rank's tracked peak (and,
# training, activations), the time inside the blocks' collectives and the bytes each rank sent,
# then the fp32/bf16 ratios of the same run. OMP_WAIT_POLICY is passed through.
# Usage: bench/dap_bf16.sh [build_dir] [ranks] [s] [r] [blocks] [policy]
set -euo pipefail
build=${1:-build}
n=${2:-2}
s=${3:-128}
r=${4:-256}
blocks=${5:-2}
policy=${6:-none}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mpi="mpirun -np $n --oversubscribe"
[ "$(id -u)" = 0 ] && mpi="$mpi --allow-run-as-root"

gemm_rates() {
  [ -x "$build/gemm_bench" ] || { echo "GEMM rates: $build/gemm_bench not built"; return; }
  OMP_NUM_THREADS=1 "$build/gemm_bench" \
    --benchmark_filter='BM_(Sgemm|Bf16gemm)_oneDNN/32768/256/1024/' --benchmark_repetitions=3 \
    --benchmark_report_aggregates_only=true --benchmark_format=json 2>/dev/null |
    python3 -c '
import json, sys
rates = {b["name"].split("/")[0]: b["GFLOP/s"] / 1e9 for b in json.load(sys.stdin)["benchmarks"]
         if b.get("aggregate_name") == "median"}
print("GEMM 32768x256x1024, 1 thread, median of 3: f32 %.1f GFLOP/s, bf16 inputs %.1f GFLOP/s (%.2fx)" % (
    rates["BM_Sgemm_oneDNN"], rates["BM_Bf16gemm_oneDNN"],
    rates["BM_Bf16gemm_oneDNN"] / rates["BM_Sgemm_oneDNN"]))'
}

echo "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset}; $n ranks x 1 thread; s=$s r=$r blocks=$blocks"
gemm_rates
job="run --dap $n --s $s --r $r --blocks $blocks --threads 1 --quiet"
printf '| run | dtype | load (1 min) | time ms (median) | rank peaks MiB | rank activations MiB | collectives ms/rank | sent MiB/rank |\n'
printf '|---|---|---|---|---|---|---|---|\n'
for mode in forward training; do
  for dt in fp32 bf16; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [ "$mode" = forward ]; then
      $mpi "$build/foldcube" $job --dtype "$dt" --warmup 1 --repeats 3 --report "$tmp/$mode.$dt.json"
    else
      $mpi "$build/foldcube" $job --dtype "$dt" --backward --policy "$policy" --warmup 1 \
        --repeats 2 --report "$tmp/$mode.$dt.json"
    fi
    python3 - "$tmp/$mode.$dt.json" "$mode" "$dt" "$load" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
M = 2.0**20
fwd = sys.argv[2] == "forward"
peaks = j["rank_peak_tracked_bytes"] if fwd else j["rank_step_peak_bytes"]
act = "" if fwd else " / ".join(f"{b/M:.1f}" for b in j["rank_activation_bytes"])
coll = (j["rank_block_collective_ms"] if fwd else
        [a + b for a, b in zip(j["rank_forward_collective_ms"], j["rank_backward_collective_ms"])])
sent = (j["block_sent_bytes_per_rank"] * j["blocks"] if fwd else
        j["forward_sent_bytes_per_rank"] + j["backward_sent_bytes_per_rank"] +
        j["grad_all_reduce_bytes_per_rank"])
what = "forward" if fwd else f"training step ({j['policy']})"
print(f"| {what} | {sys.argv[3]} | {sys.argv[4]} | {j['time_ms']:.0f} | "
      f"{' / '.join(f'{b/M:.1f}' for b in peaks)} | {act} | "
      f"{' / '.join(f'{c:.0f}' for c in coll)} | {sent/M:.2f} |")
PY
  done
done
gemm_rates
echo
for mode in forward training; do
  python3 - "$tmp/$mode.fp32.json" "$tmp/$mode.bf16.json" "$mode" <<'PY'
import json, sys
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
fwd = sys.argv[3] == "forward"
pk = "rank_peak_tracked_bytes" if fwd else "rank_step_peak_bytes"
line = (f"{sys.argv[3]}: fp32/bf16 time = {a['time_ms']/b['time_ms']:.2f}x; "
        f"peak bf16/fp32 = {max(b[pk])/max(a[pk]):.3f} (max over ranks)")
if not fwd:
    line += (f", forward {a['forward_ms']/b['forward_ms']:.2f}x, backward "
             f"{a['backward_ms']/b['backward_ms']:.2f}x, activations bf16/fp32 = "
             f"{max(b['rank_activation_bytes'])/max(a['rank_activation_bytes']):.3f}")
print(line)
PY
done
