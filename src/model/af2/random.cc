// Seeded random AlphaFold2 parameters and features (benchmarks and the embedded default job).
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "foldcube/alphafold.h"
#include "foldcube/extra_msa.h"
#include "foldcube/model.h"
#include "model/af2/residue_constants.h"
#include "model/af2/structure_module.h"
#include "model/common.h"
#include "model/weights.h"

namespace fc {

AlphaFoldConfig alphafold_model_1_ptm() {
  AlphaFoldConfig c;
  c.evoformer = EvoformerConfig();  // model_1 Evoformer, 48 blocks
  EvoformerConfig e;
  e.c_m = 64;
  e.c_hidden_msa_att = 8;
  e.no_heads_msa = 8;
  e.no_blocks = 4;
  c.extra_msa = e;
  EvoformerConfig t;
  t.c_z = 64;
  t.c_hidden_pair_att = 16;
  t.no_heads_pair = 2;
  t.c_hidden_mul = 64;
  t.transition_n = 2;
  t.no_blocks = 2;
  c.template_pair = t;
  c.templates = true;
  c.template_att_heads = 4;
  c.template_att_hidden = 16;
  c.structure_layers = 8;
  c.ptm = true;
  return c;
}

Status alphafold_preset(const std::string& name, AlphaFoldConfig* out) {
  AlphaFoldConfig c = alphafold_model_1_ptm();
  std::string base = name;
  c.ptm = base.size() > 4 && base.compare(base.size() - 4, 4, "_ptm") == 0;
  if (c.ptm) base.resize(base.size() - 4);
  if (base.size() != 7 || base.compare(0, 6, "model_") != 0 || base[6] < '1' || base[6] > '5')
    return Status::InvalidArgument("unknown AlphaFold config '" + name +
                                   "' (model_1 ... model_5, optionally with _ptm)");
  c.templates = base[6] <= '2';  // models 1 and 2 take templates
  *out = c;
  return Status::OK();
}

TensorFile AlphaFold::random_weights(const AlphaFoldConfig& cfg, uint64_t seed,
                                     const BlockFilter& keep) {
  TensorFile f;
  f.metadata["format"] = "foldcube-random-af2/1";
  auto kept = [&](const std::string& stack, int64_t b, int64_t blocks) {
    return !keep || keep(stack, b, blocks);
  };
  // The stacks' blocks one at a time (the values EvoformerStack::random / ExtraMsaStack::random
  // give), so that a filtered call never holds a left-out block.
  auto put_random = [&](const std::string& stack,
                        const std::vector<std::pair<std::string, Tensor>>& params, uint64_t s) {
    for (const auto& [name, view] : params) {
      random_fill(name, view, s);
      f.put(stack + name, view);
    }
  };
  for (int b = 0; b < cfg.evoformer.no_blocks; ++b) {
    if (!kept("evoformer.", b, cfg.evoformer.no_blocks)) continue;
    BlockWeights w;
    allocate_block(cfg.evoformer, &w);
    put_random("evoformer.", named_params(w, block_prefix(b)), seed);
  }
  const int64_t cm = cfg.evoformer.c_m, cz = cfg.evoformer.c_z, cs = cfg.evoformer.c_s;
  put_random("evoformer.",
             {{"linear.weight", Tensor::empty({cs, cm})}, {"linear.bias", Tensor::empty({cs})}},
             seed);
  for (int b = 0; b < cfg.extra_msa.no_blocks; ++b) {
    if (!kept("extra_msa_stack.", b, cfg.extra_msa.no_blocks)) continue;
    ExtraMsaBlockWeights w;
    allocate_extra_msa_block(cfg.extra_msa, &w);
    put_random("extra_msa_stack.", named_params(w, block_prefix(b)), seed + 1);
  }
  const int64_t ce = cfg.extra_msa.c_m, ct = cfg.template_pair.c_z;
  const int64_t hc = cfg.template_att_heads * cfg.template_att_hidden;
  const af2::StructureModuleConfig sm;  // AF2 widths
  const int64_t H = sm.no_heads_ipa, C = sm.c_ipa, Pq = sm.no_qk_points, Pv = sm.no_v_points;
  const int64_t cr = sm.c_resnet, ch = 128;
  std::vector<std::pair<std::string, Shape>> specs;  // (name, shape)
  auto lin = [&](const std::string& name, int64_t out, int64_t in, bool bias = true) {
    specs.push_back({name + ".weight", {out, in}});
    if (bias) specs.push_back({name + ".bias", {out}});
  };
  auto ln = [&](const std::string& name, int64_t c) {
    specs.push_back({name + ".weight", {c}});
    specs.push_back({name + ".bias", {c}});
  };
  lin("input_embedder.linear_tf_z_i", cz, 22);
  lin("input_embedder.linear_tf_z_j", cz, 22);
  lin("input_embedder.linear_tf_m", cm, 22);
  lin("input_embedder.linear_msa_m", cm, 49);
  lin("input_embedder.linear_relpos", cz, 2 * cfg.relpos_k + 1);
  lin("recycling_embedder.linear", cz, 15);
  ln("recycling_embedder.layer_norm_m", cm);
  ln("recycling_embedder.layer_norm_z", cz);
  lin("extra_msa_embedder.linear", ce, 25);
  if (cfg.templates) {
    const std::string te = "template_embedder.";
    lin(te + "template_single_embedder.linear_1", cm, 57);
    lin(te + "template_single_embedder.linear_2", cm, cm);
    lin(te + "template_pair_embedder.linear", ct, 88);
    ln(te + "template_pair_stack.layer_norm", ct);
    lin(te + "template_pointwise_att.mha.linear_q", hc, cz, false);
    lin(te + "template_pointwise_att.mha.linear_k", hc, ct, false);
    lin(te + "template_pointwise_att.mha.linear_v", hc, ct, false);
    lin(te + "template_pointwise_att.mha.linear_o", cz, hc);
    for (int64_t b = 0; b < cfg.template_pair.no_blocks; ++b) {
      if (!kept(te + "template_pair_stack.", b, cfg.template_pair.no_blocks)) continue;
      BlockWeights w;
      allocate_pair_layers(cfg.template_pair, &w);
      for (auto& [name, view] :
           named_pair_params(w, te + "template_pair_stack." + block_prefix(static_cast<int>(b))))
        specs.push_back({name, view.shape()});
    }
  }
  const std::string p = "structure_module.";
  ln(p + "layer_norm_s", cs);
  ln(p + "layer_norm_z", cz);
  lin(p + "linear_in", cs, cs);
  specs.push_back({p + "ipa.head_weights", {H}});
  lin(p + "ipa.linear_q", H * C, cs);
  lin(p + "ipa.linear_kv", 2 * H * C, cs);
  lin(p + "ipa.linear_q_points.linear", 3 * H * Pq, cs);
  lin(p + "ipa.linear_kv_points.linear", 3 * H * (Pq + Pv), cs);
  lin(p + "ipa.linear_b", H, cz);
  lin(p + "ipa.linear_out", cs, H * (C + 4 * Pv + cz));
  ln(p + "layer_norm_ipa", cs);
  for (const char* n : {"linear_1", "linear_2", "linear_3"})
    lin(p + "transition.layers.0." + n, cs, cs);
  ln(p + "transition.layer_norm", cs);
  lin(p + "bb_update.linear", 6, cs);
  lin(p + "angle_resnet.linear_in", cr, cs);
  lin(p + "angle_resnet.linear_initial", cr, cs);
  for (int k = 0; k < 2; ++k)
    for (const char* n : {"linear_1", "linear_2"})
      lin(p + "angle_resnet.layers." + std::to_string(k) + "." + n, cr, cr);
  lin(p + "angle_resnet.linear_out", 14, cr);
  ln("aux_heads.plddt.layer_norm", cs);
  lin("aux_heads.plddt.linear_1", ch, cs);
  lin("aux_heads.plddt.linear_2", ch, ch);
  lin("aux_heads.plddt.linear_3", 50, ch);
  lin("aux_heads.distogram.linear", 64, cz);
  lin("aux_heads.masked_msa.linear", 23, cm);
  lin("aux_heads.experimentally_resolved.linear", 37, cs);
  if (cfg.ptm) lin("aux_heads.tm.linear", 64, cz);
  for (const auto& [name, shape] : specs) {
    Tensor t = Tensor::empty(shape);
    random_fill(name, t, seed + 2);
    // A damped backbone update keeps the random structures compact (translations in nm).
    if (name.find("bb_update") != std::string::npos)
      for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] *= 0.1f;
    f.put(name, t);
  }
  return f;
}

FeatureDict random_alphafold_features(int64_t r, int64_t S, int64_t E, int64_t T, int passes,
                                      uint64_t seed) {
  uint64_t counter = 0;
  auto u01 = [&]() { return 0.5f * (uniform_pm1(seed, counter++) + 1.0f); };
  auto pick = [&](int64_t n) { return std::min<int64_t>(n - 1, static_cast<int64_t>(u01() * n)); };
  const int64_t R = passes;
  auto f32 = [&](const Shape& s) { return Tensor::zeros(s); };
  auto i64 = [&](const Shape& s) { return Tensor::zeros(s, DType::I64); };
  FeatureDict d;
  Tensor aatype = i64({r, R}), ri = i64({r, R}), tf = f32({r, 22, R}), seq_mask = f32({r, R});
  std::vector<int64_t> aa(r);
  for (int64_t i = 0; i < r; ++i) aa[i] = pick(20);
  for (int64_t i = 0; i < r; ++i)
    for (int64_t k = 0; k < R; ++k) {
      aatype.data<int64_t>()[i * R + k] = aa[i];
      ri.data<int64_t>()[i * R + k] = i;
      tf.f32()[(i * 22 + 1 + aa[i]) * R + k] = 1.0f;
      seq_mask.f32()[i * R + k] = 1.0f;
    }
  d["aatype"] = aatype;
  d["residue_index"] = ri;
  d["target_feat"] = tf;
  d["seq_mask"] = seq_mask;
  Tensor msa_feat = f32({S, r, 49, R}), msa_mask = Tensor::full({S, r, R}, 1.0f);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t k = 0; k < R; ++k) {
        float* x = msa_feat.f32() + (s * r + j) * 49 * R + k;  // stride R along channels
        const int64_t tok = s == 0 ? aa[j] : pick(22);
        x[tok * R] = 1.0f;
        const float del = u01() < 0.1f ? 1.0f : 0.0f;
        x[23 * R] = del;
        x[24 * R] = del * 0.2f;
        float sum = 0;
        for (int c = 0; c < 23; ++c) sum += x[(25 + c) * R] = u01();
        for (int c = 0; c < 23; ++c) x[(25 + c) * R] /= sum;
        x[48 * R] = 0.1f * u01();
      }
  d["msa_feat"] = msa_feat;
  d["msa_mask"] = msa_mask;
  Tensor extra = i64({E, r, R}), has_del = f32({E, r, R}), del_val = f32({E, r, R});
  for (int64_t e = 0; e < E * r * R; ++e) {
    extra.data<int64_t>()[e] = pick(22);
    has_del.f32()[e] = u01() < 0.1f ? 1.0f : 0.0f;
    del_val.f32()[e] = has_del.f32()[e] * 0.2f;
  }
  d["extra_msa"] = extra;
  d["extra_has_deletion"] = has_del;
  d["extra_deletion_value"] = del_val;
  d["extra_msa_mask"] = Tensor::full({E, r, R}, 1.0f);
  if (T > 0) {
    Tensor taa = i64({T, r, R}), pos = f32({T, r, 37, 3, R}), amask = f32({T, r, 37, R});
    Tensor pb = f32({T, r, 3, R}), pbm = f32({T, r, R}), tors = f32({T, r, 7, 2, R});
    Tensor alt = f32({T, r, 7, 2, R}), tmask = f32({T, r, 7, R});
    for (int64_t t = 0; t < T; ++t) {
      float x[3] = {0, 0, 0};  // a random walk of 3.8 A steps for the CA trace
      for (int64_t i = 0; i < r; ++i) {
        float dir[3] = {uniform_pm1(seed, counter++), uniform_pm1(seed, counter++),
                        uniform_pm1(seed, counter++)};
        const float n = std::sqrt(dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2]) + 1e-6f;
        for (int c = 0; c < 3; ++c) x[c] += 3.8f * dir[c] / n;
        const int64_t ta = aa[i];
        for (int64_t k = 0; k < R; ++k) {
          taa.data<int64_t>()[(t * r + i) * R + k] = ta;
          for (int a = 0; a < 5; ++a) {  // N, CA, C, CB, O near the CA
            amask.f32()[((t * r + i) * 37 + a) * R + k] = 1.0f;
            for (int c = 0; c < 3; ++c)
              pos.f32()[(((t * r + i) * 37 + a) * 3 + c) * R + k] = x[c] + 0.5f * a * (c == 0);
          }
          for (int c = 0; c < 3; ++c) pb.f32()[((t * r + i) * 3 + c) * R + k] = x[c];
          pbm.f32()[(t * r + i) * R + k] = 1.0f;
          for (int a = 0; a < 7; ++a) {
            const float ang = 3.14159265f * uniform_pm1(seed, counter++);
            for (Tensor* tt : {&tors, &alt}) {
              tt->f32()[(((t * r + i) * 7 + a) * 2 + 0) * R + k] = std::sin(ang);
              tt->f32()[(((t * r + i) * 7 + a) * 2 + 1) * R + k] = std::cos(ang);
            }
            tmask.f32()[((t * r + i) * 7 + a) * R + k] = 1.0f;
          }
        }
      }
    }
    d["template_aatype"] = taa;
    d["template_all_atom_positions"] = pos;
    d["template_all_atom_mask"] = amask;
    d["template_mask"] = Tensor::full({T, R}, 1.0f);
    d["template_pseudo_beta"] = pb;
    d["template_pseudo_beta_mask"] = pbm;
    d["template_torsion_angles_sin_cos"] = tors;
    d["template_alt_torsion_angles_sin_cos"] = alt;
    d["template_torsion_angles_mask"] = tmask;
  }
  return d;
}

}  // namespace fc
