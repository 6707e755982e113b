# foldcube from Python, notebook style (each "# %%" is a cell). Run it whole:
#   .venv/bin/python docs/python_example.py
# It uses the golden files in tests/data, so it runs anywhere the repository is checked out.

# %% Imports and data
import pathlib
import time

import numpy as np

import foldcube

data = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data"
print("foldcube", foldcube.__version__, "threads", foldcube.num_threads())

# %% An Evoformer stack from an OpenFold state dict, forward on NumPy arrays
ev = foldcube.Evoformer.load(data / "evo_tiny.safetensors")
tensors, meta = foldcube.read_file(data / "evo_tiny.safetensors")
m = tensors["input.m"].copy()  # [s, r, c_m] float32; overwritten with the output
z = tensors["input.z"].copy()  # [r, r, c_z]
m, z, s = ev(m, z, tensors["input.msa_mask"], tensors["input.pair_mask"])
err = np.abs(m - tensors["output.m"]).max()
print(f"Evoformer: s {s.shape}, max |m - OpenFold| = {err:.2e}")

# %% A training step: outputs, input gradients and parameter gradients by state-dict name
m, z = tensors["input.m"].copy(), tensors["input.z"].copy()
step = ev.train_step(m, z, tensors["probe.m"], tensors["probe.z"],
                     msa_mask=tensors["input.msa_mask"], pair_mask=tensors["input.pair_mask"],
                     policy="block")
g = step["grad_params"]["blocks.0.msa_att_row.mha.linear_q.weight"]
print(f"train_step: {len(step['grad_params'])} parameter gradients, "
      f"activations kept {step['activation_bytes'] / 2**20:.2f} MiB, |dW_q| = {np.linalg.norm(g):.3f}")

# %% Inside a memory budget
big = foldcube.Evoformer.random({"c_m": 64, "c_z": 32, "no_blocks": 2}, seed=0)
rng = np.random.default_rng(0)
m = rng.standard_normal((32, 128, 64)).astype(np.float32)
z = rng.standard_normal((128, 128, 32)).astype(np.float32)
with foldcube.MemoryScope() as free:
    big(m.copy(), z.copy())  # default chunking
with foldcube.MemoryScope() as scope:
    t0 = time.perf_counter()
    big(m, z, memory_budget="20MiB")
mz = m.nbytes + z.nbytes
print(f"tracked peak with m and z: {(free.peak_bytes + mz) / 2**20:.1f} MiB by default, "
      f"{(scope.peak_bytes + mz) / 2**20:.1f} MiB under a 20 MiB budget "
      f"({1e3 * (time.perf_counter() - t0):.1f} ms)")

# %% A plan: the planner's schedule and estimates for a training step
plan = foldcube.plan(s=128, r=256, blocks=48, train=True, memory="8GiB",
                     profile=str(data.parent.parent / "docs/profiles/this-machine-2026-11-23-2threads.json"))
print(f"plan: {plan.time_ms / 1e3:.1f} s per step, peak {plan.peak_bytes / 2**30:.2f} GiB, "
      f"policies {sorted(set(plan.policy))}")

# %% The whole AlphaFold2 model on a features file
model = foldcube.AlphaFold.load(data / "af2_model_tiny.npz")
out = model.predict(data / "af2_model_tiny.safetensors")
print(f"AlphaFold: mean pLDDT {out['plddt'].mean():.1f}, pTM {float(out['ptm_score']):.3f}, "
      f"positions {out['final_atom_positions'].shape}")
