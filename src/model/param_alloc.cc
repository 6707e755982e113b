#include "model/param_alloc.h"

#include <string>

#include "foldcube/status.h"
#include "model/af3_weights.h"

namespace fc {

namespace {
// kFile: AF2's files carry the bias, AF3's do not (dropped under bias_free); kAlways: fused
// storage whose bias exists in every model (zero where a file has none).
enum class Bias : uint8_t { kNone, kFile, kAlways };

Tensor make(const ParamAlloc& a, const Shape& shape, bool zero = false) {
  if (a.count) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    *a.count += n;
    return Tensor();
  }
  return a.zeros || zero ? Tensor::zeros(shape) : Tensor::empty(shape);
}

void layer_norm(const ParamAlloc& a, int64_t c, LayerNormW* w) {
  w->w = make(a, {c});  // [c]
  w->b = make(a, {c});  // [c]
}

void linear(const ParamAlloc& a, int64_t out, int64_t in, Bias bias, LinearW* w) {
  w->w = make(a, {out, in});  // [out, in]
  if (bias == Bias::kAlways || (bias == Bias::kFile && !a.bias_free))
    w->b = make(a, {out});  // [out]
}

// q | k | v | g rows fused; the q, k, v parts of the bias are zeros unless a file fills them.
void gated_attention(const ParamAlloc& a, int64_t H, int64_t C, int64_t c_in, GatedAttentionW* w) {
  w->w_qkvg = make(a, {4 * H * C, c_in});  // [4*H*C, c_in]
  w->b_qkvg = make(a, {4 * H * C}, true);  // [4*H*C]
  linear(a, c_in, H * C, Bias::kFile, &w->o);
}

int64_t channels(const EvoformerConfig& c, Stream st) { return st == Stream::kM ? c.c_m : c.c_z; }

void allocate_kind(const ParamAlloc& a, const EvoformerConfig& c, const LayerDesc& l, void* p) {
  const int64_t cm = c.c_m, cz = c.c_z, n = c.transition_n;
  switch (l.kind) {
    case LayerKind::kMsaRowAttention: {
      auto* w = static_cast<MsaRowAttentionW*>(p);
      layer_norm(a, cm, &w->ln_m);
      layer_norm(a, cz, &w->ln_z);
      linear(a, c.no_heads_msa, cz, Bias::kNone, &w->lin_z);
      gated_attention(a, c.no_heads_msa, c.c_hidden_msa_att, cm, &w->mha);
      return;
    }
    case LayerKind::kMsaColumnAttention: {
      auto* w = static_cast<MsaColumnAttentionW*>(p);
      layer_norm(a, cm, &w->ln_m);
      gated_attention(a, c.no_heads_msa, c.c_hidden_msa_att, cm, &w->mha);
      return;
    }
    case LayerKind::kMsaColumnGlobalAttention: {
      // k and v: one head shared by all H query heads; k | v | g fused, zero biases for k, v.
      auto* w = static_cast<MsaColumnGlobalAttentionW*>(p);
      const int64_t hc = c.no_heads_msa * c.c_hidden_msa_att, kvg = 2 * c.c_hidden_msa_att + hc;
      layer_norm(a, cm, &w->ln_m);
      linear(a, hc, cm, Bias::kNone, &w->q);
      w->kvg.w = make(a, {kvg, cm});    // [2*C + H*C, c_e]
      w->kvg.b = make(a, {kvg}, true);  // [2*C + H*C]
      linear(a, cm, hc, Bias::kFile, &w->o);
      return;
    }
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      auto* w = static_cast<TransitionW*>(p);
      const int64_t ch = channels(c, l.updates);
      layer_norm(a, ch, &w->ln);
      linear(a, n * ch, ch, Bias::kFile, &w->l1);
      linear(a, ch, n * ch, Bias::kFile, &w->l2);
      return;
    }
    case LayerKind::kOuterProductMean: {
      auto* w = static_cast<OuterProductMeanW*>(p);
      const int64_t co = c.c_hidden_opm;
      layer_norm(a, cm, &w->ln);
      linear(a, 2 * co, cm, Bias::kFile, &w->l12);
      linear(a, cz, co * co, Bias::kAlways, &w->out);
      return;
    }
    case LayerKind::kTriangleMultiplication: {
      auto* w = static_cast<TriangleMultiplicationW*>(p);
      const int64_t ct = c.c_hidden_mul;
      layer_norm(a, cz, &w->ln_in);
      linear(a, 4 * ct, cz, Bias::kAlways, &w->ab);
      layer_norm(a, ct, &w->ln_out);
      linear(a, cz, ct, Bias::kFile, &w->lin_z);
      linear(a, cz, cz, Bias::kFile, &w->lin_g);
      return;
    }
    case LayerKind::kTriangleAttention: {
      auto* w = static_cast<TriangleAttentionW*>(p);
      layer_norm(a, cz, &w->ln);
      linear(a, c.no_heads_pair, cz, Bias::kNone, &w->lin);
      gated_attention(a, c.no_heads_pair, c.c_hidden_pair_att, cz, &w->mha);
      return;
    }
    case LayerKind::kSwiGluTransition: {
      auto* w = static_cast<SwiGluTransitionW*>(p);
      const int64_t ch = channels(c, l.updates);
      layer_norm(a, ch, &w->ln);
      linear(a, 2 * n * ch, ch, Bias::kNone, &w->fc12);
      linear(a, ch, n * ch, Bias::kNone, &w->fc3);
      return;
    }
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no parameter description");
}
}  // namespace

void allocate_layer(const ParamAlloc& a, const EvoformerConfig& cfg, const LayerDesc& l,
                    void* block) {
  allocate_kind(a, cfg, l, const_cast<void*>(l.params(block)));
}

void allocate_table(const ParamAlloc& a, const EvoformerConfig& cfg, const BlockTable& t,
                    void* block) {
  for (const LayerDesc& l : t) allocate_layer(a, cfg, l, block);
}

int64_t layer_param_elems(const EvoformerConfig& cfg, const LayerDesc& l, bool bias_free) {
  int64_t n = 0;
  const ParamAlloc a{bias_free, false, &n};
  // A scratch struct of the kind's type; counting mode writes only undefined tensors into it.
  auto count = [&](auto scratch) { allocate_kind(a, cfg, l, &scratch); };
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      count(MsaRowAttentionW{});
      break;
    case LayerKind::kMsaColumnAttention:
      count(MsaColumnAttentionW{});
      break;
    case LayerKind::kMsaColumnGlobalAttention:
      count(MsaColumnGlobalAttentionW{});
      break;
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition:
      count(TransitionW{});
      break;
    case LayerKind::kOuterProductMean:
      count(OuterProductMeanW{});
      break;
    case LayerKind::kTriangleMultiplication:
      count(TriangleMultiplicationW{});
      break;
    case LayerKind::kTriangleAttention:
      count(TriangleAttentionW{});
      break;
    case LayerKind::kSwiGluTransition:
      count(SwiGluTransitionW{});
      break;
  }
  return n;
}

int64_t table_param_elems(const EvoformerConfig& cfg, const BlockTable& t) {
  int64_t n = 0;
  for (const LayerDesc& l : t) n += layer_param_elems(cfg, l, t.bias_free);
  return n;
}

}  // namespace fc
