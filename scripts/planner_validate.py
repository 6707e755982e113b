#!/usr/bin/env python3
"""Planner validation: the cost model's estimates beside measured times on this machine.

Calibrates a fresh profile, then for each s:r runs (a) one inference pass with per-module times
(`foldcube run --profile`) and (b) training steps per recompute policy: the plan of that policy
(`foldcube plan --policy P --out`, its chunk target chosen by the planner) run by
`foldcube run --plan FILE --backward`, so the measured step has exactly the planned chunking;
and prints a markdown table of estimate vs measured (wall time, and CPU time per step). Every measurement is the minimum over
--trials processes (the calibration takes the best of 5 per kernel): on a shared machine the
minimum is the closest to an undisturbed run. Usage:
  scripts/planner_validate.py [--exe build/foldcube] [--shapes 64:128,128:256] [--blocks 1]
"""
import argparse, json, os, subprocess, sys, tempfile

MODULES = ["msa_att_row", "msa_att_col", "msa_transition", "outer_product_mean", "tri_mul_out",
           "tri_mul_in", "tri_att_start", "tri_att_end", "pair_transition"]


def run(args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", default="build/foldcube")
    ap.add_argument("--shapes", default="64:128,128:256")
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--policies", default="none,module,block")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    prof = os.path.join(tmp, "profile.json")
    run([a.exe, "plan", "--calibrate", "--profile", prof, "--memory", "20GiB", "--json"])
    print("profile:", json.dumps(json.load(open(prof))))
    print("load before:", open("/proc/loadavg").read().split()[:3])
    for shape in a.shapes.split(","):
        s, r = shape.split(":")
        common = ["--s", s, "--r", r, "--blocks", str(a.blocks)]
        plan = json.loads(run([a.exe, "plan", *common, "--memory", "20GiB", "--profile", prof,
                               "--json"]))
        rep = os.path.join(tmp, "inf.json")
        meas = {"module_ms": {}, "time_ms": float("inf")}
        for _ in range(a.trials):
            run([a.exe, "run", *common, "--profile", "--warmup", "1", "--repeats", "3", "--quiet",
                 "--report", rep])
            one = json.load(open(rep))
            meas["time_ms"] = min(meas["time_ms"], min(one["times_ms"]))
            for m, t in one["module_ms"].items():
                meas["module_ms"][m] = min(meas["module_ms"].get(m, float("inf")), t)
        print(f"\n### s={s} r={r}, inference, {a.blocks} block(s)\n")
        print("| module | estimate ms | measured ms | est/meas |")
        print("|---|---|---|---|")
        est = {c["module"]: c["forward_ms"] * a.blocks for c in plan["module_costs_per_block"]}
        for m in MODULES:
            e, t = est[m], meas["module_ms"][m]
            print(f"| {m} | {e:.1f} | {t:.1f} | {e / t:.2f} |")
        e, t = plan["time_ms_estimate"], meas["time_ms"]
        print(f"| **forward pass** | {e:.1f} | {t:.1f} | {e / t:.2f} |")
        print(f"\n### s={s} r={r}, training step, {a.blocks} block(s)\n")
        print("| policy | chunk target MiB | estimate ms (fwd + bwd + recompute) | "
              "measured ms (fwd + bwd) | est/meas | CPU ms |")
        print("|---|---|---|---|---|---|")
        plan_file = os.path.join(tmp, "plan.json")
        for pol in a.policies.split(","):
            plan = json.loads(run([a.exe, "plan", *common, "--train", "--memory", "20GiB",
                                   "--devices", "1", "--policy", pol, "--profile", prof,
                                   "--json", "--out", plan_file]))
            meas = None
            for _ in range(a.trials):
                run([a.exe, "run", "--plan", plan_file, "--plan-profile", prof, "--backward",
                     "--warmup", "1", "--quiet", "--report", rep])
                one = json.load(open(rep))
                if meas is None or one["time_ms"] < meas["time_ms"]:
                    meas = one
            e = plan["time_ms_estimate"]
            print(f"| {pol} | {plan['chunk_target_bytes'] / 2**20:.1f} | {e:.0f} "
                  f"({plan['forward_ms_estimate']:.0f} + "
                  f"{plan['backward_ms_estimate']:.0f} + {plan['recompute_ms_estimate']:.0f}) | "
                  f"{meas['time_ms']:.0f} ({meas['forward_ms']:.0f} + {meas['backward_ms']:.0f}) | "
                  f"{e / meas['time_ms']:.2f} | {meas['cpu_ms']:.0f} |")
    print("\nload after:", open("/proc/loadavg").read().split()[:3])


if __name__ == "__main__":
    sys.exit(main())
