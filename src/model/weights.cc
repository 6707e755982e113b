#include "model/weights.h"

#include <cstring>

#include "model/param_alloc.h"

namespace fc {

namespace {
using Named = std::vector<std::pair<std::string, Tensor>>;

void add_ln(Named* v, const std::string& p, const LayerNormW& w) {
  v->emplace_back(p + ".weight", w.w);
  v->emplace_back(p + ".bias", w.b);
}
void add_lin(Named* v, const std::string& p, const LinearW& w) {
  v->emplace_back(p + ".weight", w.w);
  if (w.b.defined()) v->emplace_back(p + ".bias", w.b);
}
void add_mha(Named* v, const std::string& p, const GatedAttentionW& w) {
  const int64_t hc = w.w_qkvg.dim(0) / 4;
  v->emplace_back(p + ".linear_q.weight", w.w_qkvg.slice(0, 0, hc));
  v->emplace_back(p + ".linear_k.weight", w.w_qkvg.slice(0, hc, 2 * hc));
  v->emplace_back(p + ".linear_v.weight", w.w_qkvg.slice(0, 2 * hc, 3 * hc));
  v->emplace_back(p + ".linear_o.weight", w.o.w);
  v->emplace_back(p + ".linear_o.bias", w.o.b);
  v->emplace_back(p + ".linear_g.weight", w.w_qkvg.slice(0, 3 * hc, 4 * hc));
  v->emplace_back(p + ".linear_g.bias", w.b_qkvg.slice(0, 3 * hc, 4 * hc));
}
void add_transition(Named* v, const std::string& p, const TransitionW& w) {
  add_ln(v, p + ".layer_norm", w.ln);
  add_lin(v, p + ".linear_1", w.l1);
  add_lin(v, p + ".linear_2", w.l2);
}
void add_tri_mul(Named* v, const std::string& p, const TriangleMultiplicationW& w) {
  const int64_t ct = w.ab.w.dim(0) / 4;
  const char* parts[4] = {"linear_a_p", "linear_a_g", "linear_b_p", "linear_b_g"};
  for (int i = 0; i < 4; ++i) {
    v->emplace_back(p + "." + parts[i] + ".weight", w.ab.w.slice(0, i * ct, (i + 1) * ct));
    v->emplace_back(p + "." + parts[i] + ".bias", w.ab.b.slice(0, i * ct, (i + 1) * ct));
  }
  add_ln(v, p + ".layer_norm_in", w.ln_in);
  add_ln(v, p + ".layer_norm_out", w.ln_out);
  add_lin(v, p + ".linear_z", w.lin_z);
  add_lin(v, p + ".linear_g", w.lin_g);
}
void add_tri_att(Named* v, const std::string& p, const TriangleAttentionW& w) {
  add_ln(v, p + ".layer_norm", w.ln);
  add_lin(v, p + ".linear", w.lin);
  add_mha(v, p + ".mha", w.mha);
}
// The modules both block types share, from the MSA transition on, in state_dict order.
void add_block_tail(Named* v, const std::string& p, const TransitionW& msa_transition,
                    const OuterProductMeanW& o, const TriangleMultiplicationW& tri_mul_out,
                    const TriangleMultiplicationW& tri_mul_in,
                    const TriangleAttentionW& tri_att_start, const TriangleAttentionW& tri_att_end,
                    const TransitionW& pair_transition) {
  add_transition(v, p + "msa_transition", msa_transition);
  const int64_t co = o.l12.w.dim(0) / 2;
  add_ln(v, p + "outer_product_mean.layer_norm", o.ln);
  v->emplace_back(p + "outer_product_mean.linear_1.weight", o.l12.w.slice(0, 0, co));
  v->emplace_back(p + "outer_product_mean.linear_1.bias", o.l12.b.slice(0, 0, co));
  v->emplace_back(p + "outer_product_mean.linear_2.weight", o.l12.w.slice(0, co, 2 * co));
  v->emplace_back(p + "outer_product_mean.linear_2.bias", o.l12.b.slice(0, co, 2 * co));
  add_lin(v, p + "outer_product_mean.linear_out", o.out);
  add_tri_mul(v, p + "pair_stack.tri_mul_out", tri_mul_out);
  add_tri_mul(v, p + "pair_stack.tri_mul_in", tri_mul_in);
  add_tri_att(v, p + "pair_stack.tri_att_start", tri_att_start);
  add_tri_att(v, p + "pair_stack.tri_att_end", tri_att_end);
  add_transition(v, p + "pair_stack.pair_transition", pair_transition);
}
}  // namespace

void allocate_block(const EvoformerConfig& cfg, BlockWeights* w) {
  allocate_table(ParamAlloc{}, cfg, kEvoformerBlock, w);
}

void allocate_pair_layers(const EvoformerConfig& cfg, BlockWeights* w) {
  allocate_table(ParamAlloc{}, cfg, kTemplatePairBlock, w);
}

std::vector<std::pair<std::string, Tensor>> named_params(const BlockWeights& w,
                                                         const std::string& p) {
  Named v;
  add_ln(&v, p + "msa_att_row.layer_norm_m", w.msa_att_row.ln_m);
  add_ln(&v, p + "msa_att_row.layer_norm_z", w.msa_att_row.ln_z);
  add_lin(&v, p + "msa_att_row.linear_z", w.msa_att_row.lin_z);
  add_mha(&v, p + "msa_att_row.mha", w.msa_att_row.mha);
  add_ln(&v, p + "msa_att_col._msa_att.layer_norm_m", w.msa_att_col.ln_m);
  add_mha(&v, p + "msa_att_col._msa_att.mha", w.msa_att_col.mha);
  add_block_tail(&v, p, w.msa_transition, w.outer_product_mean, w.tri_mul_out, w.tri_mul_in,
                 w.tri_att_start, w.tri_att_end, w.pair_transition);
  return v;
}

// ---- ExtraMSA block --------------------------------------------------------------------------

void allocate_extra_msa_block(const EvoformerConfig& cfg, ExtraMsaBlockWeights* w) {
  allocate_table(ParamAlloc{}, cfg, kExtraMsaBlock, w);
}

std::vector<std::pair<std::string, Tensor>> named_params(const ExtraMsaBlockWeights& w,
                                                         const std::string& p) {
  Named v;
  add_ln(&v, p + "msa_att_row.layer_norm_m", w.msa_att_row.ln_m);
  add_ln(&v, p + "msa_att_row.layer_norm_z", w.msa_att_row.ln_z);
  add_lin(&v, p + "msa_att_row.linear_z", w.msa_att_row.lin_z);
  add_mha(&v, p + "msa_att_row.mha", w.msa_att_row.mha);
  const MsaColumnGlobalAttentionW& g = w.msa_att_col;
  const std::string ga = p + "msa_att_col.global_attention";
  const int64_t C = (g.kvg.w.dim(0) - g.q.w.dim(0)) / 2, hc = g.q.w.dim(0);
  add_ln(&v, p + "msa_att_col.layer_norm_m", g.ln_m);
  add_lin(&v, ga + ".linear_q", g.q);
  v.emplace_back(ga + ".linear_k.weight", g.kvg.w.slice(0, 0, C));
  v.emplace_back(ga + ".linear_v.weight", g.kvg.w.slice(0, C, 2 * C));
  v.emplace_back(ga + ".linear_g.weight", g.kvg.w.slice(0, 2 * C, 2 * C + hc));
  v.emplace_back(ga + ".linear_g.bias", g.kvg.b.slice(0, 2 * C, 2 * C + hc));
  add_lin(&v, ga + ".linear_o", g.o);
  add_block_tail(&v, p, w.msa_transition, w.outer_product_mean, w.tri_mul_out, w.tri_mul_in,
                 w.tri_att_start, w.tri_att_end, w.pair_transition);
  return v;
}

}  // namespace fc
