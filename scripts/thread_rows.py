#!/usr/bin/env python3
"""Measures this machine's fit-table rows at 1 and 2 threads per process and under `mpirun -np 2`
(DAP 2, 1 thread per rank): the rows `foldcube profile fit --fit-threads 1` fits on and predicts
(issue 20). Prints the 13-column CSV (time_ms = wall, or with --cpu the process CPU time divided
by the thread count, the largest rank's) with the load average of each run in a comment.

    python3 scripts/thread_rows.py --exe build/foldcube [--cpu] [--no-mpi] > rows.csv
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

# (s, r, blocks, policy or None for inference)
CASES = [(32, 64, 2, "none"), (32, 64, 2, "module"), (32, 64, 2, "block"), (32, 128, 2, "none"),
         (32, 128, 2, "module"), (64, 128, 2, "none"), (32, 128, 2, None), (64, 128, 4, None)]
MPI_CASES = [(32, 64, 2, "none"), (32, 128, 2, "none"), (32, 128, 2, "module"), (64, 128, 4, None)]


def load():
    return os.getloadavg()[0]


def run_row(exe, tmp, s, r, blocks, policy, threads, dap, cpu):
    plan = os.path.join(tmp, "p.json")
    rep = os.path.join(tmp, "r.json")
    cmd = [exe, "plan", "--s", str(s), "--r", str(r), "--blocks", str(blocks), "--dp", "1",
           "--dap", str(dap), "--devices", str(dap), "--out", plan]
    if policy:
        cmd += ["--train", "--policy", policy, "--chunk-target", "64GiB"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    run = [exe, "run", "--plan", plan, "--threads", str(threads), "--warmup", "1", "--report", rep]
    if policy:
        run.append("--backward")
    if dap > 1:
        run = ["mpirun", "--allow-run-as-root", "-np", str(dap)] + run
    before = load()
    subprocess.run(run, check=True, stdout=subprocess.DEVNULL)
    j = json.load(open(rep))
    if cpu:
        t = max(j.get("rank_cpu_ms", [j["cpu_ms"]])) / threads
    else:
        t = j["time_ms"]
    act = j["activation_bytes"] / 2**20 if policy else None
    cells = [s, r, blocks, 1 if policy else 0, policy or "", dap, dap, "fp32", "%.1f" % t,
             "%.2f" % (j["peak_tracked_bytes"] / 2**20), "" if act is None else "%.2f" % act,
             threads, ""]
    return ",".join(str(c) for c in cells), before, load(), j


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", default="build/foldcube")
    ap.add_argument("--cpu", action="store_true", help="time_ms = CPU time / threads")
    ap.add_argument("--no-mpi", action="store_true")
    a = ap.parse_args()
    print("s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb,threads,stack")
    tmp = tempfile.mkdtemp()
    try:
        sets = [(1, 1, CASES), (2, 1, CASES)] + ([] if a.no_mpi else [(1, 2, MPI_CASES)])
        for threads, dap, cases in sets:
            print("# %d thread(s) per process, %d process(es)" % (threads, dap))
            for s, r, blocks, policy in cases:
                line, l0, l1, j = run_row(a.exe, tmp, s, r, blocks, policy, threads, dap, a.cpu)
                print("# load %.1f -> %.1f; wall %.1f ms, cpu %.1f ms, estimate %.1f ms"
                      % (l0, l1, j["time_ms"], j["cpu_ms"], j["time_ms_estimate"]))
                print(line)
                sys.stdout.flush()
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
