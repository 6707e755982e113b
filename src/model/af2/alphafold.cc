// The whole AlphaFold2 model (include/foldcube/alphafold.h), composed of the Evoformer and
// ExtraMSA stacks, the template pair blocks (pair layers of src/layers/), the structure
// module and the heads.
#include "foldcube/alphafold.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <vector>

#include "foldcube/extra_msa.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"
#include "io/param_names.h"
#include "kernels/kernels.h"
#include "model/af2/alphafold_impl.h"
#include "model/af2/block_sizes.h"
#include "model/af2/confidence.h"
#include "model/af2/geometry.h"
#include "model/af2/residue_constants.h"
#include "model/af2/structure_module.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/weights.h"

namespace fc {
namespace {

constexpr int64_t kTargetFeat = 22, kMsaFeat = 49, kExtraFeat = 25, kRelBinsPerSide = 32;
constexpr int64_t kRecycleBins = 15, kTemplPairFeat = 88, kTemplAngleFeat = 57;
constexpr int64_t kTemplDistBins = 39;

int64_t dim_of(const TensorFile& f, const std::string& name, int d) {
  auto it = f.tensors.find(name);
  return it == f.tensors.end() || it->second.ndim() <= d ? -1 : it->second.dim(d);
}

int64_t count_blocks(const TensorShapes& f, const std::string& prefix) {
  int64_t n = 0;
  for (const std::string& name : f.names)
    if (name.rfind(prefix, 0) == 0)
      n = std::max<int64_t>(n, std::strtol(name.c_str() + prefix.size(), nullptr, 10) + 1);
  return n;
}

using af2::apply_layernorm;
using af2::apply_linear;
using af2::ca_distance_change;
using af2::load_layernorm;
using af2::load_linear;
using af2::pair_mask_of;
using af2::pass_features;

// t[..., k] as a contiguous tensor (the features' trailing recycling axis).
Tensor pass_of(const Tensor& t, int k) { return t.select(t.ndim() - 1, k).contiguous(); }

}  // namespace

Status alphafold_config_from_weights(const TensorFile& w, AlphaFoldConfig* out) {
  return alphafold_config_from_shapes(shapes_of(w), out);
}

Status alphafold_config_from_shapes(const TensorShapes& w, AlphaFoldConfig* out) {
  AlphaFoldConfig c;
  FC_RETURN_IF_ERROR(infer_config_from_shapes(submodule_shapes(w, "evoformer"), &c.evoformer));
  // Extra-MSA stack: its own dims; the global column attention has one key/value head of C.
  const TensorShapes x = submodule_shapes(w, "extra_msa_stack");
  EvoformerConfig e = c.evoformer;
  e.c_m = x.dim("blocks.0.msa_att_row.layer_norm_m.weight", 0);
  e.no_heads_msa = x.dim("blocks.0.msa_att_row.linear_z.weight", 0);
  e.c_hidden_msa_att = x.dim("blocks.0.msa_att_col.global_attention.linear_k.weight", 0);
  e.no_heads_pair = x.dim("blocks.0.pair_stack.tri_att_start.linear.weight", 0);
  const int64_t xp = x.dim("blocks.0.pair_stack.tri_att_start.mha.linear_q.weight", 0);
  e.c_hidden_opm = x.dim("blocks.0.outer_product_mean.linear_1.weight", 0);
  e.c_hidden_mul = x.dim("blocks.0.pair_stack.tri_mul_out.linear_a_p.weight", 0);
  const int64_t xt = x.dim("blocks.0.msa_transition.linear_1.weight", 0);
  e.no_blocks = count_blocks(x, "blocks.");
  if (e.c_m <= 0 || e.no_heads_msa <= 0 || e.c_hidden_msa_att <= 0 || e.no_heads_pair <= 0 ||
      xp <= 0 || xp % e.no_heads_pair || xt <= 0 || xt % e.c_m || e.no_blocks <= 0)
    return Status::InvalidArgument("alphafold: extra_msa_stack parameters missing or inconsistent");
  e.c_hidden_pair_att = xp / e.no_heads_pair;
  e.transition_n = xt / e.c_m;
  c.extra_msa = e;
  // Template pair stack (pair modules at width c_t).
  const std::string tp = "template_embedder.template_pair_stack";
  const TensorShapes t = submodule_shapes(w, tp);
  c.templates = t.has("layer_norm.weight");
  if (c.templates) {
    EvoformerConfig tc = c.evoformer;
    tc.c_z = t.dim("layer_norm.weight", 0);
    tc.no_heads_pair = t.dim("blocks.0.tri_att_start.linear.weight", 0);
    const int64_t tq = t.dim("blocks.0.tri_att_start.mha.linear_q.weight", 0);
    tc.c_hidden_mul = t.dim("blocks.0.tri_mul_out.linear_a_p.weight", 0);
    const int64_t tt = t.dim("blocks.0.pair_transition.linear_1.weight", 0);
    tc.no_blocks = count_blocks(t, "blocks.");
    if (tc.c_z <= 0 || tc.no_heads_pair <= 0 || tq <= 0 || tq % tc.no_heads_pair || tt <= 0 ||
        tt % tc.c_z || tc.no_blocks <= 0)
      return Status::InvalidArgument("alphafold: template pair stack parameters inconsistent");
    tc.c_hidden_pair_att = tq / tc.no_heads_pair;
    tc.transition_n = tt / tc.c_z;
    c.template_pair = tc;
  }
  c.ptm = w.has("aux_heads.tm.linear.weight");
  af2::StructureModuleConfig smc;
  if (af2::structure_module_config_from_weights(w, "structure_module.", &smc).ok()) {
    c.ipa_heads = smc.no_heads_ipa;
    c.ipa_hidden = smc.c_ipa;
    c.ipa_qk_points = smc.no_qk_points;
    c.ipa_v_points = smc.no_v_points;
    c.c_resnet = smc.c_resnet;
  }
  for (auto [name, v] : {std::pair{"aux_heads.plddt.linear_1.weight", &c.plddt_hidden},
                         {"aux_heads.plddt.linear_3.weight", &c.plddt_bins},
                         {"aux_heads.distogram.linear.weight", &c.distogram_bins},
                         {"aux_heads.tm.linear.weight", &c.tm_bins}})
    if (w.dim(name, 0) > 0) *v = w.dim(name, 0);
  // Counts the shapes do not hold: from the OpenFold config in the metadata.
  auto md = w.metadata.find("config");
  if (md != w.metadata.end()) {
    const nlohmann::json j = nlohmann::json::parse(md->second, nullptr, false);
    const nlohmann::json& model = j.contains("model") ? j["model"] : j;
    if (model.is_object()) {
      if (model.contains("template") &&
          model["template"].contains("template_pointwise_attention")) {
        const auto& pa = model["template"]["template_pointwise_attention"];
        c.template_att_heads = pa.value("no_heads", c.template_att_heads);
        c.template_att_hidden = pa.value("c_hidden", c.template_att_hidden);
      } else if (model.contains("template_pointwise_attention")) {
        const auto& pa = model["template_pointwise_attention"];
        c.template_att_heads = pa.value("no_heads", c.template_att_heads);
        c.template_att_hidden = pa.value("c_hidden", c.template_att_hidden);
      }
      if (model.contains("structure_module"))
        c.structure_layers = model["structure_module"].value("no_blocks", c.structure_layers);
    }
  }
  auto heads = w.metadata.find("template_pointwise_attention_heads");  // set by the .npz reader
  if (heads != w.metadata.end()) {
    const long h = std::strtol(heads->second.c_str(), nullptr, 10);
    if (h > 0) c.template_att_heads = h;
  }
  const int64_t q = w.dim("template_embedder.template_pointwise_att.mha.linear_q.weight", 0);
  if (c.templates && q != c.template_att_heads * c.template_att_hidden) {
    // No config: keep the head count and take the width from the shapes.
    if (q <= 0 || q % c.template_att_heads)
      return Status::InvalidArgument("alphafold: template pointwise attention shapes inconsistent");
    c.template_att_hidden = q / c.template_att_heads;
  }
  *out = c;
  return Status::OK();
}

Status AlphaFold::Impl::load(const TensorFile& f) {
  const EvoformerConfig& ev = cfg.evoformer;
  const int64_t cm = ev.c_m, cz = ev.c_z, cs = ev.c_s;
  // Sharded (weight_ranks > 1, set before loading): only this rank's blocks of each stack.
  const auto mine = [this](int b) { return weight_ranks <= 1 || b % weight_ranks == weight_rank; };
  FC_RETURN_IF_ERROR(StackAccess::load_blocks(ev, submodule_state_dict(TensorFile(f), "evoformer"),
                                              mine, &evoformer));
  FC_RETURN_IF_ERROR(StackAccess::load_blocks(
      cfg.extra_msa, submodule_state_dict(TensorFile(f), "extra_msa_stack"), mine, &extra));
  const std::string ie = "input_embedder.";
  FC_RETURN_IF_ERROR(load_linear(f, ie + "linear_tf_z_i", cz, kTargetFeat, true, &tf_z_i));
  FC_RETURN_IF_ERROR(load_linear(f, ie + "linear_tf_z_j", cz, kTargetFeat, true, &tf_z_j));
  FC_RETURN_IF_ERROR(load_linear(f, ie + "linear_tf_m", cm, kTargetFeat, true, &tf_m));
  FC_RETURN_IF_ERROR(load_linear(f, ie + "linear_msa_m", cm, kMsaFeat, true, &msa_m));
  FC_RETURN_IF_ERROR(load_linear(f, ie + "linear_relpos", cz, 2 * cfg.relpos_k + 1, true, &relpos));
  FC_RETURN_IF_ERROR(load_linear(f, "recycling_embedder.linear", cz, kRecycleBins, true, &rec_lin));
  FC_RETURN_IF_ERROR(load_layernorm(f, "recycling_embedder.layer_norm_m", cm, &rec_ln_m));
  FC_RETURN_IF_ERROR(load_layernorm(f, "recycling_embedder.layer_norm_z", cz, &rec_ln_z));
  FC_RETURN_IF_ERROR(
      load_linear(f, "extra_msa_embedder.linear", cfg.extra_msa.c_m, kExtraFeat, true, &extra_lin));
  if (cfg.templates) {
    const std::string te = "template_embedder.";
    const int64_t ct = cfg.template_pair.c_z;
    FC_RETURN_IF_ERROR(load_linear(f, te + "template_single_embedder.linear_1", cm, kTemplAngleFeat,
                                   true, &tmpl_single_1));
    FC_RETURN_IF_ERROR(
        load_linear(f, te + "template_single_embedder.linear_2", cm, cm, true, &tmpl_single_2));
    FC_RETURN_IF_ERROR(load_linear(f, te + "template_pair_embedder.linear", ct, kTemplPairFeat,
                                   true, &tmpl_pair_lin));
    tmpl_blocks.resize(cfg.template_pair.no_blocks);
    for (size_t b = 0; b < tmpl_blocks.size(); ++b) {
      if (!mine(static_cast<int>(b))) continue;
      allocate_pair_layers(cfg.template_pair, &tmpl_blocks[b].w);  // the pair modules only
      FC_RETURN_IF_ERROR(load_params(
          named_pair_params(tmpl_blocks[b].w,
                            te + "template_pair_stack." + block_prefix(static_cast<int>(b))),
          f));
    }
    FC_RETURN_IF_ERROR(load_layernorm(f, te + "template_pair_stack.layer_norm", ct, &tmpl_ln));
    const int64_t hc = cfg.template_att_heads * cfg.template_att_hidden;
    const std::string pa = te + "template_pointwise_att.mha.";
    FC_RETURN_IF_ERROR(load_linear(f, pa + "linear_q", hc, cz, false, &tmpl_q));
    FC_RETURN_IF_ERROR(load_linear(f, pa + "linear_k", hc, ct, false, &tmpl_k));
    FC_RETURN_IF_ERROR(load_linear(f, pa + "linear_v", hc, ct, false, &tmpl_v));
    FC_RETURN_IF_ERROR(load_linear(f, pa + "linear_o", cz, hc, true, &tmpl_o));
  }
  sm_cfg.no_blocks = cfg.structure_layers;
  FC_RETURN_IF_ERROR(
      af2::structure_module_config_from_weights(shapes_of(f), "structure_module.", &sm_cfg));
  FC_RETURN_IF_ERROR(af2::load_structure_module(f, "structure_module.", sm_cfg, &sm));
  const std::string h = "aux_heads.";
  const int64_t ch = dim_of(f, h + "plddt.linear_1.weight", 0);
  const int64_t pbins = dim_of(f, h + "plddt.linear_3.weight", 0);
  const int64_t dbins = dim_of(f, h + "distogram.linear.weight", 0);
  if (ch <= 0 || pbins <= 0 || dbins <= 0)
    return Status::InvalidArgument("alphafold: aux_heads parameters missing");
  FC_RETURN_IF_ERROR(load_layernorm(f, h + "plddt.layer_norm", cs, &plddt_ln));
  FC_RETURN_IF_ERROR(load_linear(f, h + "plddt.linear_1", ch, cs, true, &plddt_1));
  FC_RETURN_IF_ERROR(load_linear(f, h + "plddt.linear_2", ch, ch, true, &plddt_2));
  FC_RETURN_IF_ERROR(load_linear(f, h + "plddt.linear_3", pbins, ch, true, &plddt_3));
  FC_RETURN_IF_ERROR(load_linear(f, h + "distogram.linear", dbins, cz, true, &distogram));
  FC_RETURN_IF_ERROR(load_linear(f, h + "masked_msa.linear", 23, cm, true, &masked_msa));
  FC_RETURN_IF_ERROR(
      load_linear(f, h + "experimentally_resolved.linear", af2::kAtom37, cs, true, &exp_resolved));
  if (cfg.ptm) {
    const int64_t tbins = dim_of(f, h + "tm.linear.weight", 0);
    FC_RETURN_IF_ERROR(load_linear(f, h + "tm.linear", tbins, cz, true, &tm));
  }
  return Status::OK();
}

namespace {

Status feature(const FeatureDict& d, const std::string& name, DType dt, int64_t passes,
               Tensor* out) {
  auto it = d.find(name);
  if (it == d.end()) return Status::NotFound("feature '" + name + "' is missing");
  const Tensor& t = it->second;
  if (!t.defined() || t.dtype() != dt)
    return Status::InvalidArgument("feature '" + name + "' must be " + dtype_name(dt));
  if (t.ndim() < 1 || t.dim(-1) != passes)
    return Status::InvalidArgument("feature '" + name + "' has shape " + shape_str(t.shape()) +
                                   ": its last axis must be the " + std::to_string(passes) +
                                   " recycling passes");
  *out = t;
  return Status::OK();
}

Status check_values(const std::string& name, const Tensor& t, int64_t lo, int64_t hi) {
  const int64_t* p = t.data<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (p[i] < lo || p[i] > hi)
      return Status::InvalidArgument("feature '" + name + "' holds " + std::to_string(p[i]) +
                                     ", expected " + std::to_string(lo) + ".." +
                                     std::to_string(hi));
  return Status::OK();
}

}  // namespace

namespace af2 {

Status pass_features(const FeatureDict& d, bool templates, int k, int64_t passes,
                     PassFeatures* out) {
  PassFeatures f;
  auto get = [&](const char* name, DType dt, const Shape& shape, Tensor* t) -> Status {
    Tensor full;
    FC_RETURN_IF_ERROR(feature(d, name, dt, passes, &full));
    *t = pass_of(full, k);
    if (!shape.empty()) FC_RETURN_IF_ERROR(expect_shape(std::string("feature ") + name, *t, shape));
    if (dt == DType::F32) FC_RETURN_IF_ERROR(check_finite(name, *t));
    return Status::OK();
  };
  FC_RETURN_IF_ERROR(get("aatype", DType::I64, {}, &f.aatype));
  if (f.aatype.ndim() != 1 || f.aatype.dim(0) < 1)
    return Status::InvalidArgument("feature 'aatype' must be [r, R] with r >= 1");
  const int64_t r = f.r = f.aatype.dim(0);
  FC_RETURN_IF_ERROR(check_values("aatype", f.aatype, 0, af2::kRestypes - 1));
  FC_RETURN_IF_ERROR(get("residue_index", DType::I64, {r}, &f.residue_index));
  FC_RETURN_IF_ERROR(get("target_feat", DType::F32, {r, kTargetFeat}, &f.target_feat));
  FC_RETURN_IF_ERROR(get("msa_feat", DType::F32, {}, &f.msa_feat));
  if (f.msa_feat.ndim() != 3 || f.msa_feat.dim(0) < 1)
    return Status::InvalidArgument("feature 'msa_feat' must be [S, r, 49, R] with S >= 1");
  f.S = f.msa_feat.dim(0);
  FC_RETURN_IF_ERROR(expect_shape("feature msa_feat", f.msa_feat, {f.S, r, kMsaFeat}));
  FC_RETURN_IF_ERROR(get("msa_mask", DType::F32, {f.S, r}, &f.msa_mask));
  FC_RETURN_IF_ERROR(check_mask("feature msa_mask", f.msa_mask, {f.S, r}));
  FC_RETURN_IF_ERROR(get("seq_mask", DType::F32, {r}, &f.seq_mask));
  FC_RETURN_IF_ERROR(check_mask("feature seq_mask", f.seq_mask, {r}));
  FC_RETURN_IF_ERROR(get("extra_msa", DType::I64, {}, &f.extra_msa));
  if (f.extra_msa.ndim() != 2 || f.extra_msa.dim(1) != r || f.extra_msa.dim(0) < 1)
    return Status::InvalidArgument("feature 'extra_msa' must be [E, r, R] with E >= 1");
  f.E = f.extra_msa.dim(0);
  FC_RETURN_IF_ERROR(check_values("extra_msa", f.extra_msa, 0, 22));
  FC_RETURN_IF_ERROR(get("extra_has_deletion", DType::F32, {f.E, r}, &f.extra_has_deletion));
  FC_RETURN_IF_ERROR(get("extra_deletion_value", DType::F32, {f.E, r}, &f.extra_deletion_value));
  FC_RETURN_IF_ERROR(get("extra_msa_mask", DType::F32, {f.E, r}, &f.extra_msa_mask));
  FC_RETURN_IF_ERROR(check_mask("feature extra_msa_mask", f.extra_msa_mask, {f.E, r}));
  if (templates && d.count("template_aatype")) {
    FC_RETURN_IF_ERROR(get("template_aatype", DType::I64, {}, &f.t_aatype));
    if (f.t_aatype.ndim() != 2 || f.t_aatype.dim(1) != r)
      return Status::InvalidArgument("feature 'template_aatype' must be [T, r, R]");
    const int64_t T = f.T = f.t_aatype.dim(0);
    FC_RETURN_IF_ERROR(check_values("template_aatype", f.t_aatype, 0, 21));
    FC_RETURN_IF_ERROR(
        get("template_all_atom_positions", DType::F32, {T, r, af2::kAtom37, 3}, &f.t_positions));
    FC_RETURN_IF_ERROR(
        get("template_all_atom_mask", DType::F32, {T, r, af2::kAtom37}, &f.t_atom_mask));
    FC_RETURN_IF_ERROR(get("template_mask", DType::F32, {T}, &f.t_mask));
    FC_RETURN_IF_ERROR(get("template_pseudo_beta", DType::F32, {T, r, 3}, &f.t_pb));
    FC_RETURN_IF_ERROR(get("template_pseudo_beta_mask", DType::F32, {T, r}, &f.t_pb_mask));
    FC_RETURN_IF_ERROR(get("template_torsion_angles_sin_cos", DType::F32, {T, r, 7, 2}, &f.t_tors));
    FC_RETURN_IF_ERROR(
        get("template_alt_torsion_angles_sin_cos", DType::F32, {T, r, 7, 2}, &f.t_alt_tors));
    FC_RETURN_IF_ERROR(get("template_torsion_angles_mask", DType::F32, {T, r, 7}, &f.t_tors_mask));
  }
  *out = std::move(f);
  return Status::OK();
}

// Change of the CA distance matrix between two passes' atom37 positions [r, 37, 3]:
// sqrt(masked mean over residue pairs of (d_ij - d'_ij)^2 + 1e-8), in Angstrom (the early-stop
// criterion of later AlphaFold releases).
double ca_distance_change(const Tensor& prev, const Tensor& cur, const Tensor& seq_mask) {
  const int64_t r = seq_mask.dim(0);
  constexpr int kCA = 1;
  auto dist = [&](const Tensor& x, int64_t i, int64_t j) {
    double d2 = 0;
    for (int c = 0; c < 3; ++c) {
      const double d = static_cast<double>(x.f32()[(i * af2::kAtom37 + kCA) * 3 + c]) -
                       x.f32()[(j * af2::kAtom37 + kCA) * 3 + c];
      d2 += d * d;
    }
    return std::sqrt(d2);
  };
  double num = 0, den = 0;
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) {
      const double w = static_cast<double>(seq_mask.f32()[i]) * seq_mask.f32()[j];
      const double d = dist(prev, i, j) - dist(cur, i, j);
      num += w * d * d;
      den += w;
    }
  return std::sqrt(num / std::max(den, 1e-10) + 1e-8);
}

// Pair mask [r, r] = seq_mask_i seq_mask_j.
Tensor pair_mask_of(const Tensor& seq_mask) {
  const int64_t r = seq_mask.dim(0);
  Tensor pm = Tensor::empty({r, r});
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) pm.f32()[i * r + j] = seq_mask.f32()[i] * seq_mask.f32()[j];
  return pm;
}

}  // namespace af2

namespace {

// Axis of the residue dimension of each feature the model reads (per-residue, MSA, template).
int residue_axis(const std::string& name) {
  static const std::map<std::string, int> axis = {{"aatype", 0},
                                                  {"residue_index", 0},
                                                  {"target_feat", 0},
                                                  {"seq_mask", 0},
                                                  {"msa_feat", 1},
                                                  {"msa_mask", 1},
                                                  {"extra_msa", 1},
                                                  {"extra_has_deletion", 1},
                                                  {"extra_deletion_value", 1},
                                                  {"extra_msa_mask", 1},
                                                  {"template_aatype", 1},
                                                  {"template_all_atom_positions", 1},
                                                  {"template_all_atom_mask", 1},
                                                  {"template_pseudo_beta", 1},
                                                  {"template_pseudo_beta_mask", 1},
                                                  {"template_torsion_angles_sin_cos", 1},
                                                  {"template_alt_torsion_angles_sin_cos", 1},
                                                  {"template_torsion_angles_mask", 1}};
  auto it = axis.find(name);
  return it == axis.end() ? -1 : it->second;
}

}  // namespace

std::vector<int> af2::output_residue_axes(const std::string& name) {
  if (name == "distogram_logits" || name == "tm_logits" || name == "predicted_aligned_error" ||
      name == "aligned_confidence_probs" || name == "pair")
    return {0, 1};
  if (name == "sm.single") return {0};
  if (name == "masked_msa_logits" || name == "msa" || name.rfind("sm.", 0) == 0) return {1};
  if (name == "max_predicted_aligned_error" || name == "ptm_score" || name == "num_recycles")
    return {};
  return {0};
}

Status af2::pad_residues(const FeatureDict& in, int64_t r, int64_t n, FeatureDict* out) {
  if (n < r)
    return Status::InvalidArgument("pad_to " + std::to_string(n) + " is below the " +
                                   std::to_string(r) + " residues of the features");
  FeatureDict d;
  for (const auto& [name, t] : in) {
    const int a = residue_axis(name);
    if (a < 0) {
      if (name == "template_mask") d[name] = t;
      continue;
    }
    if (!t.defined() || t.ndim() <= a || t.dim(a) != r)
      return Status::InvalidArgument("feature '" + name + "' has shape " + shape_str(t.shape()) +
                                     ": axis " + std::to_string(a) + " must be the " +
                                     std::to_string(r) + " residues");
    Shape shape = t.shape();
    shape[a] = n;
    Tensor p = Tensor::zeros(shape, t.dtype());
    p.slice(a, 0, r).copy_from(t);
    d[name] = p;
  }
  *out = std::move(d);
  return Status::OK();
}

Status AlphaFold::Impl::forward(const FeatureDict& feats, std::map<std::string, Tensor>* out,
                                const AlphaFoldOptions& opts) const {
  auto it = feats.find("aatype");
  if (it == feats.end()) return Status::NotFound("feature 'aatype' is missing");
  if (!it->second.defined() || it->second.ndim() != 2)
    return Status::InvalidArgument("feature 'aatype' must be [r, R]");
  const int64_t R = it->second.dim(1);
  ForwardOptions stack_opts;  // the stacks' dtype rule (fused path)
  stack_opts.dtype = opts.dtype;
  FC_RETURN_IF_ERROR(check_forward_dtype(stack_opts).WithContext("AlphaFold"));
  if (weight_ranks > 1)
    return Status::InvalidArgument(
        "AlphaFold forward: the stacks' block weights are sharded over " +
        std::to_string(weight_ranks) + " DAP ranks; run alphafold_dap_forward over them");
  if (opts.pad_to > 0 && opts.pad_to != it->second.dim(0)) {
    // Size bucket: run padded, crop the outputs back to the r residues.
    const int64_t r = it->second.dim(0);
    FeatureDict padded;
    FC_RETURN_IF_ERROR(af2::pad_residues(feats, r, opts.pad_to, &padded));
    AlphaFoldOptions o = opts;
    o.pad_to = 0;
    std::map<std::string, Tensor> res;
    FC_RETURN_IF_ERROR(forward(padded, &res, o));
    for (auto& [name, t] : res) {
      for (int a : af2::output_residue_axes(name)) t = t.slice(a, 0, r);
      t = t.contiguous();
    }
    if (res.count("tm_logits")) {
      const Tensor& tl = res.at("tm_logits");  // [r, r, bins]
      res.at("ptm_score").f32()[0] =
          af2::predicted_tm_score(tl.f32(), nullptr, r, tl.dim(2), 31.0f);
    }
    *out = std::move(res);
    return Status::OK();
  }

  if (R < 1) return Status::InvalidArgument("features hold no recycling pass");
  const int passes =
      opts.passes > 0 ? static_cast<int>(std::min<int64_t>(opts.passes, R)) : static_cast<int>(R);
  const EvoformerConfig& ev = cfg.evoformer;
  const int64_t cm = ev.c_m, cz = ev.c_z;
  const int64_t live0 = mem_stats().live_bytes;  // weights and features, not counted below
  Tensor m_prev, z_prev, x_prev;                 // [r, c_m], [r, r, c_z], [r, 37, 3]
  std::map<std::string, Tensor> result;
  for (int k = 0; k < passes; ++k) {
    PassFeatures f;
    FC_RETURN_IF_ERROR(pass_features(feats, cfg.templates, k, R, &f));
    const int64_t r = f.r, S = f.S;
    if (k == 0) {
      m_prev = Tensor::zeros({r, cm});
      z_prev = Tensor::zeros({r, r, cz});
      x_prev = Tensor::zeros({r, af2::kAtom37, 3});
    }
    Emit emit;
    if (opts.trace)
      emit.fn = [&opts, k](const std::string& stage, int index, const Tensor& v) {
        opts.trace(k, stage, index, v);
      };
    // Runs one stage, timing it and measuring its tracked peak when stats are asked for.
    auto stage = [&](const char* name, auto&& fn) -> Status {
      if (cancel_requested())
        return Status::Cancelled(std::string("AlphaFold interrupted before ") + name);
      if (!opts.stats) {
        Status st = fn();
        if (st.ok() && opts.progress) opts.progress(k, name);
        return st;
      }
      MemoryScope scope;
      const auto t0 = std::chrono::steady_clock::now();
      Status st = fn();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      opts.stats->push_back({k, name, ms, scope.start_live() - live0, scope.peak() - live0});
      if (st.ok() && opts.progress) opts.progress(k, name);
      return st;
    };
    Tensor m = Tensor::empty({S, r, cm});  // [S, r, c_m]
    Tensor z = Tensor::empty({r, r, cz});  // [r, r, c_z]
    FC_RETURN_IF_ERROR(stage("input_embedder", [&] {
      embed_inputs(f, m.f32(), z.f32());
      return Status::OK();
    }));
    emit("input_embedder.m", -1, m);
    emit("input_embedder.z", -1, z);
    emit("recycling_embedder.in_m", -1, m_prev);
    emit("recycling_embedder.in_z", -1, z_prev);
    FC_RETURN_IF_ERROR(stage("recycling_embedder", [&] {
      embed_recycled(f, m_prev, z_prev, x_prev, opts.pair_block_bytes, m.f32(), z.f32(), emit);
      return Status::OK();
    }));
    const Tensor pair_mask = pair_mask_of(f.seq_mask);  // [r, r]
    Tensor tmpl_single;                                 // [T, r, c_m]
    if (cfg.templates && f.T > 0) {
      emit("template.in_z", -1, z);
      FC_RETURN_IF_ERROR(stage("template_embedder", [&] {
        return embed_templates(f, pair_mask, opts, z.f32(), &tmpl_single, emit);
      }));
    }
    FC_RETURN_IF_ERROR(
        stage("extra_msa_stack", [&] { return run_extra_msa(f, pair_mask, opts, z, emit); }));
    // The Evoformer on the cluster rows and the template rows.
    const int64_t T = tmpl_single.defined() ? f.T : 0;
    Tensor m_all = Tensor::empty({S + T, r, cm});  // [S+T, r, c_m]
    Tensor mask_all = Tensor::empty({S + T, r});   // [S+T, r]
    std::memcpy(m_all.f32(), m.f32(), S * r * cm * sizeof(float));
    std::memcpy(mask_all.f32(), f.msa_mask.f32(), S * r * sizeof(float));
    if (T > 0) {
      std::memcpy(m_all.f32() + S * r * cm, tmpl_single.f32(), T * r * cm * sizeof(float));
      for (int64_t t = 0; t < T * r; ++t)
        mask_all.f32()[S * r + t] = f.t_tors_mask.f32()[t * 7 + 2];
    }
    m = Tensor();
    tmpl_single = Tensor();
    emit("evoformer.in_m", -1, m_all);
    emit("evoformer.in_z", -1, z);
    ForwardOptions fo;
    fo.chunk = opts.chunk;
    fo.chunk_target_bytes = opts.chunk_target_bytes;
    fo.dtype = opts.dtype;
    Tensor s;  // [r, c_s]
    FC_RETURN_IF_ERROR(stage(
        "evoformer", [&] { return evoformer.forward(m_all, z, mask_all, pair_mask, &s, fo); }));
    emit("evoformer.m", -1, m_all);
    emit("evoformer.z", -1, z);
    emit("evoformer.s", -1, s);
    af2::StructureModuleOutput sm_out;
    FC_RETURN_IF_ERROR(stage("structure_module", [&] {
      return af2::structure_module_forward(sm, sm_cfg, s, z, f.aatype.data<int64_t>(),
                                           f.seq_mask.f32(), &sm_out, emit.structure(),
                                           opts.pair_block_bytes);
    }));
    emit.structure_outputs(sm_out);
    const int64_t L = sm_cfg.no_blocks;
    Tensor x37 = Tensor::empty({r, af2::kAtom37, 3});  // [r, 37, 3]
    Tensor mask37 = Tensor::empty({r, af2::kAtom37});  // [r, 37]
    af2::atom14_to_atom37(f.aatype.data<int64_t>(),
                          sm_out.positions.f32() + (L - 1) * r * af2::kAtom14 * 3, r, x37.f32(),
                          mask37.f32());
    emit("final_atom_positions", -1, x37);
    const bool converged = opts.recycle_tolerance > 0 && k > 0 &&
                           ca_distance_change(x_prev, x37, f.seq_mask) < opts.recycle_tolerance;
    if (k + 1 == passes || converged) {
      FC_RETURN_IF_ERROR(stage("heads", [&] {
        run_heads(f, m_all, z, s, sm_out, &result);
        return Status::OK();
      }));
      af2::put_last_pass_outputs(sm_out, x37, mask37, s, k + 1, &result);
      result["msa"] = m_all.slice(0, 0, S).contiguous();
      result["pair"] = z;
      break;
    }
    m_prev = m_all.select(0, 0).clone();  // not a view that would keep m_all alive
    z_prev = z;
    x_prev = x37;
  }
  *out = std::move(result);
  return Status::OK();
}

void af2::put_last_pass_outputs(const StructureModuleOutput& sm_out, const Tensor& x37,
                                const Tensor& mask37, const Tensor& s, int passes_run,
                                std::map<std::string, Tensor>* out) {
  std::map<std::string, Tensor>& o = *out;
  o["final_atom_positions"] = x37;
  o["final_atom_mask"] = mask37;
  o["final_affine_tensor"] = sm_out.frames.select(0, sm_out.frames.dim(0) - 1).contiguous();
  o["single"] = s;
  o["sm.frames"] = sm_out.frames;
  o["sm.sidechain_frames"] = sm_out.sidechain_frames;
  o["sm.unnormalized_angles"] = sm_out.unnormalized_angles;
  o["sm.angles"] = sm_out.angles;
  o["sm.positions"] = sm_out.positions;
  o["sm.states"] = sm_out.states;
  o["sm.single"] = sm_out.single;
  Tensor nrec = Tensor::empty({}, DType::I64);
  nrec.data<int64_t>()[0] = passes_run;
  o["num_recycles"] = nrec;
}

void AlphaFold::Impl::embed_inputs(const PassFeatures& f, float* m, float* z) const {
  const InputTables t = input_tables(f);
  embed_pair_rows(f, t, 0, f.r, f.r, z);
  embed_msa_rows(f, 0, f.S, f.r, m);
}

AlphaFold::Impl::InputTables AlphaFold::Impl::input_tables(const PassFeatures& f) const {
  const int64_t r = f.r, cz = cfg.evoformer.c_z, bins = 2 * cfg.relpos_k + 1;
  InputTables t;
  t.a_i = Tensor::empty({r, cz});
  t.a_j = Tensor::empty({r, cz});
  apply_linear(tf_z_i, f.target_feat.f32(), r, t.a_i.f32());
  apply_linear(tf_z_j, f.target_feat.f32(), r, t.a_j.f32());
  t.rel = Tensor::empty({bins, cz});
  kern::transpose(relpos.w.f32(), bins, t.rel.f32(), cz, cz, bins);
  kern::add_bias_rows(t.rel.f32(), cz, relpos.b.f32(), bins, cz);
  return t;
}

void AlphaFold::Impl::embed_pair_rows(const PassFeatures& f, const InputTables& t, int64_t i0,
                                      int64_t n, int64_t ld, float* z) const {
  const int64_t r = f.r, cz = cfg.evoformer.c_z, K = cfg.relpos_k;
  const Tensor &a_i = t.a_i, &a_j = t.a_j, &rel = t.rel;
  const int64_t* ri = f.residue_index.data<int64_t>();
#pragma omp parallel for
  for (int64_t i = i0; i < i0 + n; ++i)
    for (int64_t j = 0; j < r; ++j) {
      const int64_t d = std::clamp<int64_t>(ri[i] - ri[j], -K, K) + K;
      float* out = z + ((i - i0) * ld + j) * cz;
      for (int64_t c = 0; c < cz; ++c)
        out[c] = (a_i.f32()[i * cz + c] + a_j.f32()[j * cz + c]) + rel.f32()[d * cz + c];
    }
}

void AlphaFold::Impl::embed_msa_rows(const PassFeatures& f, int64_t s0, int64_t n, int64_t ld,
                                     float* m) const {
  const int64_t r = f.r, cm = cfg.evoformer.c_m;
  const float* feat = f.msa_feat.f32() + s0 * r * kMsaFeat;
  if (ld == r) {
    apply_linear(msa_m, feat, n * r, m);
  } else {
    for (int64_t s = 0; s < n; ++s)
      apply_linear(msa_m, feat + s * r * kMsaFeat, r, m + s * ld * cm);
  }
  Tensor tm = Tensor::empty({r, cm});  // [r, c_m]
  apply_linear(tf_m, f.target_feat.f32(), r, tm.f32());
  for (int64_t s = 0; s < n; ++s) kern::add_inplace(m + s * ld * cm, cm, tm.f32(), cm, r, cm);
}

void AlphaFold::Impl::embed_recycled(const PassFeatures& f, const Tensor& m_prev,
                                     const Tensor& z_prev, const Tensor& x_prev,
                                     int64_t pair_block_bytes, float* m, float* z,
                                     const Emit& emit) const {
  const int64_t r = f.r, cm = cfg.evoformer.c_m, cz = cfg.evoformer.c_z;
  Tensor pb = Tensor::empty({r, 3});  // [r, 3]
  af2::pseudo_beta(f.aatype.data<int64_t>(), x_prev.f32(), r, pb.f32());
  emit("recycling_embedder.in_pseudo_beta", -1, pb);
  Tensor rm = Tensor::empty({r, cm});  // [r, c_m]
  apply_layernorm(rec_ln_m, m_prev.f32(), r, cm, rm.f32());
  emit("recycling_embedder.m", -1, rm);
  kern::add_inplace(m, cm, rm.f32(), cm, r, cm);
  // LN(z_prev) + Linear(bins) over blocks of rows added into z: the whole recycled pair exists
  // only when traced.
  const int64_t rows = af2::pair_block_rows(r, cz, pair_block_bytes);
  Tensor rz = Tensor::empty({emit ? r : rows, r, cz});  // [rows or r, r, c_z]
  for (int64_t i0 = 0; i0 < r; i0 += rows) {
    const int64_t n = std::min(rows, r - i0);
    float* blk = rz.f32() + (emit ? i0 * r * cz : 0);  // [n, r, c_z]
    recycled_pair_rows(pb.f32(), r, z_prev.f32() + i0 * r * cz, i0, n, r, blk);
    if (!emit) kern::add_inplace(z + i0 * r * cz, cz, blk, cz, n * r, cz);
  }
  if (emit) {
    emit("recycling_embedder.z", -1, rz);
    kern::add_inplace(z, cz, rz.f32(), cz, r * r, cz);
  }
}

void AlphaFold::Impl::recycled_pair_rows(const float* p, int64_t r, const float* z_prev, int64_t i0,
                                         int64_t n, int64_t ld, float* blk) const {
  const int64_t cz = cfg.evoformer.c_z;
  // Distance bins: lower edges linspace(3.25, 20.75, 15)^2, each bin up to the next edge (the last
  // up to 1e8), strict on both sides; no bin below 3.25 A.
  double edge[kRecycleBins + 1];
  for (int b = 0; b < kRecycleBins; ++b) {
    const double e = 3.25 + (20.75 - 3.25) * b / (kRecycleBins - 1);
    edge[b] = e * e;
  }
  edge[kRecycleBins] = 1e8;
  const float* W = rec_lin.w.f32();  // [c_z, 15]
  apply_layernorm(rec_ln_z, z_prev, n * ld, cz, blk);
#pragma omp parallel for
  for (int64_t i = i0; i < i0 + n; ++i)
    for (int64_t j = 0; j < r; ++j) {
      double d2 = 0;
      for (int c = 0; c < 3; ++c) {
        const double d = static_cast<double>(p[3 * i + c]) - p[3 * j + c];
        d2 += d * d;
      }
      int bin = -1;
      for (int b = 0; b < kRecycleBins; ++b)
        if (d2 > edge[b] && d2 < edge[b + 1]) bin = b;
      float* out = blk + ((i - i0) * ld + j) * cz;
      for (int64_t c = 0; c < cz; ++c)
        out[c] += (bin >= 0 ? W[c * kRecycleBins + bin] : 0.0f) + rec_lin.b.f32()[c];
    }
}

namespace {}  // namespace

// Template pair features of template t (golden README, forward pass step 3), rows i0 .. i0+n.
void af2::template_pair_feat(const PassFeatures& f, int64_t t, int64_t i0, int64_t n, int64_t ld,
                             float* out) {
  const int64_t r = f.r, F = kTemplPairFeat;
  const int64_t* aa = f.t_aatype.data<int64_t>() + t * r;
  const float* pb = f.t_pb.f32() + t * r * 3;
  const float* pbm = f.t_pb_mask.f32() + t * r;
  const float* am = f.t_atom_mask.f32() + t * r * af2::kAtom37;
  std::vector<float> bb(r);  // [r] backbone mask N * CA * C
  for (int64_t i = 0; i < r; ++i)
    bb[i] = am[i * af2::kAtom37 + 0] * am[i * af2::kAtom37 + 1] * am[i * af2::kAtom37 + 2];
  double lower[kTemplDistBins], upper[kTemplDistBins];
  for (int b = 0; b < kTemplDistBins; ++b) {
    const double e = 3.25 + (50.75 - 3.25) * b / (kTemplDistBins - 1);
    lower[b] = e * e;
  }
  for (int b = 0; b < kTemplDistBins; ++b) upper[b] = b + 1 < kTemplDistBins ? lower[b + 1] : 1e5;
#pragma omp parallel for
  for (int64_t i = i0; i < i0 + n; ++i)
    for (int64_t j = 0; j < r; ++j) {
      float* o = out + ((i - i0) * ld + j) * F;
      std::fill(o, o + F, 0.0f);
      double d2 = 0;
      for (int c = 0; c < 3; ++c) {
        const double d = static_cast<double>(pb[3 * i + c]) - pb[3 * j + c];
        d2 += d * d;
      }
      for (int b = 0; b < kTemplDistBins; ++b)
        if (d2 > lower[b] && d2 < upper[b]) o[b] = 1.0f;
      o[39] = pbm[i] * pbm[j];
      o[40 + aa[j]] = 1.0f;
      o[62 + aa[i]] = 1.0f;
      o[87] = bb[i] * bb[j];
      const float w = bb[i] * bb[j];
      for (int64_t c = 0; c < F; ++c) o[c] *= w;
    }
}

namespace {

// Template angle features [r, 57] of template t.
void template_angle_feat(const PassFeatures& f, int64_t t, float* out) {
  const int64_t r = f.r;
  for (int64_t i = 0; i < r; ++i) {
    float* o = out + i * kTemplAngleFeat;
    std::fill(o, o + kTemplAngleFeat, 0.0f);
    o[f.t_aatype.data<int64_t>()[t * r + i]] = 1.0f;
    for (int a = 0; a < 14; ++a) {
      o[22 + a] = f.t_tors.f32()[(t * r + i) * 14 + a];
      o[36 + a] = f.t_alt_tors.f32()[(t * r + i) * 14 + a];
    }
    for (int a = 0; a < 7; ++a) o[50 + a] = f.t_tors_mask.f32()[(t * r + i) * 7 + a];
  }
}

}  // namespace

Status AlphaFold::Impl::embed_templates(const PassFeatures& f, const Tensor& pair_mask,
                                        const AlphaFoldOptions& opts, float* z, Tensor* single,
                                        const Emit& emit) const {
  const int64_t r = f.r, T = f.T, rr = r * r, cz = cfg.evoformer.c_z;
  const EvoformerConfig& tc = cfg.template_pair;
  const int64_t ct = tc.c_z, H = cfg.template_att_heads, C = cfg.template_att_hidden, hc = H * C;
  // The template pair stack's block context: pair masks only.
  Tensor bias = Tensor::empty({r, r}), bias_t = Tensor::empty({r, r});  // [r, r] inf*(mask-1)
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) {
      bias.f32()[i * r + j] = tc.inf * (pair_mask.f32()[i * r + j] - 1.0f);
      bias_t.f32()[j * r + i] = bias.f32()[i * r + j];
    }
  BlockContext ctx = shape_context(tc, 1, r, opts.chunk, opts.chunk_target_bytes, num_threads());
  ctx.dtype = opts.dtype;
  ctx.pair_mask = pair_mask.f32();
  ctx.pair_bias = bias.f32();
  ctx.pair_bias_t = bias_t.f32();
  // Pointwise attention over the templates with an online softmax, so one template's stack output
  // is alive at a time: o [r*r, H*C] accumulates exp(logit - mx) v, den and mx are [r*r, H]; the
  // queries are recomputed from z per block of pair rows.
  const int64_t block = af2::template_block_positions(rr, hc, opts.pair_block_bytes);
  Tensor o = Tensor::zeros({rr, hc});            // [r*r, H*C]
  Tensor den = Tensor::zeros({rr, H});           // [r*r, H]
  Tensor mx = Tensor::full({rr, H}, -INFINITY);  // [r*r, H]
  for (int64_t t = 0; t < T; ++t) {
    Tensor act = Tensor::empty({r, r, ct});  // [r, r, c_t]
    {
      Tensor feat = Tensor::empty({r, r, kTemplPairFeat});  // [r, r, 88]
      af2::template_pair_feat(f, t, 0, r, r, feat.f32());
      emit("template.pair_feat", static_cast<int>(t), feat);
      apply_linear(tmpl_pair_lin, feat.f32(), rr, act.f32());
    }
    emit("template.pair_act", static_cast<int>(t), act);
    float* a = act.f32();
    for (const TemplateBlock& b : tmpl_blocks)
      for (const LayerDesc& l : kTemplatePairBlock) layer_forward(l, &b.w, ctx, nullptr, a);
    apply_layernorm(tmpl_ln, a, rr, ct, a);
    emit("template.pair_stack", static_cast<int>(t), act);
    const float mask_bias = cfg.template_att_inf * (f.t_mask.f32()[t] - 1.0f);
    template_attention_update(z, a, rr, block, mask_bias, o.f32(), den.f32(), mx.f32());
  }
  template_attention_normalise(o.f32(), den.f32(), rr);
  // z += Linear(o), zero when no template is present; over blocks of pair rows unless traced.
  float any = 0.0f;
  for (int64_t t = 0; t < T; ++t) any += f.t_mask.f32()[t];
  if (emit) {
    Tensor att = Tensor::empty({r, r, cz});  // [r, r, c_z]
    apply_linear(tmpl_o, o.f32(), rr, att.f32());
    emit("template.pointwise_att", -1, att);
    if (!(any > 0.0f)) std::fill(att.f32(), att.f32() + att.numel(), 0.0f);
    emit("template.template_pair_embedding", -1, att);
    kern::add_inplace(z, cz, att.f32(), cz, rr, cz);
  } else if (any > 0.0f) {
    template_attention_add(o.f32(), rr, block, z);
  }
  *single = template_single(f, emit);
  return Status::OK();
}

Tensor AlphaFold::Impl::template_single(const PassFeatures& f, const Emit& emit) const {
  const int64_t r = f.r, T = f.T, cm = cfg.evoformer.c_m;
  // Template angle embedding: MSA rows appended after the clusters.
  Tensor feat = Tensor::empty({T, r, kTemplAngleFeat});  // [T, r, 57]
  for (int64_t t = 0; t < T; ++t) template_angle_feat(f, t, feat.f32() + t * r * kTemplAngleFeat);
  emit("template.angle_feat", -1, feat);
  Tensor h1 = Tensor::empty({T, r, cm});  // [T, r, c_m]
  apply_linear(tmpl_single_1, feat.f32(), T * r, h1.f32());
  kern::relu_inplace(h1.f32(), cm, T * r, cm);
  Tensor single = Tensor::empty({T, r, cm});  // [T, r, c_m]
  apply_linear(tmpl_single_2, h1.f32(), T * r, single.f32());
  emit("template.template_single_embedding", -1, single);
  return single;
}

void AlphaFold::Impl::template_attention_update(const float* z, const float* a, int64_t rr,
                                                int64_t block, float mask_bias, float* o_,
                                                float* den_, float* mx_) const {
  const int64_t cz = cfg.evoformer.c_z, ct = cfg.template_pair.c_z;
  const int64_t H = cfg.template_att_heads, C = cfg.template_att_hidden, hc = H * C;
  const float qs = 1.0f / std::sqrt(static_cast<float>(C));
  Tensor kv = Tensor::empty({std::min(block, rr), 2 * hc});  // [block, k | v]
  Tensor q = Tensor::empty({std::min(block, rr), hc});       // [block, H*C] scaled queries
  for (int64_t p0 = 0; p0 < rr; p0 += block) {
    const int64_t n = std::min(block, rr - p0);
    apply_linear(tmpl_q, z + p0 * cz, n, q.f32());
    for (int64_t k = 0; k < n * hc; ++k) q.f32()[k] *= qs;
    kern::linear(a + p0 * ct, ct, n, ct, tmpl_k.w.f32(), nullptr, hc, kv.f32(), 2 * hc);
    kern::linear(a + p0 * ct, ct, n, ct, tmpl_v.w.f32(), nullptr, hc, kv.f32() + hc, 2 * hc);
#pragma omp parallel for
    for (int64_t p = 0; p < n; ++p)
      for (int64_t h = 0; h < H; ++h) {
        const float* qp = q.f32() + p * hc + h * C;
        const float* kp = kv.f32() + p * 2 * hc + h * C;
        const float* vp = kp + hc;
        float logit = mask_bias;
        for (int64_t c = 0; c < C; ++c) logit += qp[c] * kp[c];
        float& m_ = mx_[(p0 + p) * H + h];
        float& d_ = den_[(p0 + p) * H + h];
        float* op = o_ + (p0 + p) * hc + h * C;
        const float m_new = std::max(m_, logit);
        const float scale = std::exp(m_ - m_new), e = std::exp(logit - m_new);
        for (int64_t c = 0; c < C; ++c) op[c] = op[c] * scale + e * vp[c];
        d_ = d_ * scale + e;
        m_ = m_new;
      }
  }
}

void AlphaFold::Impl::template_attention_normalise(float* o, const float* den, int64_t rr) const {
  const int64_t H = cfg.template_att_heads, C = cfg.template_att_hidden, hc = H * C;
  for (int64_t p = 0; p < rr; ++p)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < C; ++c) o[p * hc + h * C + c] /= den[p * H + h];
}

void AlphaFold::Impl::template_attention_add(const float* o, int64_t rr, int64_t block,
                                             float* z) const {
  const int64_t cz = cfg.evoformer.c_z, hc = cfg.template_att_heads * cfg.template_att_hidden;
  Tensor att = Tensor::empty({std::min(block, rr), cz});  // [block, c_z]
  for (int64_t p0 = 0; p0 < rr; p0 += block) {
    const int64_t n = std::min(block, rr - p0);
    apply_linear(tmpl_o, o + p0 * hc, n, att.f32());
    kern::add_inplace(z + p0 * cz, cz, att.f32(), cz, n, cz);
  }
}

Status AlphaFold::Impl::run_extra_msa(const PassFeatures& f, const Tensor& pair_mask,
                                      const AlphaFoldOptions& opts, Tensor& z,
                                      const Emit& emit) const {
  const int64_t r = f.r, E = f.E, ce = cfg.extra_msa.c_m;
  Tensor a = Tensor::empty({E, r, ce});  // [E, r, c_e]
  extra_embedding_rows(f, 0, E, a.f32(), emit);
  emit("extra_msa.embedding", -1, a);
  emit("extra_msa_stack.in_z", -1, z);
  ForwardOptions fo;
  fo.chunk = opts.chunk;
  fo.chunk_target_bytes = opts.chunk_target_bytes;
  fo.dtype = opts.dtype;
  Tensor mask = f.extra_msa_mask;
  FC_RETURN_IF_ERROR(extra.forward(a, z, mask, pair_mask, fo));
  emit("extra_msa_stack.z", -1, z);
  return Status::OK();
}

void AlphaFold::Impl::extra_embedding_rows(const PassFeatures& f, int64_t e0, int64_t n, float* a,
                                           const Emit& emit) const {
  const int64_t r = f.r;
  Tensor feat = Tensor::zeros({n, r, kExtraFeat});  // [n, r, 25]
  for (int64_t k = 0; k < n * r; ++k) {
    float* o = feat.f32() + k * kExtraFeat;
    o[f.extra_msa.data<int64_t>()[e0 * r + k]] = 1.0f;
    o[23] = f.extra_has_deletion.f32()[e0 * r + k];
    o[24] = f.extra_deletion_value.f32()[e0 * r + k];
  }
  emit("extra_msa.feat", -1, feat);
  apply_linear(extra_lin, feat.f32(), n * r, a);
}

void AlphaFold::Impl::plddt_head(const Tensor& single, std::map<std::string, Tensor>* out) const {
  const int64_t r = single.dim(0);
  const int64_t cs = cfg.evoformer.c_s, ch = plddt_1.w.dim(0), pbins = plddt_3.w.dim(0);
  Tensor x = Tensor::empty({r, cs}), h1 = Tensor::empty({r, ch}), h2 = Tensor::empty({r, ch});
  apply_layernorm(plddt_ln, single.f32(), r, cs, x.f32());
  apply_linear(plddt_1, x.f32(), r, h1.f32());
  kern::relu_inplace(h1.f32(), ch, r, ch);
  apply_linear(plddt_2, h1.f32(), r, h2.f32());
  kern::relu_inplace(h2.f32(), ch, r, ch);
  Tensor lddt = Tensor::empty({r, pbins});  // [r, 50]
  apply_linear(plddt_3, h2.f32(), r, lddt.f32());
  Tensor plddt = Tensor::empty({r});
  af2::plddt_from_logits(lddt.f32(), r, pbins, plddt.f32());
  (*out)["lddt_logits"] = lddt;
  (*out)["plddt"] = plddt;
}

void AlphaFold::Impl::run_heads(const PassFeatures& f, const Tensor& m, const Tensor& z,
                                const Tensor& s, const af2::StructureModuleOutput& sm_out,
                                std::map<std::string, Tensor>* out) const {
  const int64_t r = f.r, S = f.S;
  plddt_head(sm_out.single, out);
  // Distogram: symmetrised logits.
  const int64_t db = distogram.w.dim(0);
  Tensor dist = Tensor::empty({r, r, db});  // [r, r, 64] logits, then symmetrised in place
  apply_linear(distogram, z.f32(), r * r, dist.f32());
  float* dl = dist.f32();
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = i; j < r; ++j)
      for (int64_t b = 0; b < db; ++b) {
        float& x = dl[(i * r + j) * db + b];
        float& y = dl[(j * r + i) * db + b];
        x = y = x + y;
      }
  (*out)["distogram_logits"] = dist;
  Tensor mm = Tensor::empty({S, r, 23});  // [S, r, 23] on the cluster rows only
  apply_linear(masked_msa, m.f32(), S * r, mm.f32());
  (*out)["masked_msa_logits"] = mm;
  Tensor er = Tensor::empty({r, af2::kAtom37});  // [r, 37] from the Evoformer single
  apply_linear(exp_resolved, s.f32(), r, er.f32());
  (*out)["experimentally_resolved_logits"] = er;
  if (cfg.ptm) {
    const int64_t tb = tm.w.dim(0);
    Tensor logits = Tensor::empty({r, r, tb});  // [r, r, 64], not symmetrised
    apply_linear(tm, z.f32(), r * r, logits.f32());
    Tensor probs = Tensor::empty({r, r, tb}), pae = Tensor::empty({r, r});
    Tensor max_pae = Tensor::empty({}), ptm = Tensor::empty({});
    af2::predicted_aligned_error(logits.f32(), r, tb, 31.0f, probs.f32(), pae.f32(), max_pae.f32());
    ptm.f32()[0] = af2::predicted_tm_score(logits.f32(), nullptr, r, tb, 31.0f);
    (*out)["tm_logits"] = logits;
    (*out)["aligned_confidence_probs"] = probs;
    (*out)["predicted_aligned_error"] = pae;
    (*out)["max_predicted_aligned_error"] = max_pae;
    (*out)["ptm_score"] = ptm;
  }
}

AlphaFold::AlphaFold() : impl_(std::make_unique<Impl>()) {}
AlphaFold::~AlphaFold() = default;
AlphaFold::AlphaFold(AlphaFold&&) noexcept = default;
AlphaFold& AlphaFold::operator=(AlphaFold&&) noexcept = default;

Status AlphaFold::load(const AlphaFoldConfig& cfg, const TensorFile& weights, AlphaFold* out) {
  auto impl = std::make_unique<Impl>();
  impl->cfg = cfg;
  FC_RETURN_IF_ERROR(impl->load(weights));
  out->impl_ = std::move(impl);
  return Status::OK();
}

Status AlphaFold::forward(const FeatureDict& features, std::map<std::string, Tensor>* out,
                          const AlphaFoldOptions& opts) const {
  return impl_->forward(features, out, opts);
}

const AlphaFoldConfig& AlphaFold::config() const { return impl_->cfg; }

}  // namespace fc
