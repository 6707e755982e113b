"""Shared helpers of the foldcube pytest suite: golden files and the golden error metric."""

import os
import pathlib

# Before the library (and its OpenMP runtime) loads: idle kernel threads sleep instead of spinning
# (the CI machine's two cores are shared), as in the C++ suite.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import foldcube  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"


def data_path(name: str) -> str:
    p = DATA / name
    if not p.exists():
        pytest.skip(f"golden file not found: {p}")
    return str(p)


def golden(name: str):
    """(tensors, metadata) of tests/data/<name>.safetensors."""
    return foldcube.read_file(data_path(name + ".safetensors"))


def golden_err(x, ref) -> float:
    """The golden README's metric: max |x - ref| / max(rms(ref), 1)."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape
    assert np.all(np.isfinite(x))
    rms = np.sqrt(np.mean(ref * ref)) if ref.size else 0.0
    return float(np.max(np.abs(x - ref), initial=0.0) / max(rms, 1.0))


def stack_inputs(t):
    """Fresh writable copies of a golden file's inputs: m, z, msa_mask, pair_mask."""
    return (t["input.m"].copy(), t["input.z"].copy(), t["input.msa_mask"].copy(),
            t["input.pair_mask"].copy())


@pytest.fixture(autouse=True)
def _two_threads():
    """Tests run with two kernel threads (the CI machine's cores), as the C++ suite does."""
    foldcube.set_num_threads(2)
    yield
