"""foldcube.torch: an nn.Module under OpenFold names whose gradients equal the golden ones."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: foldcube.torch untested")

import foldcube  # noqa: E402
import foldcube.torch as fct  # noqa: E402
from conftest import data_path, golden, golden_err  # noqa: E402

DATA_PREFIXES = ("input.", "probe.", "output.", "trace.", "grad.")


def openfold_state_dict(t):
    return {k: torch.from_numpy(v.copy()) for k, v in t.items() if not k.startswith(DATA_PREFIXES)}


@pytest.mark.parametrize("policy", ["none", "module", "block"])
def test_load_state_dict_forward_backward_match_golden(policy):
    t, _ = golden("evo_tiny")
    config = foldcube.Evoformer.load(data_path("evo_tiny.safetensors")).config
    mod = fct.Evoformer(config, seed=123, policy=policy)
    mod.load_state_dict(openfold_state_dict(t))  # strict: every OpenFold name, nothing else
    m = torch.from_numpy(t["input.m"].copy()).requires_grad_()
    z = torch.from_numpy(t["input.z"].copy()).requires_grad_()
    mm, pm = torch.from_numpy(t["input.msa_mask"]), torch.from_numpy(t["input.pair_mask"])
    m_out, z_out, s = mod(m, z, mm, pm)
    assert golden_err(m_out.detach(), t["output.m"]) < 1e-4
    assert golden_err(z_out.detach(), t["output.z"]) < 1e-4
    assert golden_err(s.detach(), t["output.s"]) < 1e-4
    loss = (m_out * torch.from_numpy(t["probe.m"])).sum() + (z_out * torch.from_numpy(t["probe.z"])).sum()
    loss.backward()
    assert golden_err(m.grad, t["grad.input.m"]) < 2e-4
    assert golden_err(z.grad, t["grad.input.z"]) < 2e-4
    checked = 0
    for name, p in mod.named_parameters():
        if name.startswith("linear."):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0  # s is not in this loss
            continue
        assert golden_err(p.grad, t["grad.param." + name]) < 2e-4, name
        checked += 1
    assert checked == len([k for k in t if k.startswith("grad.param.")])


def test_gradients_through_s_and_after_an_optimizer_step():
    t, _ = golden("evo_tiny")
    mod = fct.Evoformer.from_file(data_path("evo_tiny.safetensors"))
    m = torch.from_numpy(t["input.m"].copy()).requires_grad_()
    z = torch.from_numpy(t["input.z"].copy())
    _, _, s = mod(m, z)
    s.square().sum().backward()
    assert mod.linear.weight.grad is not None and torch.count_nonzero(mod.linear.weight.grad) > 0
    assert m.grad is not None and torch.count_nonzero(m.grad) > 0
    # Finite difference along the gradient on one input element.
    eps = 1e-2
    idx = (0, 3, 5)
    mp = m.detach().clone()
    mp[idx] += eps
    mn = m.detach().clone()
    mn[idx] -= eps
    with torch.no_grad():
        fd = (mod(mp, z)[2].square().sum() - mod(mn, z)[2].square().sum()) / (2 * eps)
    assert abs(fd.item() - m.grad[idx].item()) < 2e-2 * max(1.0, abs(fd.item()))
    # An optimizer step changes the parameters; the next forward uses the new values.
    before = mod(m.detach(), z)[2].detach()
    torch.optim.SGD(mod.parameters(), lr=1e-3).step()
    after = mod(m.detach(), z)[2].detach()
    assert not torch.equal(before, after)


def test_inputs_are_not_modified():
    t, _ = golden("evo_tiny")
    mod = fct.Evoformer.from_file(data_path("evo_tiny.safetensors"))
    m = torch.from_numpy(t["input.m"].copy())
    z = torch.from_numpy(t["input.z"].copy())
    mod(m, z)
    np.testing.assert_array_equal(m.numpy(), t["input.m"])
