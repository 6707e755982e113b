"""The whole model, the feature pipeline and the fold pipeline through the Python API."""

import os

import numpy as np
import pytest

import foldcube
from conftest import data_path, golden, golden_err

STRUCTURE = ("final_atom_positions", "final_affine_tensor")


def check_outputs(out, t):
    for name in ["plddt", "predicted_aligned_error", "final_atom_positions", "distogram_logits",
                 "tm_logits", "single", "pair"]:
        tol = 5e-4 if name in STRUCTURE else 1e-4
        assert golden_err(out[name], t["output." + name]) < tol, name
    ref = float(t["output.ptm_score"])
    assert abs(float(out["ptm_score"]) - ref) / abs(ref) < 1e-4


def test_predict_matches_golden_outputs():
    t, _ = golden("af2_model_tiny")
    model = foldcube.AlphaFold.load(data_path("af2_model_tiny.safetensors"))
    feats = {k: v for k, v in t.items() if k.startswith("feature.")}
    out = model.predict(feats)
    assert out["final_atom_positions"].shape == (12, 37, 3)
    check_outputs(out, t)


def test_predict_in_bf16_stays_near_fp32():
    t, _ = golden("af2_model_tiny")
    model = foldcube.AlphaFold.load(data_path("af2_model_tiny.safetensors"))
    feats = {k: v for k, v in t.items() if k.startswith("feature.")}
    ca32 = model.predict(feats, recycles=0)["final_atom_positions"][:, 1]
    ca16 = model.predict(feats, recycles=0, dtype="bf16")["final_atom_positions"][:, 1]
    rms = float(np.sqrt(((ca32 - ca16) ** 2).sum(axis=1).mean()))
    assert 0 < rms < 0.25  # bf16 products differ, within the C++ suite's bound
    with pytest.raises(ValueError, match="dtype"):
        model.predict(feats, dtype="fp16")


def test_predict_from_npz_params_and_a_features_path():
    # An .npz holds no config: counts its shapes do not fix (structure-module layers, template
    # attention heads) take AF2's values, so this model is not the golden one; it must run.
    model = foldcube.AlphaFold.load(data_path("af2_model_tiny.npz"))
    out = model.predict(data_path("af2_model_tiny.safetensors"), recycles=0, threads=1)
    assert out["final_atom_positions"].shape == (12, 37, 3)
    assert np.all(np.isfinite(out["plddt"])) and np.all((out["plddt"] >= 0) & (out["plddt"] <= 100))
    assert int(out["num_recycles"]) == 1


def test_predict_rejects_bad_features():
    model = foldcube.AlphaFold.load(data_path("af2_model_tiny.safetensors"))
    with pytest.raises(ValueError, match="aatype"):
        model.predict({"seq_mask": np.ones((12, 3), np.float32)})
    with pytest.raises(TypeError, match="features"):
        model.predict(42)


def test_features_match_the_golden_pipeline():
    t, _ = golden("feat_small")
    f = foldcube.features(data_path("feat_small.fasta"), data_path("feat_small.a3m"),
                          decisions=data_path("feat_small.safetensors"), max_msa_clusters=16,
                          max_extra_msa=32)
    for name in ["feature.msa_feat", "feature.aatype", "feature.extra_msa", "raw.msa"]:
        if name in t:
            np.testing.assert_allclose(f[name], t[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert any(k.startswith("raw.") for k in f) and any(k.startswith("feature.") for k in f)


def test_fold_writes_ranked_structures(tmp_path):
    res = foldcube.fold(data_path("feat_small.fasta"), data_path("af2_model_tiny.npz"),
                        str(tmp_path), msa=data_path("feat_small.a3m"), recycles=1, threads=1)
    assert len(res) == 1 and len(res[0]["models"]) == 1
    job = res[0]
    assert job["models"][0]["rank"] == 1 and 0 <= job["models"][0]["mean_plddt"] <= 100
    files = os.listdir(tmp_path / job["name"])
    assert "ranked_0.pdb" in files and "ranking.json" in files


def test_fold_structures_read_by_gemmi(tmp_path):
    """The PDB and mmCIF files of a fold are read by gemmi: one model, one residue per standard
    amino acid of the query numbered by its position (unknown letters such as X, U, B, Z become UNK
    without atoms, as in OpenFold's PDB), their names, and pLDDT in every atom's B-factor equal to
    confidence_<model>.json."""
    import json

    import gemmi

    res = foldcube.fold(data_path("feat_small.fasta"), data_path("af2_model_tiny.npz"),
                        str(tmp_path), msa=data_path("feat_small.a3m"), recycles=1, threads=1)
    job_dir = tmp_path / res[0]["name"]
    model = res[0]["models"][0]["model"]
    conf = json.loads((job_dir / f"confidence_{model}.json").read_text())
    query = "".join(l.strip() for l in open(data_path("feat_small.fasta")) if not l.startswith(">"))
    assert len(conf["plddt"]) == len(query)
    standard = {i + 1: c for i, c in enumerate(query) if c in "ACDEFGHIKLMNPQRSTVWY"}
    assert 0 < len(standard) < len(query)  # the case holds unknown letters
    for name in (f"unrelaxed_{model}.pdb", f"unrelaxed_{model}.cif", "ranked_0.pdb"):
        st = gemmi.read_structure(str(job_dir / name))
        assert len(st) == 1 and len(st[0]) == 1, name
        chain = st[0][0]
        assert [r.seqid.num for r in chain] == sorted(standard), name
        for r in chain:
            assert gemmi.find_tabulated_residue(r.name).one_letter_code.upper() == \
                standard[r.seqid.num], name
            assert r.find_atom("CA", "*") is not None, name
            p = conf["plddt"][r.seqid.num - 1]
            assert all(abs(a.b_iso - p) < 0.01 for a in r), name
