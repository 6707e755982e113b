"""Type stubs of foldcube._core (the nanobind extension); documentation: docs/python.md."""

from os import PathLike
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

F32 = npt.NDArray[np.float32]
Bytes = Union[int, str]  # 6442450944 or "6GiB"
Config = Union[Mapping[str, Any], str, None]  # OpenFold sizes (c_m, c_z, no_blocks, ...) or JSON
Policy = Union[str, Sequence[str]]  # "none" | "module" | "block" | one name per block

class NotFoundError(FileNotFoundError, ValueError):
    """A file, tensor or feature that is not there."""

class Plan:
    """A schedule from foldcube.plan: choices and the cost model's estimates."""

    s: int
    r: int
    r_real: int
    training: bool
    blocks: int
    config: Dict[str, Any]
    policy: List[str]
    chunk: int
    chunk_target_bytes: int
    dap: int
    dp: int
    dtype: str
    threads: int
    time_ms: float
    time_per_protein_ms: float
    forward_ms: float
    backward_ms: float
    recompute_ms: float
    comm_ms: float
    peak_bytes: int
    activation_bytes: int
    memory_limit_bytes: int
    fits: bool
    profile: str
    partitions: List[List[Tuple[str, str]]]
    """Per block, the layers whose split is not pure DAP: (layer, "heads" | "channels" |
    "replicated" | "dap"); empty: pure DAP (split_policy="dap")."""
    def to_json(self) -> str: ...
    @staticmethod
    def from_json(text: str) -> Plan: ...

def plan(
    s: int,
    r: int,
    blocks: int = 48,
    train: bool = False,
    memory: Optional[Bytes] = None,
    devices: int = 1,
    dtype: str = "fp32",
    *,
    config: Config = None,
    profile: Optional[str] = None,
    policy: Optional[str] = None,
    chunk: Optional[int] = None,
    dap: Optional[int] = None,
    dp: Optional[int] = None,
    split_policy: str = "dap",
) -> Plan:
    """The fastest schedule the cost model finds under `memory` per device (recompute policy per
    block, chunking, DAP/DP degrees) with its time and memory estimates. profile: a device profile
    JSON (None = this machine, calibrated once, ~5 s, then cached). policy: evaluate this policy for
    every block instead of searching. dap, dp: force the degrees (None = search). split_policy:
    "dap" (pure DAP) or "auto" (each layer's partition for the DAP degree: heads, channels,
    replicated or dap; Plan.partitions), as `foldcube plan --split-policy`. A one-device plan can
    be passed to Evoformer calls."""

class Evoformer:
    """The AlphaFold2 Evoformer stack (OpenFold EvoformerStack state-dict names)."""

    @staticmethod
    def load(path: Union[str, PathLike], config: Optional[str] = None) -> Evoformer:
        """Weights from a safetensors or .npz file: an EvoformerStack state dict, a whole OpenFold
        AlphaFold state dict or DeepMind's params_model_*.npz. config: a JSON file; else the file's
        metadata, else inferred from the parameter shapes."""
    @staticmethod
    def random(config: Config = None, seed: int = 0) -> Evoformer:
        """Seeded random weights (activations stay O(1)); config defaults: AF2 model_1."""
    @staticmethod
    def from_state_dict(state: Mapping[str, F32], config: Config = None) -> Evoformer:
        """Weights from arrays under state-dict names (copied into the stack)."""
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def param_bytes(self) -> int: ...
    def state_dict(self) -> Dict[str, F32]:
        """Read-only views of the weights under their state-dict names."""
    def __call__(
        self,
        m: F32,
        z: F32,
        msa_mask: Optional[F32] = None,
        pair_mask: Optional[F32] = None,
        *,
        memory_budget: Optional[Bytes] = None,
        chunk: Optional[int] = None,
        threads: Optional[int] = None,
        plan: Optional[Plan] = None,
    ) -> Tuple[F32, F32, F32]:
        """Forward: m [s, r, c_m] and z [r, r, c_z] (float32, C-contiguous, writable) are
        overwritten with the outputs and returned, with s [r, c_s]; masks [s, r], [r, r] of 0/1
        (None = all ones). memory_budget: the chunking keeps foldcube's tracked memory plus m and
        z under it (MemoryError naming the smallest feasible budget otherwise)."""
    def train_step(
        self,
        m: F32,
        z: F32,
        grad_m: F32,
        grad_z: F32,
        grad_s: Optional[F32] = None,
        *,
        msa_mask: Optional[F32] = None,
        pair_mask: Optional[F32] = None,
        policy: Policy = "none",
        dropout: bool = False,
        seed: int = 0,
        chunk: Optional[int] = None,
        threads: Optional[int] = None,
        plan: Optional[Plan] = None,
    ) -> Dict[str, Any]:
        """Forward and exact backward of L with dL/dm_out = grad_m, dL/dz_out = grad_z (and
        dL/ds = grad_s). m and z are overwritten with the outputs. Returns {"m", "z", "s",
        "grad_m", "grad_z", "grad_params": {state-dict name: gradient}, "activation_bytes",
        "peak_bytes", "forward_ms", "backward_ms"}. Gradients do not depend on the policy."""

class ExtraMsaStack:
    """The AlphaFold2 Extra-MSA stack (inference and training); its config's c_m is c_e."""

    @staticmethod
    def load(path: Union[str, PathLike], config: Optional[str] = None) -> ExtraMsaStack: ...
    @staticmethod
    def random(config: Config = None, seed: int = 0) -> ExtraMsaStack: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def param_bytes(self) -> int: ...
    def state_dict(self) -> Dict[str, F32]: ...
    def __call__(
        self,
        m: F32,
        z: F32,
        msa_mask: Optional[F32] = None,
        pair_mask: Optional[F32] = None,
        *,
        memory_budget: Optional[Bytes] = None,
        chunk: Optional[int] = None,
        threads: Optional[int] = None,
    ) -> Tuple[F32, F32]:
        """m [s, r, c_e], z [r, r, c_z], overwritten with the outputs and returned."""
    def train_step(
        self,
        m: F32,
        z: F32,
        grad_m: F32,
        grad_z: F32,
        *,
        msa_mask: Optional[F32] = None,
        pair_mask: Optional[F32] = None,
        policy: Policy = "none",
        dropout: bool = False,
        seed: int = 0,
        chunk: Optional[int] = None,
        threads: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Forward (m, z updated in place) and exact backward: m, z, grad_m, grad_z, grad_params
        (OpenFold names), activation_bytes, peak_bytes, forward_ms, backward_ms."""

Af3Config = Optional[Mapping[str, Any]]  # overrides of the AF3 dims: c_s, c_z, no_blocks, ...

class Pairformer:
    """Boltz-2's Pairformer stack (AlphaFold3 trunk), parameters under Boltz names."""

    @staticmethod
    def load(path: Union[str, PathLike]) -> Pairformer: ...
    @staticmethod
    def random(config: Af3Config = None, seed: int = 0) -> Pairformer: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    def state_dict(self) -> Dict[str, F32]: ...
    def __call__(
        self,
        s: F32,
        z: F32,
        mask: Optional[F32] = None,
        *,
        chunk: Optional[int] = None,
        threads: Optional[int] = None,
        dtype: str = "fp32",
    ) -> Tuple[F32, F32]:
        """s [n, c_s], z [n, n, c_z] overwritten with the outputs and returned; mask [n].
        dtype: "fp32" | "bf16" (bf16 GEMM inputs, f32 accumulation; `run --dtype`)."""
    def train_step(
        self,
        s: F32,
        z: F32,
        grad_s: F32,
        grad_z: F32,
        *,
        mask: Optional[F32] = None,
        policy: Policy = "none",
        dropout: bool = False,
        seed: int = 0,
        chunk: Optional[int] = None,
        threads: Optional[int] = None,
        dtype: str = "fp32",
    ) -> Dict[str, Any]:
        """s, z, grad_s, grad_z, grad_params (Boltz names), activation_bytes, peak_bytes, ...
        dtype "bf16": kept state and GEMM inputs in bf16, f32 weights and gradients."""

class MsaModule:
    """Boltz-2's MSA module (AlphaFold3 trunk), parameters under Boltz names."""

    @staticmethod
    def load(path: Union[str, PathLike]) -> MsaModule: ...
    @staticmethod
    def random(config: Af3Config = None, seed: int = 0) -> MsaModule: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    def state_dict(self) -> Dict[str, F32]: ...
    def __call__(
        self,
        z: F32,
        emb: F32,
        msa_feat: F32,
        msa_mask: Optional[F32] = None,
        token_mask: Optional[F32] = None,
        *,
        chunk: Optional[int] = None,
        threads: Optional[int] = None,
        dtype: str = "fp32",
    ) -> F32:
        """z [n, n, c_z] overwritten and returned; emb [n, c_s]; msa_feat [N, n, 36]; dtype as
        Pairformer.__call__."""
    def train_step(
        self,
        z: F32,
        emb: F32,
        msa_feat: F32,
        grad_z: F32,
        *,
        msa_mask: Optional[F32] = None,
        token_mask: Optional[F32] = None,
        policy: Policy = "none",
        dropout: bool = False,
        seed: int = 0,
        chunk: Optional[int] = None,
        threads: Optional[int] = None,
        dtype: str = "fp32",
    ) -> Dict[str, Any]:
        """z, grad_z, grad_emb, grad_msa_embedding, grad_params (Boltz names), ...; dtype as
        Pairformer.train_step."""

def af3_msa_features(
    msa: npt.NDArray[np.int64], has_deletion: F32, deletion_value: F32, msa_paired: F32
) -> F32:
    """Boltz's MSA feature [N, n, 36]: one_hot(msa, 33) | has_deletion | deletion_value | paired."""

class AlphaFold:
    """The whole AlphaFold2 monomer model (inference)."""

    @staticmethod
    def load(path: Union[str, PathLike]) -> AlphaFold:
        """An OpenFold AlphaFold state dict (safetensors) or params_model_*.npz."""
    def predict(
        self,
        features: Union[str, PathLike, Mapping[str, np.ndarray]],
        *,
        recycles: Optional[int] = None,
        recycle_tolerance: float = 0.0,
        chunk: Optional[int] = None,
        threads: Optional[int] = None,
        dtype: str = "fp32",
    ) -> Dict[str, np.ndarray]:
        """Outputs of the last recycling pass under OpenFold's names: final_atom_positions
        [r, 37, 3], plddt [r], predicted_aligned_error [r, r], ptm_score, ... features: a features
        file or a dict (OpenFold batch names, with or without the "feature." prefix, trailing
        recycling axis). dtype "bf16": bf16 GEMM inputs in the stacks (f32 accumulation)."""

def features(
    fasta: str,
    msa: str,
    *,
    seed: int = 0,
    deterministic: bool = False,
    decisions: Optional[str] = None,
    max_msa_clusters: int = 512,
    max_extra_msa: int = 5120,
    recycles: int = 3,
) -> Dict[str, np.ndarray]:
    """OpenFold's raw ("raw.*") and model ("feature.*") features of one FASTA record and its MSA
    (.a3m or .sto); the dict feeds AlphaFold.predict directly."""

def fold(
    fasta: str,
    params: str,
    out: str,
    *,
    msa: Optional[str] = None,
    models: Sequence[int] = ...,
    recycles: int = 3,
    recycle_tolerance: float = 0.0,
    seed: int = 0,
    chunk: Optional[int] = None,
    cache: Optional[str] = None,
    threads: Optional[int] = None,
    dtype: str = "fp32",
) -> List[Dict[str, Any]]:
    """The folding pipeline (as `foldcube fold`): ranked PDB/mmCIF files, confidence JSON and
    plots under out/<job>/; returns per job {"name", "features_from_cache", "feature_seconds",
    "models": [{"model", "mean_plddt", "ptm", "seconds", "rank"}]}."""

class MemoryScope:
    """with MemoryScope() as ms: ... -> ms.peak_bytes: the tracked peak inside the block."""

    def __init__(self) -> None: ...
    def __enter__(self) -> MemoryScope: ...
    def __exit__(self, *exc: object) -> None: ...
    @property
    def start_bytes(self) -> int: ...
    @property
    def peak_bytes(self) -> int: ...

def memory_stats() -> Dict[str, int]:
    """live_bytes, peak_bytes, total_allocs of the tracking allocator and the process peak RSS."""

def read_file(path: Union[str, PathLike]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Tensors and metadata of a safetensors or .npz file."""

def set_num_threads(n: int) -> None: ...
def num_threads() -> int: ...
def configure_allocator(*, reuse_large_blocks: bool) -> None: ...
