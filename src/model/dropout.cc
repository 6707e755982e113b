#include "model/dropout.h"

#include <cstring>

#include "core/rng.h"
#include "kernels/kernels.h"
#include "model/block_table.h"

namespace fc {

namespace {
// The rate of the Evoformer layer `module` (block table), 0 for a layer without dropout.
float module_rate(const EvoformerConfig& cfg, const char* module) {
  const LayerDesc* l = find_layer(kEvoformerBlock, module);
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

Tensor dropout_mask(const BlockContext& ctx, const char* module, int64_t L, int64_t c) {
  if (!ctx.dropout) return Tensor();
  const float p = module_rate(*ctx.cfg, module);
  if (p <= 0.f) return Tensor();
  uint64_t key = ctx.dropout_key;
  for (const char* ch = module; *ch; ++ch) key = splitmix64(key ^ static_cast<unsigned char>(*ch));
  Tensor mask = Tensor::empty({L, c});  // [L, c]
  float* mp = mask.f32();
  const float keep = 1.f / (1.f - p);
  const float threshold = 2.f * p - 1.f;  // uniform_pm1 < threshold with probability p
  for (int64_t i = 0; i < L * c; ++i) mp[i] = uniform_pm1(key, i) < threshold ? 0.f : keep;
  return mask;
}

void apply_dropout(float* u, int64_t N, int64_t L, int64_t c, const Tensor& mask) {
  if (!mask.defined()) return;
  for (int64_t n = 0; n < N; ++n) kern::mul_inplace(u + n * L * c, c, mask.f32(), c, L, c);
}

}  // namespace fc
