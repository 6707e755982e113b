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
