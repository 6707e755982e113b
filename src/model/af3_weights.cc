#include "model/af3_weights.h"

#include <cstring>

#include "model/common.h"
#include "model/param_alloc.h"

namespace fc {

namespace {
void add(NamedParams* v, const std::string& name, const Tensor& t) { v->push_back({name, {t}}); }
void add_ln(NamedParams* v, const std::string& p, const LayerNormW& w) {
  add(v, p + ".weight", w.w);
  add(v, p + ".bias", w.b);
}
// Rows [i*k, (i+1)*k) of t, k = t.dim(0) / parts.
Tensor rows_part(const Tensor& t, int parts, int i) {
  const int64_t k = t.dim(0) / parts;
  return t.slice(0, i * k, (i + 1) * k);
}
void add_tri_mul(NamedParams* v, const std::string& p, const TriangleMultiplicationW& w) {
  add_ln(v, p + ".norm_in", w.ln_in);
  // ab rows a_p | a_g | b_p | b_g; Boltz p_in = a_p | b_p, g_in = a_g | b_g.
  v->push_back({p + ".p_in.weight", {rows_part(w.ab.w, 4, 0), rows_part(w.ab.w, 4, 2)}});
  v->push_back({p + ".g_in.weight", {rows_part(w.ab.w, 4, 1), rows_part(w.ab.w, 4, 3)}});
  add_ln(v, p + ".norm_out", w.ln_out);
  add(v, p + ".p_out.weight", w.lin_z.w);
  add(v, p + ".g_out.weight", w.lin_g.w);
}
void add_tri_att(NamedParams* v, const std::string& p, const TriangleAttentionW& w) {
  add_ln(v, p + ".layer_norm", w.ln);
  add(v, p + ".linear.weight", w.lin.w);
  add(v, p + ".mha.linear_q.weight", rows_part(w.mha.w_qkvg, 4, 0));
  add(v, p + ".mha.linear_k.weight", rows_part(w.mha.w_qkvg, 4, 1));
  add(v, p + ".mha.linear_v.weight", rows_part(w.mha.w_qkvg, 4, 2));
  add(v, p + ".mha.linear_o.weight", w.mha.o.w);
  add(v, p + ".mha.linear_g.weight", rows_part(w.mha.w_qkvg, 4, 3));
}
void add_swiglu(NamedParams* v, const std::string& p, const SwiGluTransitionW& w) {
  add_ln(v, p + ".norm", w.ln);
  add(v, p + ".fc1.weight", rows_part(w.fc12.w, 2, 0));
  add(v, p + ".fc2.weight", rows_part(w.fc12.w, 2, 1));
  add(v, p + ".fc3.weight", w.fc3.w);
}
}  // namespace

void allocate_pairformer_block(const EvoformerConfig& cfg, PairformerBlockWeights* w) {
  allocate_table(ParamAlloc{true, true}, cfg, kPairformerBlock, w);
}

void allocate_msa_module_block(const EvoformerConfig& cfg, MsaModuleBlockWeights* w) {
  allocate_table(ParamAlloc{true, true}, cfg, kMsaModuleBlock, w);
  w->pair_weighted_averaging.mha.bias_logits = true;  // Boltz has no proj_q / proj_k
  w->outer_product_mean.mean_first = true;
}

NamedParams boltz_params(const PairformerBlockWeights& w, const std::string& p) {
  NamedParams v;
  const MsaRowAttentionW& a = w.attention;
  add_ln(&v, p + "pre_norm_s", a.ln_m);
  const std::string at = p + "attention.";
  add(&v, at + "proj_q.weight", rows_part(a.mha.w_qkvg, 4, 0));
  add(&v, at + "proj_q.bias", rows_part(a.mha.b_qkvg, 4, 0));
  add(&v, at + "proj_k.weight", rows_part(a.mha.w_qkvg, 4, 1));
  add(&v, at + "proj_v.weight", rows_part(a.mha.w_qkvg, 4, 2));
  add(&v, at + "proj_g.weight", rows_part(a.mha.w_qkvg, 4, 3));
  add_ln(&v, at + "proj_z.0", a.ln_z);
  add(&v, at + "proj_z.1.weight", a.lin_z.w);
  add(&v, at + "proj_o.weight", a.mha.o.w);
  add_tri_mul(&v, p + "tri_mul_out", w.tri_mul_out);
  add_tri_mul(&v, p + "tri_mul_in", w.tri_mul_in);
  add_tri_att(&v, p + "tri_att_start", w.tri_att_start);
  add_tri_att(&v, p + "tri_att_end", w.tri_att_end);
  add_swiglu(&v, p + "transition_s", w.transition_s);
  add_swiglu(&v, p + "transition_z", w.transition_z);
  return v;
}

NamedParams boltz_params(const MsaModuleBlockWeights& w, const std::string& p) {
  NamedParams v;
  add_swiglu(&v, p + "msa_transition", w.msa_transition);
  const MsaRowAttentionW& a = w.pair_weighted_averaging;
  const std::string pw = p + "pair_weighted_averaging.";
  add_ln(&v, pw + "norm_m", a.ln_m);
  add_ln(&v, pw + "norm_z", a.ln_z);
  add(&v, pw + "proj_m.weight", rows_part(a.mha.w_qkvg, 4, 2));
  add(&v, pw + "proj_g.weight", rows_part(a.mha.w_qkvg, 4, 3));
  add(&v, pw + "proj_z.weight", a.lin_z.w);
  add(&v, pw + "proj_o.weight", a.mha.o.w);
  const std::string pl = p + "pairformer_layer.";
  add_tri_mul(&v, pl + "tri_mul_out", w.tri_mul_out);
  add_tri_mul(&v, pl + "tri_mul_in", w.tri_mul_in);
  add_tri_att(&v, pl + "tri_att_start", w.tri_att_start);
  add_tri_att(&v, pl + "tri_att_end", w.tri_att_end);
  add_swiglu(&v, pl + "transition_z", w.transition_z);
  const OuterProductMeanW& o = w.outer_product_mean;
  const std::string po = p + "outer_product_mean.";
  add_ln(&v, po + "norm", o.ln);
  add(&v, po + "proj_a.weight", rows_part(o.l12.w, 2, 0));
  add(&v, po + "proj_b.weight", rows_part(o.l12.w, 2, 1));
  add(&v, po + "proj_o.weight", o.out.w);
  add(&v, po + "proj_o.bias", o.out.b);
  return v;
}

Shape named_shape(const NamedParam& p) {
  Shape s = p.parts.front().shape();
  for (size_t i = 1; i < p.parts.size(); ++i) s[0] += p.parts[i].dim(0);
  return s;
}

Status load_named(const NamedParams& params, const TensorFile& weights) {
  for (const NamedParam& p : params) {
    Tensor t;
    FC_RETURN_IF_ERROR(weights.get_f32(p.name, named_shape(p), &t));
    FC_RETURN_IF_ERROR(check_finite(p.name, t));
    int64_t row = 0;
    for (const Tensor& part : p.parts) {
      Tensor dst = part;
      dst.copy_from(t.slice(0, row, row + part.dim(0)));
      row += part.dim(0);
    }
  }
  return Status::OK();
}

Tensor gather_named(const NamedParam& p) {
  if (p.parts.size() == 1 && p.parts[0].is_contiguous()) return p.parts[0];  // shares the buffer
  Tensor out = Tensor::empty(named_shape(p));
  int64_t row = 0;
  for (const Tensor& part : p.parts) {
    out.slice(0, row, row + part.dim(0)).copy_from(part);
    row += part.dim(0);
  }
  return out;
}

}  // namespace fc
