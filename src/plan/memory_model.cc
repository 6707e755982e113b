// The training-step memory model. Every count below is in elements (floats of the fp32 engine) and
// follows the allocation sequence of src/model/train_*.cc tensor by tensor; bytes = elements *
// elem_bytes. Kernel scratch comes from the kernels' own *_scratch_floats functions and chunk sizes
// from pick_chunk, so the model stays exact when those change.
#include <algorithm>
#include <array>

#include "foldcube/plan.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "model/modules.h"

namespace fc {

namespace {

// One module's training forward and backward (src/model/train.h), in elements.
struct ModuleMem {
  int64_t state = 0;  // its *State struct: kept by the forward for the backward
  int64_t fwd = 0;    // peak of the forward above its entry (state so far + transients)
  int64_t bwd = 0;    // peak of the backward's own buffers above its entry (state stays alive)
};

// The modules in block order.
enum Module { kRow, kCol, kMsaTrans, kOpm, kTriOut, kTriIn, kTriStart, kTriEnd, kPairTrans, kMods };
using BlockModules = std::array<ModuleMem, kMods>;

int64_t ln_scratch(int64_t rows, int64_t n) {
  return kern::layernorm_backward_scratch_floats(rows, n);
}

// Gated attention over N batch items of L positions with c channels, H heads of C; `bias`: with
// the pair-bias branch (LayerNorm + linear of z [r*r, c_z] into [H, r, r]).
ModuleMem attention_mem(int64_t N, int64_t L, int64_t c, int64_t H, int64_t C, bool bias, int64_t r,
                        int64_t cz, int threads) {
  const int64_t rows = N * L, hc = H * C, rr = r * r;
  kern::AttentionArgs a;
  a.B = N, a.Lq = L, a.Lk = L, a.H = H, a.C = C;
  // bias_train: b_in, b_mean, b_rstd, b_ln; t [rr, H] lives while bias [H, r, r] is filled.
  const int64_t bias_ln = bias ? 2 * rr * cz + 2 * rr : 0;
  const int64_t bias_state = bias ? bias_ln + H * rr : 0;
  // attention_train: x_in, mean, rstd, x_ln, qkvg, og; then the kernel scratch; then u [rows, c].
  const int64_t att_state = 2 * rows * c + 2 * rows + 5 * rows * hc;
  ModuleMem mm;
  mm.state = bias_state + att_state;
  mm.fwd = std::max(bias_ln + (bias ? 2 * H * rr : 0),
                    mm.state + std::max(kern::attention_scratch_floats(a, threads), rows * c));
  // attention_backward under dbias [H, r, r]: du, dog, dqkvg + kernel scratch; then du, dqkvg,
  // dln; then du, dln + LN scratch. bias_backward: dt [rr, H], dln [rr, cz] + LN scratch.
  const int64_t dbias = bias ? H * rr : 0;
  mm.bwd =
      dbias +
      std::max({rows * (c + 5 * hc) + kern::attention_backward_scratch_floats(a, threads, bias),
                rows * (2 * c + 4 * hc), 2 * rows * c + ln_scratch(rows, c)});
  if (bias) mm.bwd = std::max(mm.bwd, dbias + rr * (H + cz) + ln_scratch(rr, cz));
  return mm;
}

// Transition on [rows, c] with hidden n*c.
ModuleMem transition_mem(int64_t rows, int64_t c, int64_t n) {
  ModuleMem mm;
  mm.state = rows * (2 * c + 2 + n * c);  // x_in, mean, rstd, x_ln, h; no transients
  mm.fwd = mm.state;
  // dxln, dh; then dxln + LN scratch.
  mm.bwd = std::max(rows * (c + n * c), rows * c + ln_scratch(rows, c));
  return mm;
}

ModuleMem outer_product_mean_mem(const EvoformerConfig& cfg, const BlockContext& ctx) {
  const int64_t s = ctx.s, r = ctx.r, sr = s * r, rr = r * r;
  const int64_t cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z, kF = sizeof(float);
  ModuleMem mm;
  // m_in, mean, rstd, x_ln, a, b; ab [sr, 2 co] transient; norm [r, r]; then chunks of o, p, y.
  const int64_t base = sr * (2 * cm + 2 + 2 * co);
  mm.state = base + rr;
  const int64_t ch = pick_chunk(ctx, r, 2 * co * r * co * kF + r * cz * kF);
  mm.fwd = std::max(base + 2 * sr * co, mm.state + ch * r * (2 * co * co + cz));
  // dxln, dab, da, db + chunks of o, p, dp, dy; then dxln + LN scratch.
  const int64_t ch2 = pick_chunk(ctx, r, 3 * co * r * co * kF + r * cz * kF);
  mm.bwd =
      std::max(sr * (cm + 4 * co) + ch2 * r * (3 * co * co + cz), sr * cm + ln_scratch(sr, cm));
  return mm;
}

ModuleMem triangle_multiplication_mem(const EvoformerConfig& cfg, int64_t r) {
  const int64_t rr = r * r, cz = cfg.c_z, ct = cfg.c_hidden_mul;
  ModuleMem mm;
  // z_in, mean, rstd, x_ln, t, A, B (+ a clone of t); p (+ P); mean2, rstd2, p_ln, y, g (+ u).
  const int64_t s1 = rr * (2 * cz + 2 + 6 * ct), s2 = s1 + rr * ct;
  mm.state = s2 + rr * (2 + ct + 2 * cz);
  mm.fwd = std::max({s1 + 4 * rr * ct, s2 + rr * ct, mm.state + rr * cz});
  // dxln, dP, dy, dg; dxln, dP, dy, dp; dxln, dP, dp + LN scratch; dxln, dP, dt, dA, dB;
  // dxln + LN scratch.
  mm.bwd =
      std::max({rr * (3 * cz + ct), rr * (2 * cz + 2 * ct), rr * (cz + 2 * ct) + ln_scratch(rr, ct),
                rr * (cz + 7 * ct), rr * cz + ln_scratch(rr, cz)});
  return mm;
}

// The context the training step builds (automatic chunking), as far as the model reads it.
BlockContext model_context(const EvoformerConfig& cfg, int64_t s, int64_t r, int threads) {
  BlockContext ctx;
  ctx.cfg = &cfg;
  ctx.s = s;
  ctx.r = r;
  ctx.chunk_target_bytes = default_chunk_target_bytes(cfg, s, r);
  ctx.threads = std::max(threads, 1);
  return ctx;
}

BlockModules block_modules(const EvoformerConfig& c, int64_t s, int64_t r, int threads) {
  const BlockContext ctx = model_context(c, s, r, threads);
  const int64_t Hm = c.no_heads_msa, Cm = c.c_hidden_msa_att;
  const int64_t Hp = c.no_heads_pair, Cp = c.c_hidden_pair_att;
  BlockModules b;
  b[kRow] = attention_mem(s, r, c.c_m, Hm, Cm, true, r, c.c_z, threads);
  b[kCol] = attention_mem(r, s, c.c_m, Hm, Cm, false, r, c.c_z, threads);
  b[kMsaTrans] = transition_mem(s * r, c.c_m, c.transition_n);
  b[kOpm] = outer_product_mean_mem(c, ctx);
  b[kTriOut] = b[kTriIn] = triangle_multiplication_mem(c, r);
  b[kTriStart] = b[kTriEnd] = attention_mem(r, r, c.c_z, Hp, Cp, true, r, c.c_z, threads);
  b[kPairTrans] = transition_mem(r * r, c.c_z, c.transition_n);
  return b;
}

// Elements of one block's parameter-gradient struct (allocate_block in src/model/weights.cc: the
// fused storage, including the q, k, v parts of b_qkvg).
int64_t block_param_elems(const EvoformerConfig& c) {
  auto ln = [](int64_t n) { return 2 * n; };
  auto lin = [](int64_t out, int64_t in, bool bias) { return out * in + (bias ? out : 0); };
  auto mha = [&](int64_t H, int64_t C, int64_t cin) {
    return lin(4 * H * C, cin, true) + lin(cin, H * C, true);
  };
  auto transition = [&](int64_t ch) {
    return ln(ch) + lin(c.transition_n * ch, ch, true) + lin(ch, c.transition_n * ch, true);
  };
  const int64_t cm = c.c_m, cz = c.c_z, co = c.c_hidden_opm, ct = c.c_hidden_mul;
  const int64_t row = ln(cm) + ln(cz) + lin(c.no_heads_msa, cz, false) +
                      mha(c.no_heads_msa, c.c_hidden_msa_att, cm);
  const int64_t col = ln(cm) + mha(c.no_heads_msa, c.c_hidden_msa_att, cm);
  const int64_t opm = ln(cm) + lin(2 * co, cm, true) + lin(cz, co * co, true);
  const int64_t tri_mul =
      ln(cz) + lin(4 * ct, cz, true) + ln(ct) + lin(cz, ct, true) + lin(cz, cz, true);
  const int64_t tri_att =
      ln(cz) + lin(c.no_heads_pair, cz, false) + mha(c.no_heads_pair, c.c_hidden_pair_att, cz);
  return row + col + transition(cm) + opm + 2 * tri_mul + 2 * tri_att + transition(cz);
}

// One block under a policy (train_block.cc), in elements.
struct BlockMem {
  int64_t kept = 0;  // activation: kept from the forward for the backward
  int64_t fwd = 0;   // forward peak above its entry
  int64_t bwd = 0;   // backward peak above the live bytes before the block's state (kept included)
};

BlockMem block_mem(const BlockModules& mods, int64_t m, int64_t z, Recompute policy) {
  BlockMem b;
  switch (policy) {
    case Recompute::kNone: {
      // Forward: the states pile up. Backward in reverse: module k's buffers on top of the states
      // not yet freed.
      for (const ModuleMem& mm : mods) {
        b.fwd = std::max(b.fwd, b.kept + mm.fwd);
        b.kept += mm.state;
      }
      int64_t live = b.kept;
      for (int k = kMods - 1; k >= 0; --k) {
        b.bwd = std::max(b.bwd, live + mods[k].bwd);
        live -= mods[k].state;
      }
      return b;
    }
    case Recompute::kModule: {
      // Input copies taken before each module (m before row/col attention and the MSA transition;
      // z before row attention and each pair module). Each module's state is dropped at once.
      const std::array<int64_t, kMods> in = {m + z, m, m, 0, z, z, z, z, z};
      for (int k = 0; k < kMods; ++k) {
        b.fwd = std::max(b.fwd, b.kept + in[k] + mods[k].fwd);
        b.kept += in[k];
      }
      // Backward in reverse: take() clones the saved input (both copies live for a moment), frees
      // the original, rebuilds the state on the clone, runs the backward, then frees clone and
      // state. The OPM works on a clone of z_in[0] (still needed by the row attention); the row
      // attention's m_in[0] stays alive, held by the driver as the previous block's m_out.
      int64_t live = b.kept;
      auto module = [&](const ModuleMem& mm, int64_t extra) {
        b.bwd = std::max({b.bwd, live + extra + mm.fwd, live + extra + mm.state + mm.bwd});
      };
      for (int k = kPairTrans; k >= kTriOut; --k) {
        b.bwd = std::max(b.bwd, live + z);
        module(mods[k], 0);
        live -= z;
      }
      module(mods[kOpm], z);
      for (int k : {kMsaTrans, kCol}) {
        b.bwd = std::max(b.bwd, live + m);
        module(mods[k], 0);
        live -= m;
      }
      b.bwd = std::max(b.bwd, live + m + z);
      module(mods[kRow], m);
      return b;
    }
    case Recompute::kBlock: {
      // Keeps (m, z); backward clones m, reruns the block with kNone on top, then its backward.
      const BlockMem none = block_mem(mods, m, z, Recompute::kNone);
      int64_t max_fwd = 0;
      for (const ModuleMem& mm : mods) max_fwd = std::max(max_fwd, mm.fwd);
      b.kept = m + z;
      b.fwd = b.kept + max_fwd;
      b.bwd = b.kept + m + std::max(none.fwd, none.bwd);
      return b;
    }
  }
  return b;
}

Recompute policy_of(const std::vector<Recompute>& policy, int64_t b) {
  if (policy.empty()) return Recompute::kNone;
  return policy.size() == 1 ? policy[0] : policy[b];
}

}  // namespace

int64_t block_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, Recompute policy,
                               int64_t elem_bytes) {
  const int64_t m = s * r * cfg.c_m, z = r * r * cfg.c_z;
  return block_mem(block_modules(cfg, s, r, 1), m, z, policy).kept * elem_bytes;
}

int64_t stack_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                               const std::vector<Recompute>& policy, int64_t elem_bytes) {
  int64_t total = 0;
  for (int64_t b = 0; b < blocks; ++b)
    total += block_activation_bytes(cfg, s, r, policy_of(policy, b), elem_bytes);
  return total;
}

int64_t stack_step_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                              const std::vector<Recompute>& policy, int threads,
                              int64_t elem_bytes) {
  const int64_t m = s * r * cfg.c_m, z = r * r * cfg.c_z, grads = block_param_elems(cfg);
  const BlockModules mods = block_modules(cfg, s, r, threads);
  std::vector<BlockMem> bm;
  for (int64_t b = 0; b < blocks; ++b) bm.push_back(block_mem(mods, m, z, policy_of(policy, b)));
  // Forward: block b runs on top of the activations of the blocks before it.
  int64_t peak = 0, kept = 0;
  for (const BlockMem& b : bm) {
    peak = std::max(peak, kept + b.fwd);
    kept += b.kept;
  }
  // Backward: dm and dz copies; block b's backward runs on top of the activations of blocks < b,
  // the gradient structs of blocks >= b and (below the last block) the input m of block b + 1,
  // which the driver holds as m_out for block b's outer product mean.
  peak = std::max(peak, kept + m + z);
  for (int64_t b = blocks - 1; b >= 0; --b) {
    kept -= bm[b].kept;
    const int64_t below = kept + m + z + (blocks - b) * grads + (b + 1 < blocks ? m : 0);
    peak = std::max(peak, below + bm[b].bwd);
  }
  return peak * elem_bytes;
}

}  // namespace fc
