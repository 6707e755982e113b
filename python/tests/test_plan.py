"""foldcube.plan: the planner's estimates as an object the stack calls accept."""

import json

import numpy as np
import pytest

import foldcube
from conftest import REPO, data_path, golden, stack_inputs

PROFILE = str(REPO / "docs" / "profiles" / "this-machine-2026-11-23-2threads.json")
CFG = {"c_m": 32, "c_z": 16, "c_hidden_msa_att": 8, "no_heads_msa": 4, "c_hidden_pair_att": 8,
       "no_heads_pair": 2, "c_hidden_opm": 8, "c_hidden_mul": 16, "c_s": 24}


def test_plan_holds_the_estimates():
    p = foldcube.plan(s=128, r=256, blocks=48, train=True, memory="8GiB", profile=PROFILE)
    assert isinstance(p, foldcube.Plan)
    assert p.training and p.blocks == 48 and p.s == 128 and p.r == 256
    assert len(p.policy) == 48 and set(p.policy) <= {"none", "module", "block"}
    assert 0 < p.peak_bytes <= 8 * 2**30 == p.memory_limit_bytes and p.fits
    assert p.time_ms > 0 and p.activation_bytes > 0 and p.dtype == "fp32"
    d = json.loads(p.to_json())
    assert d["s"] == 128
    assert foldcube.Plan.from_json(p.to_json()).peak_bytes == p.peak_bytes
    assert "training" in repr(p)


def test_plan_refuses_an_impossible_budget():
    with pytest.raises(MemoryError):
        foldcube.plan(s=128, r=256, blocks=48, train=True, memory="1MiB", profile=PROFILE)
    with pytest.raises(ValueError, match="dtype"):
        foldcube.plan(s=8, r=8, blocks=1, dtype="fp8", profile=PROFILE)


def test_a_plan_drives_a_training_step_and_a_forward():
    s, r, blocks = 16, 48, 2
    ev = foldcube.Evoformer.random(dict(CFG, no_blocks=blocks), seed=2)
    rng = np.random.default_rng(0)
    m = rng.standard_normal((s, r, 32)).astype(np.float32)
    z = rng.standard_normal((r, r, 16)).astype(np.float32)
    gm, gz = rng.standard_normal(m.shape).astype(np.float32), rng.standard_normal(z.shape).astype(np.float32)
    p = foldcube.plan(s=s, r=r, blocks=blocks, train=True, memory="64MiB", config=CFG,
                      profile=PROFILE)
    planned = ev.train_step(m.copy(), z.copy(), gm, gz, plan=p)
    plain = ev.train_step(m.copy(), z.copy(), gm, gz)
    np.testing.assert_allclose(planned["grad_m"], plain["grad_m"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="plan"):
        ev.train_step(m.copy(), z.copy(), gm, gz, plan=p, policy="block")
    pi = foldcube.plan(s=s, r=r, blocks=blocks, memory="64MiB", config=CFG, profile=PROFILE)
    ev(m, z, plan=pi)
    with pytest.raises(ValueError, match="training plan"):
        ev(m, z, plan=p)
    with pytest.raises(ValueError, match="s=16, r=48"):
        ev(m[:8].copy(), z, plan=pi)


def _normwise(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def test_a_bf16_plan_runs_the_stacks_in_bf16():
    """plan(dtype="bf16") on the engine's layout is `run --dtype bf16`: the stack's forward takes
    bf16 GEMM inputs and its training step keeps bf16 layer inputs, within the bf16 tolerances of
    the golden reference (normwise 1e-2 forward, 2e-2 outputs and 0.1 dL/d inputs in training;
    tests/fused_test.cc, tests/train_bf16_test.cc) and far from the fp32 results."""
    t, _ = golden("evo_tiny")
    ev = foldcube.Evoformer.load(data_path("evo_tiny.safetensors"))
    s, r = t["input.m"].shape[:2]
    kw = dict(s=s, r=r, blocks=2, memory="256MiB", config=CFG, profile=PROFILE)
    p16 = foldcube.plan(dtype="bf16", **kw)
    assert p16.dtype == "bf16" and not p16.training
    m, z, mm, pm = stack_inputs(t)
    ev(m, z, mm, pm, plan=p16)
    m32, z32, _, _ = stack_inputs(t)
    ev(m32, z32, mm, pm)
    e16, e32 = _normwise(m, t["output.m"]), _normwise(m32, t["output.m"])
    assert e16 < 1e-2 and _normwise(z, t["output.z"]) < 1e-2
    assert e16 > 10 * e32
    t16 = foldcube.plan(dtype="bf16", train=True, **kw)
    m, z, mm, pm = stack_inputs(t)
    res = ev.train_step(m, z, t["probe.m"], t["probe.z"], msa_mask=mm, pair_mask=pm, plan=t16)
    m32, z32, _, _ = stack_inputs(t)
    res32 = ev.train_step(m32, z32, t["probe.m"], t["probe.z"], msa_mask=mm, pair_mask=pm)
    assert _normwise(res["m"], t["output.m"]) < 2e-2
    assert _normwise(res["grad_z"], t["grad.input.z"]) < 0.1
    assert _normwise(res["grad_z"], t["grad.input.z"]) > 10 * _normwise(res32["grad_z"],
                                                                          t["grad.input.z"])
    assert res["activation_bytes"] < res32["activation_bytes"]
    with pytest.raises(ValueError, match="fp16"):
        ev(m, z, mm, pm, plan=foldcube.plan(dtype="fp16", **kw))


SLOW_LINK = {"name": "slow-link", "threads": 1, "gemm_gflops": 400, "gemm_half_rows": 300,
             "gemm_bwd_gflops": 300, "batched_gflops": 250, "attention_gflops": 250,
             "attention_bwd_gflops": 150, "attention_len_exp": 0.2, "mem_gbps": 15,
             "link_gbps": 0.001, "link_latency_us": 20, "devices": 2}


def test_split_policy_mirrors_the_cli(tmp_path):
    """plan(split_policy=) is `foldcube plan --split-policy`: "auto" picks each layer's partition
    for the DAP degree (with a very slow link, whole-stream layers save it: partitions per block,
    as tests/dap_cli_test.cc's PlanWithPartitionsRunsOnTwoRanks), "dap" keeps pure DAP; the JSON
    carries them; anything else is a ValueError."""
    prof = tmp_path / "slow_link.json"
    prof.write_text(json.dumps(SLOW_LINK))
    kw = dict(s=8, r=24, blocks=2, train=True, memory="1GiB", devices=2, dap=2, dp=1,
              policy="module", profile=str(prof))
    auto = foldcube.plan(split_policy="auto", **kw)
    pure = foldcube.plan(**kw)
    assert auto.dap == 2 and pure.dap == 2
    assert pure.partitions == []
    assert len(auto.partitions) == 2
    splits = {split for block in auto.partitions for _, split in block}
    assert splits and splits <= {"heads", "channels", "replicated", "dap"}
    assert splits != {"dap"}
    assert len(json.loads(auto.to_json())["partitions"]) == 2
    assert foldcube.Plan.from_json(auto.to_json()).partitions == auto.partitions
    with pytest.raises(ValueError, match="split_policy"):
        foldcube.plan(split_policy="heads", **kw)
    with pytest.raises(ValueError, match="dap, dp"):
        foldcube.plan(**dict(kw, dap=0))
