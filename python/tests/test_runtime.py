"""The package's process-wide defaults."""

import os
import subprocess
import sys

PROBE = "import os, foldcube; print(os.environ.get('OMP_WAIT_POLICY', '-'))"


def _policy_after_import(env):
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _base_env():
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


def test_import_asks_for_passive_openmp_waiting():
    assert _policy_after_import(_base_env()) == "passive"


def test_users_openmp_policy_is_kept():
    assert _policy_after_import(_base_env() | {"OMP_WAIT_POLICY": "active"}) == "active"
    assert _policy_after_import(_base_env() | {"GOMP_SPINCOUNT": "1000"}) == "-"


ALLOC_PROBE = """
import foldcube, numpy as np
foldcube.configure_allocator(reuse_large_blocks=True)
ev = foldcube.Evoformer.random({"c_m": 16, "c_z": 8, "no_blocks": 1}, seed=1)
rng = np.random.default_rng(0)
m0 = rng.standard_normal((4, 64, 16), dtype=np.float32)
z0 = rng.standard_normal((64, 64, 8), dtype=np.float32)
outs = [ev(m0.copy(), z0.copy())[1] for _ in range(3)]
assert all(np.array_equal(outs[0], o) for o in outs[1:])
try:
    foldcube.configure_allocator(True)
except TypeError:
    print("ok")
"""


def test_configure_allocator_opts_in_and_keeps_results():
    # In a child process: the tuning is process-wide and cannot be undone.
    r = subprocess.run([sys.executable, "-c", ALLOC_PROBE], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
