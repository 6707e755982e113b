// Zero-filled gradient storage shaped like a block's weights (train.h: allocate_block_grads).
#include "model/param_alloc.h"
#include "model/train.h"

namespace fc {

void allocate_block_grads(const EvoformerConfig& cfg, BlockWeights* g) {
  allocate_table(ParamAlloc{false, true}, cfg, kEvoformerBlock, g);
}

void allocate_block_grads(const EvoformerConfig& cfg, ExtraMsaBlockWeights* g) {
  allocate_table(ParamAlloc{false, true}, cfg, kExtraMsaBlock, g);
}

}  // namespace fc
