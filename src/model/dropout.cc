#include "model/dropout.h"

#include <algorithm>
#include <cstring>

#include "core/rng.h"
#include "kernels/kernels.h"
#include "model/block_table.h"

namespace fc {

namespace {
// The layer of the context's table that `module` names. The units name their dropout by their
// Evoformer layer ("msa_att_row" for every row attention); a table without that name resolves it
// by the layer's kind (the Pairformer's "attention", the MSA module's "pair_weighted_averaging").
const LayerDesc* module_layer(const BlockContext& ctx, const char* module) {
  if (ctx.table == nullptr) return find_layer(kEvoformerBlock, module);
  if (const LayerDesc* l = find_layer(*ctx.table, module)) return l;
  const LayerDesc* evo = find_layer(kEvoformerBlock, module);
  if (evo == nullptr) return nullptr;
  for (const LayerDesc& l : *ctx.table)
    if (l.kind == evo->kind) return &l;
  return nullptr;
}

// The rate of the layer `module` of the context's block table, 0 for a layer without dropout.
float module_rate(const BlockContext& ctx, const char* module) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const LayerDesc* l = module_layer(ctx, module);
  if (l == nullptr) return 0.f;
  switch (l->rate) {
    case DropoutRate::kMsa:
      return cfg.msa_dropout;
    case DropoutRate::kPair:
      return cfg.pair_dropout;
    case DropoutRate::kNone:
      break;
  }
  return 0.f;
}
}  // namespace

Tensor dropout_mask(const BlockContext& ctx, const char* module, int64_t L, int64_t c,
                    int64_t item0) {
  if (!ctx.dropout) return Tensor();
  const float p = module_rate(ctx, module);
  if (p <= 0.f) return Tensor();
  uint64_t key = ctx.dropout_key;
  for (const char* ch = module; *ch; ++ch) key = splitmix64(key ^ static_cast<unsigned char>(*ch));
  Tensor mask = Tensor::empty({L, c});  // [L, c]
  float* mp = mask.f32();
  const float keep = 1.f / (1.f - p);
  const float threshold = 2.f * p - 1.f;  // uniform_pm1 < threshold with probability p
  if (dropout_per_item(ctx, module)) {
    for (int64_t i = 0; i < L; ++i)
      std::fill(mp + i * c, mp + (i + 1) * c, uniform_pm1(key, item0 + i) < threshold ? 0.f : keep);
    return mask;
  }
  for (int64_t i = 0; i < L * c; ++i) mp[i] = uniform_pm1(key, i) < threshold ? 0.f : keep;
  return mask;
}

uint64_t block_dropout_key(uint64_t seed, int b) {
  return splitmix64(seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(b + 1)));
}

bool dropout_per_item(const BlockContext& ctx, const char* module) {
  const LayerDesc* l = module_layer(ctx, module);
  return l != nullptr &&
         (l->share == DropoutShare::kPerRow || l->share == DropoutShare::kPerColumn);
}

void apply_item_dropout(float* u, int64_t n0, int64_t n, int64_t item_elems, const Tensor& mask) {
  if (!mask.defined()) return;
  for (int64_t b = 0; b < n; ++b) {
    const float d = mask.f32()[(n0 + b) * mask.dim(1)];
    float* ub = u + b * item_elems;
    for (int64_t i = 0; i < item_elems; ++i) ub[i] *= d;
  }
}

void apply_dropout(float* u, int64_t N, int64_t L, int64_t c, const Tensor& mask) {
  if (!mask.defined()) return;
  for (int64_t n = 0; n < N; ++n) kern::mul_inplace(u + n * L * c, c, mask.f32(), c, L, c);
}

}  // namespace fc
