"""foldcube.torch: the Evoformer stack as a ``torch.nn.Module`` running on foldcube.

Its parameters are ``torch.nn.Parameter`` s under OpenFold's ``EvoformerStack`` state-dict names
(``blocks.<i>.msa_att_row.mha.linear_q.weight``, ..., ``linear.weight``), so
``load_state_dict`` of an OpenFold Evoformer state dict works. Forward and backward run in
foldcube through a ``torch.autograd.Function``: the forward is foldcube's inference pass; the
backward runs foldcube's exact training step (forward recomputed, then the backward) with the
upstream gradients. The single representation ``s = linear(m[0])`` is computed by torch, so its
gradients flow through autograd as usual.

Importing this module needs PyTorch (CPU, float32 tensors). Dropout (training mode) is not
supported yet: the stack runs in eval mode like the golden references.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import _core


def _container(root: torch.nn.Module, path: Sequence[str]) -> torch.nn.Module:
    """The submodule at `path` under root, made of empty modules where missing."""
    mod = root
    for part in path:
        if part not in mod._modules:
            mod.add_module(part, torch.nn.Module())
        mod = mod._modules[part]
    return mod


class _StackFunction(torch.autograd.Function):
    """(m, z, *params) -> (m_out, z_out) through foldcube; backward = foldcube's training step."""

    @staticmethod
    def forward(ctx, module, m, z, msa_mask, pair_mask, *params):
        engine = module._engine()
        m_out = m.detach().to(torch.float32).contiguous().clone()
        z_out = z.detach().to(torch.float32).contiguous().clone()
        engine(m_out.numpy(), z_out.numpy(), _np(msa_mask), _np(pair_mask),
               chunk=module.chunk, threads=module.threads)
        ctx.module = module
        ctx.engine = engine
        ctx.masks = (msa_mask, pair_mask)
        ctx.save_for_backward(m, z)
        return m_out, z_out

    @staticmethod
    def backward(ctx, grad_m, grad_z):
        m, z = ctx.saved_tensors
        module = ctx.module
        msa_mask, pair_mask = ctx.masks
        mi = m.detach().to(torch.float32).contiguous().clone()
        zi = z.detach().to(torch.float32).contiguous().clone()
        gm = torch.zeros_like(mi) if grad_m is None else grad_m.to(torch.float32).contiguous()
        gz = torch.zeros_like(zi) if grad_z is None else grad_z.to(torch.float32).contiguous()
        res = ctx.engine.train_step(mi.numpy(), zi.numpy(), gm.numpy(), gz.numpy(),
                                    msa_mask=_np(msa_mask), pair_mask=_np(pair_mask),
                                    policy=module.policy, chunk=module.chunk,
                                    threads=module.threads)
        grads = res["grad_params"]
        param_grads = []
        for name, p in module._block_params():
            g = grads.get(name)
            param_grads.append(None if g is None else torch.from_numpy(g).to(p.dtype))
        return (None, torch.from_numpy(res["grad_m"]), torch.from_numpy(res["grad_z"]), None,
                None, *param_grads)


def _np(t: Optional[torch.Tensor]):
    return None if t is None else t.detach().to(torch.float32).contiguous().numpy()


class Evoformer(torch.nn.Module):
    """AlphaFold2's Evoformer stack (OpenFold ``EvoformerStack`` names) computed by foldcube.

    ``Evoformer(config=None, seed=0)`` starts from foldcube's seeded random weights (``config``: a
    dict of OpenFold sizes such as ``{"c_m": 256, "c_z": 128, "no_blocks": 48}``; missing keys take
    AF2 model_1 values); ``Evoformer.from_file(path)`` reads a stack or whole-model parameter file.
    ``forward(m, z, msa_mask=None, pair_mask=None)`` returns ``(m, z, s)``.

    policy: activation recompute of the backward's training step ("none", "module", "block" or
    one per block); chunk, threads: as for ``foldcube.Evoformer``.
    """

    def __init__(self, config: Optional[dict] = None, seed: int = 0, *,
                 policy: Union[str, Sequence[str]] = "none", chunk: Optional[int] = None,
                 threads: Optional[int] = None, _engine: Optional[_core.Evoformer] = None):
        super().__init__()
        engine = _engine if _engine is not None else _core.Evoformer.random(config, seed)
        self.config = engine.config
        self.policy = policy
        self.chunk = chunk
        self.threads = threads
        for name, value in engine.state_dict().items():
            *path, leaf = name.split(".")
            _container(self, path).register_parameter(
                leaf, torch.nn.Parameter(torch.from_numpy(value.copy())))
        self._cached = None
        self._cache_key = None

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "Evoformer":
        """The Evoformer of a parameter file (safetensors or AlphaFold .npz)."""
        return cls(_engine=_core.Evoformer.load(path), **kwargs)

    def _block_params(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("linear.")]

    def _engine(self) -> _core.Evoformer:
        """foldcube's stack with the current parameter values (rebuilt after they change)."""
        params = list(self.named_parameters())
        key = tuple((n, id(p), p._version) for n, p in params)
        if key != self._cache_key:
            state = {n: p.detach().to(torch.float32).contiguous().numpy() for n, p in params}
            self._cached = _core.Evoformer.from_state_dict(state, self.config)
            self._cache_key = key
        return self._cached

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                pair_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """m [s, r, c_m], z [r, r, c_z] (float32, CPU) -> (m, z, s [r, c_s])."""
        block_params = [p for _, p in self._block_params()]
        m_out, z_out = _StackFunction.apply(self, m, z, msa_mask, pair_mask, *block_params)
        s = torch.nn.functional.linear(m_out[0], self.linear.weight, self.linear.bias)
        return m_out, z_out, s
