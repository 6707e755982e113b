"""foldcube: AlphaFold-family trunks on CPUs inside a memory budget, NumPy in and out.

The package is a thin layer over the foldcube C++ library (the same code as the ``foldcube``
command line); every computation runs in the library with the GIL released, and Ctrl-C
(KeyboardInterrupt) stops a long call between modules.

- ``Evoformer.load(path)`` / ``Evoformer.random(config, seed)``; ``ev(m, z)`` -> ``(m, z, s)``;
  ``ev.train_step(m, z, grad_m, grad_z)`` -> outputs, input and parameter gradients.
- ``ExtraMsaStack`` (forward), ``AlphaFold.load(params).predict(features)``.
- ``features(fasta, msa)``, ``fold(fasta, params, out)``, ``plan(s=, r=, ...)``.
- ``foldcube.torch`` (when PyTorch is installed): the Evoformer as a ``torch.nn.Module``.

Arrays: float32, C-contiguous arrays are used in place without a copy; the stacks write their
outputs into the ``m`` and ``z`` they are given and return those same arrays. See docs/python.md.
"""

from ._core import (
    AlphaFold,
    Evoformer,
    ExtraMsaStack,
    MemoryScope,
    NotFoundError,
    Plan,
    __version__,
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
    "NotFoundError",
    "Plan",
    "__version__",
    "features",
    "fold",
    "memory_stats",
    "num_threads",
    "plan",
    "read_file",
    "set_num_threads",
]
