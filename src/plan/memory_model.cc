#include "foldcube/plan.h"

namespace fc {

namespace {
// Elements of each module's saved state (see the *State structs in src/model/train.h).
struct StateElems {
  int64_t row, col, msa_trans, opm, tri_mul, tri_att, pair_trans;
};

StateElems state_elems(const EvoformerConfig& c, int64_t s, int64_t r) {
  const int64_t sr = s * r, rr = r * r;
  const int64_t hm = c.no_heads_msa * c.c_hidden_msa_att, hp = c.no_heads_pair * c.c_hidden_pair_att;
  StateElems e;
  // x_in, x_ln, mean, rstd, q|k|v|g, gated output
  const int64_t att_m = 2 * sr * c.c_m + 2 * sr + sr * 5 * hm;
  const int64_t att_z = 2 * rr * c.c_z + 2 * rr + rr * 5 * hp;
  // bias branch: b_in, b_ln, b_mean, b_rstd, bias [H, r, r]
  const int64_t bias_m = 2 * rr * c.c_z + 2 * rr + c.no_heads_msa * rr;
  const int64_t bias_z = 2 * rr * c.c_z + 2 * rr + c.no_heads_pair * rr;
  e.row = att_m + bias_m;
  e.col = att_m;
  e.tri_att = att_z + bias_z;
  // x_in, x_ln, mean, rstd, h
  e.msa_trans = 2 * sr * c.c_m + 2 * sr + sr * c.transition_n * c.c_m;
  e.pair_trans = 2 * rr * c.c_z + 2 * rr + rr * c.transition_n * c.c_z;
  // m_in, x_ln, mean, rstd, a, b, norm
  e.opm = 2 * sr * c.c_m + 2 * sr + 2 * sr * c.c_hidden_opm + rr;
  // z_in, x_ln, mean, rstd, t, A, B, p, mean2, rstd2, p_ln, y, g
  const int64_t ct = c.c_hidden_mul;
  e.tri_mul = 2 * rr * c.c_z + 2 * rr + rr * 4 * ct + 2 * ct * rr + rr * ct + 2 * rr + rr * ct +
              2 * rr * c.c_z;
  return e;
}
}  // namespace

int64_t block_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, Recompute policy,
                               int64_t elem_bytes) {
  const int64_t m = s * r * cfg.c_m, z = r * r * cfg.c_z;
  switch (policy) {
    case Recompute::kBlock:
      return (m + z) * elem_bytes;
    case Recompute::kModule:
      return (3 * m + 6 * z) * elem_bytes;
    case Recompute::kNone: {
      const StateElems e = state_elems(cfg, s, r);
      return (e.row + e.col + e.msa_trans + e.opm + 2 * e.tri_mul + 2 * e.tri_att + e.pair_trans) *
             elem_bytes;
    }
  }
  return 0;
}

int64_t stack_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                               const std::vector<Recompute>& policy, int64_t elem_bytes) {
  int64_t total = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const Recompute p = policy.empty() ? Recompute::kNone
                        : policy.size() == 1 ? policy[0]
                                             : policy[b];
    total += block_activation_bytes(cfg, s, r, p, elem_bytes);
  }
  return total;
}

}  // namespace fc
