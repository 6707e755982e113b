"""Evoformer and Extra-MSA stacks through the Python API against the OpenFold golden cases."""

import numpy as np
import pytest

import foldcube
from conftest import data_path, golden, golden_err, stack_inputs

POLICIES = ["none", "module", "block", ["block", "module"]]


def policy_id(p):
    return p if isinstance(p, str) else "-".join(p)


def test_version_is_the_cmake_project_version():
    import re
    from conftest import REPO
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert foldcube.__version__ == re.search(r"project\(foldcube VERSION ([0-9.]+)", cmake)[1]


def test_evoformer_forward_matches_golden_without_copies():
    t, meta = golden("evo_tiny")
    ev = foldcube.Evoformer.load(data_path("evo_tiny.safetensors"))
    assert ev.config["c_m"] == 32 and ev.config["no_blocks"] == 2
    m, z, mm, pm = stack_inputs(t)
    m_addr, z_addr = m.ctypes.data, z.ctypes.data
    out_m, out_z, s = ev(m, z, mm, pm)
    # The outputs are the input arrays themselves, updated in place: no copy in or out.
    assert out_m is m and out_z is z
    assert out_m.ctypes.data == m_addr and out_z.ctypes.data == z_addr
    assert s.dtype == np.float32 and s.shape == (12, 24)
    assert golden_err(out_m, t["output.m"]) < 1e-4
    assert golden_err(out_z, t["output.z"]) < 1e-4
    assert golden_err(s, t["output.s"]) < 1e-4


def test_evoformer_chunked_forward_matches_golden():
    t, _ = golden("evo_tiny")
    ev = foldcube.Evoformer.load(data_path("evo_tiny.safetensors"))
    m, z, mm, pm = stack_inputs(t)
    ev(m, z, mm, pm, chunk=3, threads=1)
    assert golden_err(m, t["output.m"]) < 1e-4
    assert golden_err(z, t["output.z"]) < 1e-4


@pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
def test_evoformer_train_step_matches_golden_gradients(policy):
    t, meta = golden("evo_tiny")
    ev = foldcube.Evoformer.load(data_path("evo_tiny.safetensors"))
    m, z, mm, pm = stack_inputs(t)
    res = ev.train_step(m, z, t["probe.m"], t["probe.z"], msa_mask=mm, pair_mask=pm,
                        policy=policy)
    assert res["m"] is m and res["z"] is z
    assert golden_err(res["m"], t["output.m"]) < 1e-4
    assert golden_err(res["z"], t["output.z"]) < 1e-4
    assert golden_err(res["s"], t["output.s"]) < 1e-4
    assert golden_err(res["grad_m"], t["grad.input.m"]) < 2e-4
    assert golden_err(res["grad_z"], t["grad.input.z"]) < 2e-4
    names = [n[len("grad.param."):] for n in t if n.startswith("grad.param.")]
    assert sorted(res["grad_params"]) == sorted(names)
    for n in names:
        assert golden_err(res["grad_params"][n], t["grad.param." + n]) < 2e-4, n
    assert res["activation_bytes"] > 0 and res["peak_bytes"] >= res["activation_bytes"]


def test_train_step_gradients_do_not_depend_on_the_policy():
    t, _ = golden("evo_tiny")
    ev = foldcube.Evoformer.load(data_path("evo_tiny.safetensors"))
    runs = []
    for policy in ["none", "block"]:
        m, z, mm, pm = stack_inputs(t)
        runs.append(ev.train_step(m, z, t["probe.m"], t["probe.z"], msa_mask=mm, pair_mask=pm,
                                  policy=policy))
    np.testing.assert_array_equal(runs[0]["grad_m"], runs[1]["grad_m"])
    for n, g in runs[0]["grad_params"].items():
        np.testing.assert_array_equal(g, runs[1]["grad_params"][n])


def test_train_step_grad_s_adds_the_single_representation_term():
    t, _ = golden("evo_tiny")
    ev = foldcube.Evoformer.load(data_path("evo_tiny.safetensors"))
    w = ev.state_dict()["linear.weight"]  # [c_s, c_m]
    rng = np.random.default_rng(0)
    gs = rng.standard_normal((12, 24)).astype(np.float32)
    m, z, mm, pm = stack_inputs(t)
    gm = t["probe.m"].copy()
    with_s = ev.train_step(m, z, gm, t["probe.z"], gs, msa_mask=mm, pair_mask=pm)
    np.testing.assert_array_equal(gm, t["probe.m"])  # the caller's grad_m is untouched
    # The same step with dL/ds folded into dL/dm_out by hand.
    gm2 = t["probe.m"].copy()
    gm2[0] += gs @ w
    m2, z2, mm2, pm2 = stack_inputs(t)
    by_hand = ev.train_step(m2, z2, gm2, t["probe.z"], msa_mask=mm2, pair_mask=pm2)
    np.testing.assert_allclose(with_s["grad_m"], by_hand["grad_m"], rtol=1e-5, atol=1e-5)
    m_out0 = with_s["m"][0].astype(np.float64)
    np.testing.assert_allclose(with_s["grad_params"]["linear.weight"], gs.T.astype(np.float64) @ m_out0,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(with_s["grad_params"]["linear.bias"], gs.sum(0), rtol=1e-5,
                               atol=1e-5)


def test_dropout_is_seeded():
    t, _ = golden("evo_tiny")
    ev = foldcube.Evoformer.load(data_path("evo_tiny.safetensors"))
    outs = []
    for seed in [1, 1, 2]:
        m, z, mm, pm = stack_inputs(t)
        outs.append(ev.train_step(m, z, t["probe.m"], t["probe.z"], msa_mask=mm, pair_mask=pm,
                                  dropout=True, seed=seed)["grad_m"])
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    assert golden_err(outs[0], t["grad.input.m"]) > 1e-3  # dropout changed the step


def test_state_dict_round_trip():
    t, _ = golden("evo_tiny")
    ev = foldcube.Evoformer.load(data_path("evo_tiny.safetensors"))
    sd = ev.state_dict()
    assert not sd["linear.weight"].flags.writeable
    np.testing.assert_array_equal(sd["blocks.1.msa_att_row.mha.linear_q.weight"],
                                  t["blocks.1.msa_att_row.mha.linear_q.weight"])
    ev2 = foldcube.Evoformer.from_state_dict(sd)  # config inferred from the shapes
    m, z, mm, pm = stack_inputs(t)
    ev2(m, z, mm, pm)
    assert golden_err(m, t["output.m"]) < 1e-4


def test_random_evoformer_uses_the_config():
    ev = foldcube.Evoformer.random({"c_m": 16, "c_z": 8, "no_blocks": 1, "c_s": 12}, seed=3)
    rng = np.random.default_rng(1)
    m = rng.standard_normal((3, 5, 16)).astype(np.float32)
    z = rng.standard_normal((5, 5, 8)).astype(np.float32)
    _, _, s = ev(m, z)
    assert s.shape == (5, 12) and np.all(np.isfinite(m))


def test_extra_msa_forward_matches_golden():
    t, meta = golden("extra_tiny")
    ex = foldcube.ExtraMsaStack.load(data_path("extra_tiny.safetensors"))
    assert ex.config["c_m"] == 16
    m, z, mm, pm = stack_inputs(t)
    out_m, out_z = ex(m, z, mm, pm)
    assert out_m is m and out_z is z
    assert golden_err(m, t["output.m"]) < 1e-4
    assert golden_err(z, t["output.z"]) < 1e-4


@pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
def test_extra_msa_train_step_matches_golden_gradients(policy):
    t, meta = golden("extra_tiny")
    ex = foldcube.ExtraMsaStack.load(data_path("extra_tiny.safetensors"))
    m, z, mm, pm = stack_inputs(t)
    policy = policy if isinstance(policy, str) else policy[:1]  # one block in extra_tiny
    res = ex.train_step(m, z, t["probe.m"], t["probe.z"], msa_mask=mm, pair_mask=pm,
                        policy=policy, chunk=3)
    assert res["m"] is m and res["z"] is z
    assert golden_err(m, t["output.m"]) < 1e-4
    assert golden_err(z, t["output.z"]) < 1e-4
    assert golden_err(res["grad_m"], t["grad.input.m"]) < 2e-4
    assert golden_err(res["grad_z"], t["grad.input.z"]) < 2e-4
    grads = res["grad_params"]
    golden_params = [k for k in t if k.startswith("grad.param.")]
    assert len(grads) == len(golden_params)
    for k in golden_params:
        assert golden_err(grads[k[len("grad.param."):]], t[k]) < 2e-4, k


def test_stacks_of_a_whole_model_file():
    path = data_path("af2_model_tiny.safetensors")
    assert foldcube.Evoformer.load(path).config["c_m"] == 32
    assert foldcube.ExtraMsaStack.load(path).config["c_m"] == 16
