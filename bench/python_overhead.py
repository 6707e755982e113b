"""Call overhead of the Python API: a forward of the tiny golden Evoformer case through
foldcube.Evoformer against the same library call timed inside C++ (`foldcube run --repeats`),
alternating, in one run. Usage: .venv/bin/python bench/python_overhead.py [build/foldcube]"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import foldcube

REPO = pathlib.Path(__file__).resolve().parents[1]
CASE = str(REPO / "tests" / "data" / "evo_tiny.safetensors")
REPEATS, WARMUP, ROUNDS, THREADS = 400, 40, 3, 1


def python_ms(ev, t):
    m0, z0 = t["input.m"], t["input.z"]
    mm, pm = t["input.msa_mask"], t["input.pair_mask"]
    m, z = m0.copy(), z0.copy()
    times = []
    for i in range(WARMUP + REPEATS):
        np.copyto(m, m0)  # fresh inputs, outside the timed call (as the CLI's clones)
        np.copyto(z, z0)
        t0 = time.perf_counter()
        ev(m, z, mm, pm)
        if i >= WARMUP:
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def cpp_ms(cli):
    with tempfile.TemporaryDirectory() as d:
        report = os.path.join(d, "r.json")
        subprocess.run([cli, "run", "--weights", CASE, "--inputs", CASE, "--repeats",
                        str(REPEATS), "--warmup", str(WARMUP), "--threads", str(THREADS),
                        "--report", report], check=True, capture_output=True)
        return json.load(open(report))["time_ms"]


def main():
    cli = sys.argv[1] if len(sys.argv) > 1 else str(REPO / "build" / "foldcube")
    foldcube.set_num_threads(THREADS)
    ev = foldcube.Evoformer.load(CASE)
    t, _ = foldcube.read_file(CASE)
    print(f"evo_tiny forward, {THREADS} thread(s), median of {REPEATS} calls")
    print("round  C++ ms   Python ms  overhead  load average")
    for k in range(ROUNDS):
        c = cpp_ms(cli)
        p = python_ms(ev, t)
        print(f"{k:5d}  {c:7.4f}  {p:9.4f}  {100 * (p / c - 1):+7.1f} %  {os.getloadavg()}")


if __name__ == "__main__":
    main()
