#include "model/weights.h"

#include <cstring>

namespace fc {

namespace {
void ln(int64_t c, LayerNormW* w) {
  w->w = Tensor::empty({c});
  w->b = Tensor::empty({c});
}
void lin(int64_t out, int64_t in, bool bias, LinearW* w) {
  w->w = Tensor::empty({out, in});
  if (bias) w->b = Tensor::empty({out});
}
void mha(int64_t H, int64_t C, int64_t c_in, GatedAttentionW* w) {
  w->w_qkvg = Tensor::empty({4 * H * C, c_in});
  w->b_qkvg = Tensor::zeros({4 * H * C});
  lin(c_in, H * C, true, &w->o);
}

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
// The pair modules in state_dict order under prefix p ("pair_stack." in the Evoformer and
// ExtraMSA blocks, "" in a template pair block).
void add_pair_layers(Named* v, const std::string& p, const TriangleMultiplicationW& tri_mul_out,
                     const TriangleMultiplicationW& tri_mul_in,
                     const TriangleAttentionW& tri_att_start, const TriangleAttentionW& tri_att_end,
                     const TransitionW& pair_transition) {
  add_tri_mul(v, p + "tri_mul_out", tri_mul_out);
  add_tri_mul(v, p + "tri_mul_in", tri_mul_in);
  add_tri_att(v, p + "tri_att_start", tri_att_start);
  add_tri_att(v, p + "tri_att_end", tri_att_end);
  add_transition(v, p + "pair_transition", pair_transition);
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
  add_pair_layers(v, p + "pair_stack.", tri_mul_out, tri_mul_in, tri_att_start, tri_att_end,
                  pair_transition);
}
}  // namespace

void allocate_block(const EvoformerConfig& cfg, BlockWeights* w) {
  const int64_t cm = cfg.c_m, cz = cfg.c_z, n = cfg.transition_n;
  const int64_t Hm = cfg.no_heads_msa, Cm = cfg.c_hidden_msa_att, co = cfg.c_hidden_opm;

  ln(cm, &w->msa_att_row.ln_m);
  ln(cz, &w->msa_att_row.ln_z);
  lin(Hm, cz, false, &w->msa_att_row.lin_z);
  mha(Hm, Cm, cm, &w->msa_att_row.mha);

  ln(cm, &w->msa_att_col.ln_m);
  mha(Hm, Cm, cm, &w->msa_att_col.mha);

  ln(cm, &w->msa_transition.ln);
  lin(n * cm, cm, true, &w->msa_transition.l1);
  lin(cm, n * cm, true, &w->msa_transition.l2);

  ln(cm, &w->outer_product_mean.ln);
  lin(2 * co, cm, true, &w->outer_product_mean.l12);
  lin(cz, co * co, true, &w->outer_product_mean.out);

  allocate_pair_layers(cfg, w);
}

void allocate_pair_layers(const EvoformerConfig& cfg, BlockWeights* w) {
  const int64_t cz = cfg.c_z, n = cfg.transition_n;
  const int64_t Hp = cfg.no_heads_pair, Cp = cfg.c_hidden_pair_att, ct = cfg.c_hidden_mul;
  for (TriangleMultiplicationW* t : {&w->tri_mul_out, &w->tri_mul_in}) {
    ln(cz, &t->ln_in);
    lin(4 * ct, cz, true, &t->ab);
    ln(ct, &t->ln_out);
    lin(cz, ct, true, &t->lin_z);
    lin(cz, cz, true, &t->lin_g);
  }
  for (TriangleAttentionW* t : {&w->tri_att_start, &w->tri_att_end}) {
    ln(cz, &t->ln);
    lin(Hp, cz, false, &t->lin);
    mha(Hp, Cp, cz, &t->mha);
  }
  ln(cz, &w->pair_transition.ln);
  lin(n * cz, cz, true, &w->pair_transition.l1);
  lin(cz, n * cz, true, &w->pair_transition.l2);
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

std::vector<std::pair<std::string, Tensor>> named_pair_params(const BlockWeights& w,
                                                              const std::string& p) {
  Named v;
  add_pair_layers(&v, p, w.tri_mul_out, w.tri_mul_in, w.tri_att_start, w.tri_att_end,
                  w.pair_transition);
  return v;
}

// ---- ExtraMSA block --------------------------------------------------------------------------

void allocate_extra_msa_block(const EvoformerConfig& cfg, ExtraMsaBlockWeights* w) {
  const int64_t ce = cfg.c_m, H = cfg.no_heads_msa, C = cfg.c_hidden_msa_att;
  BlockWeights b;  // the modules both block types share; its column attention is dropped
  allocate_block(cfg, &b);
  w->msa_att_row = std::move(b.msa_att_row);
  w->msa_transition = std::move(b.msa_transition);
  w->outer_product_mean = std::move(b.outer_product_mean);
  w->tri_mul_out = std::move(b.tri_mul_out);
  w->tri_mul_in = std::move(b.tri_mul_in);
  w->tri_att_start = std::move(b.tri_att_start);
  w->tri_att_end = std::move(b.tri_att_end);
  w->pair_transition = std::move(b.pair_transition);

  MsaColumnGlobalAttentionW& g = w->msa_att_col;
  ln(ce, &g.ln_m);
  lin(H * C, ce, false, &g.q);
  g.kvg.w = Tensor::empty({2 * C + H * C, ce});
  g.kvg.b = Tensor::zeros({2 * C + H * C});
  lin(ce, H * C, true, &g.o);
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
