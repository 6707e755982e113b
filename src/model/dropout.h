// AF2 training-mode dropout of module updates. OpenFold's DropoutRowwise / DropoutColumnwise share
// one mask along the rows or the columns of the updated stream; in the batch-major layout the
// training functions use ([N, L, c], see train_attention.cc) every dropped update has a mask
// [L, c] shared over N:
//   msa_att_row   m update [s, r, c_m], mask over (r, c), shared over s    rate msa_dropout
//   tri_mul_out   z update [i, j, c_z], mask over (j, c), shared over i    rate pair_dropout
//   tri_mul_in    likewise
//   tri_att_start likewise
//   tri_att_end   z update [i, j, c_z], mask over (i, c), shared over j    rate pair_dropout
//                 (its batch-major layout is [j, i, c_z])
// Mask entries are 0 or 1/(1-p), from a counter-based RNG keyed by (ctx.dropout_key, module,
// element), so a recompute reproduces the forward's mask exactly.
#pragma once

#include <cstdint>

#include "foldcube/tensor.h"
#include "model/modules.h"

namespace fc {

// The mask [L, c] for `module` (golden trace name), or an undefined tensor when dropout is off or
// the module has no dropout.
Tensor dropout_mask(const BlockContext& ctx, const char* module, int64_t L, int64_t c);

// u[n, l, :] *= mask[l, :] for n < N (forward on the update, backward on its gradient).
void apply_dropout(float* u, int64_t N, int64_t L, int64_t c, const Tensor& mask);

}  // namespace fc
