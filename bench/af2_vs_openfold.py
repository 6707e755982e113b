#!/usr/bin/env python3
"""The whole AlphaFold2 model, foldcube beside OpenFold, in one run on this machine.

For each residue count, runs `foldcube run --model af2` (random weights and features) and
../shared/peer/bench_model_peer.py (OpenFold's AlphaFold on CPU, random weights) with the same
sizes and threads, back to back, and prints per-stage seconds and the ratio, beside the same-run
SGEMM rate (build/gemm_bench, n = 2048) and the load average before and after each run.

OpenFold runs with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (its fair configuration, see
../shared/peer/README.md); foldcube keeps the environment it is given.

Usage (from the repository root; needs OpenFold in /tmp/openfold, ../shared/peer/setup.sh):
  python3 bench/af2_vs_openfold.py [--r 128,256,384] [--clusters 128] [--extra 1024]
      [--templates 4] [--blocks 48] [--recycles 1] [--threads 2] [--dtypes fp32,bf16]
      [--out-json F]
--dtypes runs foldcube once per dtype (`run --dtype`; bf16: bf16 GEMM inputs in the stacks);
OpenFold runs fp32.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "..", "shared", "peer", "bench_model_peer.py")

# foldcube stage -> OpenFold stage (bench_model_peer.py's stage names)
STAGES = [("input_embedder+recycling_embedder", "input_embedding"),
          ("template_embedder", "template"), ("extra_msa_stack", "extra_msa"),
          ("evoformer", "evoformer"), ("structure_module", "structure_module"),
          ("heads", "heads")]


def load():
    return os.getloadavg()[0]


def sgemm_gflops(threads):
    exe = os.path.join(ROOT, "build", "gemm_bench")
    if not os.path.exists(exe):
        return None
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([exe, "--benchmark_filter=BM_Sgemm_oneDNN/2048/2048/2048",
                          "--benchmark_format=json", "--benchmark_repetitions=3",
                          "--benchmark_report_aggregates_only=true"],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return None
    for b in json.loads(out.stdout)["benchmarks"]:
        if b.get("aggregate_name") == "median":
            return b["GFLOP/s"] / 1e9  # the counter is in FLOP/s
    return None


def run_foldcube(a, r, tmp, dtype):
    rep = os.path.join(tmp, f"fc_{r}_{dtype}.json")
    cmd = [os.path.join(ROOT, "build", "foldcube"), "run", "--model", "af2", "--r", str(r),
           "--s", str(a.clusters), "--extra", str(a.extra), "--templates", str(a.templates),
           "--blocks", str(a.blocks), "--recycles", str(a.recycles), "--threads",
           str(a.threads), "--dtype", dtype, "--report", rep, "--quiet"]
    l0 = load()
    subprocess.run(cmd, check=True)
    rep = json.load(open(rep))
    stages = {}
    evo_gflop = 0.0  # the Evoformer's matmul GFLOP over the passes (the report's per-pass figure)
    for s in rep["stages"]:
        stages[s["stage"]] = stages.get(s["stage"], 0.0) + s["ms"] / 1e3
        evo_gflop += s.get("gflop", 0.0)
    stages["input_embedder+recycling_embedder"] = (stages.pop("input_embedder", 0.0) +
                                                   stages.pop("recycling_embedder", 0.0))
    return {"total_s": rep["time_ms"] / 1e3, "stages_s": stages, "evoformer_gflop": evo_gflop,
            "peak_tracked_mib": rep["peak_tracked_bytes"] / 2**20,
            "peak_rss_mib": rep["peak_rss_bytes"] / 2**20, "load": [l0, load()]}


def run_openfold(a, r, tmp):
    out = os.path.join(tmp, f"of_{r}.json")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    cmd = ["/usr/bin/python3", PEER, "--preset", "model_1_ptm", "--evoformer-blocks",
           str(a.blocks), "--r", str(r), "--msa-clusters", str(a.clusters), "--extra-msa",
           str(a.extra), "--templates", str(a.templates), "--recycles", str(a.recycles),
           "--threads", str(a.threads), "--out-json", out]
    if a.peer_chunk:
        cmd += ["--chunk-size", str(a.peer_chunk)]
    l0 = load()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    j = json.load(open(out))
    return {"total_s": j["timing"]["total_s"], "stages_s": j["timing"]["stages_s"],
            "peak_rss_mib": j["memory"]["peak_rss_mib"], "load": [l0, load()]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--r", default="128,256,384")
    p.add_argument("--clusters", type=int, default=128)
    p.add_argument("--extra", type=int, default=1024)
    p.add_argument("--templates", type=int, default=4)
    p.add_argument("--blocks", type=int, default=48)
    p.add_argument("--recycles", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer-chunk", type=int, default=0, help="OpenFold chunk size (0: none)")
    p.add_argument("--dtypes", default="fp32", help="foldcube dtypes, e.g. fp32,bf16")
    p.add_argument("--out-json")
    a = p.parse_args()
    dtypes = a.dtypes.split(",")
    if not os.path.exists(PEER):
        sys.exit(f"{PEER} not found")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gemm = sgemm_gflops(a.threads)
        for r in [int(x) for x in a.r.split(",")]:
            fcs = {d: run_foldcube(a, r, tmp, d) for d in dtypes}
            fc = fcs[dtypes[0]]
            of = run_openfold(a, r, tmp)
            rows.append({"r": r, "foldcube": fcs, "openfold": of})
            print(f"\nr={r} S={a.clusters} E={a.extra} T={a.templates} blocks={a.blocks} "
                  f"passes={a.recycles + 1} threads={a.threads}  (SGEMM {gemm or 0:.0f} GFLOP/s; "
                  f"load {fc['load'][0]:.1f}->{fc['load'][1]:.1f} / "
                  f"{of['load'][0]:.1f}->{of['load'][1]:.1f})")
            head = "".join(f" {'fc ' + d + ' s':>11s} {'ratio':>7s}" for d in dtypes)
            print(f"  {'stage':36s}{head} {'OpenFold s':>11s}")
            for fs, os_ in STAGES + [("total", "total")]:
                t2 = of["total_s"] if os_ == "total" else of["stages_s"].get(os_, 0.0)
                line = ""
                for d in dtypes:
                    f = fcs[d]
                    t1 = f["total_s"] if fs == "total" else f["stages_s"].get(fs, 0.0)
                    ratio = f"{t2 / t1:7.2f}" if t1 > 0 and t2 > 0 else "      -"
                    line += f" {t1:11.2f} {ratio}"
                print(f"  {fs:36s}{line} {t2:11.2f}")
            for d in dtypes:
                g, t = fcs[d]["evoformer_gflop"], fcs[d]["stages_s"].get("evoformer", 0.0)
                if g > 0 and t > 0:
                    pct = f", {100 * g / t / gemm:.0f} % of the same-run SGEMM" if gemm else ""
                    print(f"  Evoformer {d}: {g:.0f} GFLOP (matmuls) in {t:.2f} s = "
                          f"{g / t:.0f} GFLOP/s{pct}")
            for d in dtypes:
                print(f"  peak RSS MiB: foldcube {d} {fcs[d]['peak_rss_mib']:.0f} (tracked "
                      f"{fcs[d]['peak_tracked_mib']:.0f})")
            print(f"  peak RSS MiB: OpenFold {of['peak_rss_mib']:.0f}")
    if a.out_json:
        with open(a.out_json, "w") as f:
            json.dump({"sgemm_gflops": gemm, "args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
