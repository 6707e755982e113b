"""Bad inputs give Python exceptions naming the argument and the expected shape."""

import numpy as np
import pytest

import foldcube
from conftest import data_path, golden, stack_inputs


@pytest.fixture(scope="module")
def ev():
    return foldcube.Evoformer.load(data_path("evo_tiny.safetensors"))


@pytest.fixture
def inputs():
    t, _ = golden("evo_tiny")
    return stack_inputs(t)


def test_wrong_dtype_is_a_type_error(ev, inputs):
    m, z, mm, pm = inputs
    with pytest.raises(TypeError, match=r"m: expected dtype float32 \(shape \[s, r, c_m=32\]\), got float64"):
        ev(m.astype(np.float64), z)
    with pytest.raises(TypeError, match=r"z: expected dtype float32.*got int64"):
        ev(m, z.astype(np.int64))


def test_not_an_array_is_a_type_error(ev, inputs):
    m, z, mm, pm = inputs
    with pytest.raises(TypeError, match=r"m: expected a float32 array of shape \[s, r, c_m=32\], got list"):
        ev([[1.0]], z)


def test_wrong_shape_is_a_value_error(ev, inputs):
    m, z, mm, pm = inputs
    with pytest.raises(ValueError, match=r"m: expected shape \[s, r, c_m=32\], got \[8, 12, 31\]"):
        ev(np.zeros((8, 12, 31), np.float32), z)
    with pytest.raises(ValueError, match=r"z: expected shape \[r=12, r=12, c_z=16\], got \[11, 12, 16\]"):
        ev(m, np.zeros((11, 12, 16), np.float32))
    with pytest.raises(ValueError, match=r"msa_mask: expected shape \[s=8, r=12\]"):
        ev(m, z, np.ones((8, 11), np.float32))
    with pytest.raises(ValueError, match=r"grad_z: expected shape \[r=12, r=12, c_z=16\]"):
        ev.train_step(m, z, np.zeros_like(m), np.zeros((12, 12), np.float32))


def test_non_contiguous_is_a_value_error(ev, inputs):
    m, z, mm, pm = inputs
    mt = np.ascontiguousarray(m.transpose(1, 0, 2)).transpose(1, 0, 2)  # right shape, F strides
    with pytest.raises(ValueError, match=r"m: the array must be C-contiguous"):
        ev(mt, z)
    zz = np.zeros((12, 24, 16), np.float32)[:, ::2]
    with pytest.raises(ValueError, match=r"z: the array must be C-contiguous"):
        ev(m, zz)


def test_nan_is_rejected(ev, inputs):
    m, z, mm, pm = inputs
    m[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite"):
        ev(m, z, mm, pm)
    m[1, 2, 3] = 0
    z[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"non-finite"):
        ev.train_step(m, z, np.zeros_like(m), np.zeros_like(z))


def test_masks_must_be_zero_or_one(ev, inputs):
    m, z, mm, pm = inputs
    mm[0, 0] = 0.5
    with pytest.raises(ValueError, match=r"only 0 and 1"):
        ev(m, z, mm, pm)


def test_read_only_outputs_are_refused(ev, inputs):
    m, z, mm, pm = inputs
    m.flags.writeable = False
    with pytest.raises(ValueError, match=r"m: the array is read-only"):
        ev(m, z)


def test_bad_options(ev, inputs):
    m, z, mm, pm = inputs
    with pytest.raises(ValueError, match="chunk"):
        ev(m, z, chunk=0)
    with pytest.raises(ValueError, match="threads"):
        ev(m, z, threads=0)
    with pytest.raises(ValueError, match="policy"):
        ev.train_step(m, z, np.zeros_like(m), np.zeros_like(z), policy="sometimes")
    with pytest.raises(ValueError, match="entries for 2 blocks"):
        ev.train_step(m, z, np.zeros_like(m), np.zeros_like(z), policy=["none"] * 3)
    with pytest.raises(ValueError, match="memory_budget"):
        ev(m, z, memory_budget="lots")


def test_missing_files():
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        foldcube.Evoformer.load("/nonexistent/weights.safetensors")
    with pytest.raises(foldcube.NotFoundError):
        foldcube.AlphaFold.load("/nonexistent/params.npz")
