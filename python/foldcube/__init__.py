"""foldcube: AlphaFold-family trunks on CPUs inside a memory budget, NumPy in and out.

The package is a thin layer over the foldcube C++ library (the same code as the ``foldcube``
command line); every computation runs in the library with the GIL released, and Ctrl-C
(KeyboardInterrupt) stops a long call between modules.

- ``Evoformer.load(path)`` / ``Evoformer.random(config, seed)``; ``ev(m, z)`` -> ``(m, z, s)``;
  ``ev.train_step(m, z, grad_m, grad_z)`` -> outputs, input and parameter gradients.
- ``ExtraMsaStack`` (forward and ``train_step``), ``AlphaFold.load(params).predict(features)``.
- AlphaFold3 trunk (Boltz names): ``Pairformer`` (``pf(s, z, mask)``, ``train_step``) and
  ``MsaModule`` (``mm(z, emb, msa_feat, msa_mask, token_mask)``, ``train_step``);
  ``af3_msa_features``.
- ``features(fasta, msa)``, ``fold(fasta, params, out)``, ``plan(s=, r=, ...)``.
- ``foldcube.torch`` (when PyTorch is installed): the Evoformer as a ``torch.nn.Module``.

Arrays: float32, C-contiguous arrays are used in place without a copy; the stacks write their
outputs into the ``m`` and ``z`` they are given and return those same arrays. See docs/python.md.
"""

import os as _os

# OpenMP threads that spin while waiting slow everything down when another process shares the
# cores (docs/benchmarks.md, "OpenMP waiting"); the CLI re-executes itself with a passive policy,
# and the package asks for the same before libgomp starts, unless the user chose a policy. It has
# no effect when libgomp was already loaded (e.g. by torch imported first).
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "passive"

from ._core import (  # noqa: E402
    AlphaFold,
    Evoformer,
    ExtraMsaStack,
    MemoryScope,
    MsaModule,
    NotFoundError,
    Pairformer,
    Plan,
    __version__,
    af3_msa_features,
    configure_allocator,
    features,
    fold,
    memory_stats,
    num_threads,
    plan,
    read_file,
    set_num_threads,
)

__all__ = [
    "AlphaFold",
    "Evoformer",
    "ExtraMsaStack",
    "MemoryScope",
    "MsaModule",
    "NotFoundError",
    "Pairformer",
    "Plan",
    "af3_msa_features",
    "__version__",
    "configure_allocator",
    "features",
    "fold",
    "memory_stats",
    "num_threads",
    "plan",
    "read_file",
    "set_num_threads",
]
