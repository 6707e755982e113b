"""Memory: a memory budget keeps the tracked peak under it; inputs are never copied."""

import numpy as np
import pytest

import foldcube

CFG = {"c_m": 32, "c_z": 16, "c_hidden_msa_att": 8, "no_heads_msa": 4, "c_hidden_pair_att": 8,
       "no_heads_pair": 2, "c_hidden_opm": 8, "c_hidden_mul": 16, "no_blocks": 1, "c_s": 24}


def inputs(s, r, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((s, r, 32)).astype(np.float32),
            rng.standard_normal((r, r, 16)).astype(np.float32))


def test_memory_budget_keeps_the_tracked_peak_under_it():
    ev = foldcube.Evoformer.random(CFG, seed=1)
    s, r = 16, 160
    m, z = inputs(s, r)
    with foldcube.MemoryScope() as free:
        ref_m, ref_z, _ = ev(m.copy(), z.copy())
    mz = m.nbytes + z.nbytes
    unbudgeted = free.peak_bytes + mz  # tracked peak of the default chunking plus m and z
    # half the default plan's work: below it, above the smallest feasible budget (one item per chunk)
    budget = free.start_bytes + mz + (free.peak_bytes - free.start_bytes) // 2
    assert budget < unbudgeted
    with foldcube.MemoryScope() as ms:
        ev(m, z, memory_budget=budget)
    assert ms.peak_bytes + mz <= budget
    np.testing.assert_allclose(m, ref_m, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(z, ref_z, rtol=2e-4, atol=2e-4)


def test_an_infeasible_budget_names_the_smallest_feasible_one():
    ev = foldcube.Evoformer.random(CFG, seed=1)
    m, z = inputs(8, 64)
    with pytest.raises(MemoryError, match="smallest"):
        ev(m, z, memory_budget=m.nbytes + z.nbytes)


def test_inputs_are_not_copied_into_tracked_memory():
    ev = foldcube.Evoformer.random(CFG, seed=1)
    m, z = inputs(8, 64)
    addresses = (m.ctypes.data, z.ctypes.data)
    live0 = foldcube.memory_stats()["live_bytes"]
    out_m, out_z, s = ev(m, z)
    # Work buffers come and go; what stays is s only (m and z are the caller's arrays).
    assert out_m is m and out_z is z
    assert (out_m.ctypes.data, out_z.ctypes.data) == addresses
    assert foldcube.memory_stats()["live_bytes"] - live0 == s.nbytes
