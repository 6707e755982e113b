// Block- and stack-level training: the recompute policies and EvoformerStack::train_step.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>

#include "core/rng.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "model/common.h"
#include "model/train.h"

namespace fc {

const char* recompute_name(Recompute p) {
  switch (p) {
    case Recompute::kNone:
      return "none";
    case Recompute::kModule:
      return "module";
    case Recompute::kBlock:
      return "block";
  }
  return "?";
}

Recompute policy_of(const TrainOptions& opts, int block) {
  if (opts.policy.empty()) return Recompute::kNone;
  return opts.policy.size() == 1 ? opts.policy[0] : opts.policy[block];
}

Status parse_recompute(const std::string& name, Recompute* out) {
  if (name == "none")
    *out = Recompute::kNone;
  else if (name == "module" || name == "small")
    *out = Recompute::kModule;
  else if (name == "block" || name == "large")
    *out = Recompute::kBlock;
  else
    return Status::InvalidArgument("unknown recompute policy '" + name + "' (none|module|block)");
  return Status::OK();
}

namespace {

Tensor copy_of(const float* p, const Shape& shape) {
  Tensor t = Tensor::empty(shape);
  std::memcpy(t.f32(), p, t.nbytes());
  return t;
}

// Everything a block keeps from its forward for its backward.
struct BlockState {
  Recompute policy = Recompute::kNone;
  // kNone and kModule: module inputs. m_in: before row attention, column attention, MSA
  // transition; z_in: before row attention (= during the MSA modules and the OPM), tri_mul_out,
  // tri_mul_in, tri_att_start, tri_att_end, pair_transition. The OPM reads the block's output m,
  // kept by the caller.
  Tensor m_in[3], z_in[6];  // [s, r, c_m], [r, r, c_z]
  // kNone: the modules' saved states besides their inputs (per chunk where the module chunks).
  AttentionState row, col, tri_start, tri_end;
  TransitionState msa_trans, pair_trans;
  OuterProductMeanState opm;
  TriangleMultiplicationState tri_out, tri_in;
  // kBlock: the block input.
  Tensor m0, z0;
};

// Module timer of a profiled step (TrainOptions::profile); a null clock runs f untimed.
// phase: 0 forward, 1 backward, 2 the block re-run of policy block.
struct ModuleClock {
  std::vector<ModuleTime>* out = nullptr;
  int phase = 0;
  template <typename F>
  void run(const char* module, F&& f) const {
    if (out == nullptr) return f();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    auto it = std::find_if(out->begin(), out->end(),
                           [&](const ModuleTime& t) { return t.module == module; });
    if (it == out->end()) it = out->insert(out->end(), ModuleTime{module});
    (phase == 0 ? it->forward_ms : phase == 1 ? it->backward_ms : it->recompute_ms) += ms;
  }
};

// The block forward with every module's training function, saving inputs and states as the
// policy says.
void block_forward(const BlockWeights& w, const BlockContext& ctx, float* m, float* z,
                   Recompute policy, BlockState* st, const ModuleClock& clk) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r;
  const Shape ms = {s, r, cfg.c_m}, zs = {r, r, cfg.c_z};
  st->policy = policy;
  if (policy == Recompute::kBlock) {
    st->m0 = copy_of(m, ms);
    st->z0 = copy_of(z, zs);
  }
  const bool keep = policy == Recompute::kNone;
  const bool inputs = policy != Recompute::kBlock;
  if (inputs) st->m_in[0] = copy_of(m, ms), st->z_in[0] = copy_of(z, zs);
  clk.run("msa_att_row",
          [&] { msa_row_attention_train(w.msa_att_row, ctx, m, z, keep ? &st->row : nullptr); });
  if (inputs) st->m_in[1] = copy_of(m, ms);
  clk.run("msa_att_col",
          [&] { msa_column_attention_train(w.msa_att_col, ctx, m, keep ? &st->col : nullptr); });
  if (inputs) st->m_in[2] = copy_of(m, ms);
  clk.run("msa_transition", [&] {
    transition_train(w.msa_transition, ctx, m, s * r, cfg.c_m, keep ? &st->msa_trans : nullptr);
  });
  clk.run("outer_product_mean", [&] {
    OuterProductMeanState o;
    outer_product_mean_train(w.outer_product_mean, ctx, m, z, &o);
    if (keep) st->opm = std::move(o);
  });
  if (inputs) st->z_in[1] = copy_of(z, zs);
  clk.run("tri_mul_out", [&] {
    triangle_multiplication_train(w.tri_mul_out, ctx, true, z, keep ? &st->tri_out : nullptr);
  });
  if (inputs) st->z_in[2] = copy_of(z, zs);
  clk.run("tri_mul_in", [&] {
    triangle_multiplication_train(w.tri_mul_in, ctx, false, z, keep ? &st->tri_in : nullptr);
  });
  if (inputs) st->z_in[3] = copy_of(z, zs);
  clk.run("tri_att_start", [&] {
    triangle_attention_train(w.tri_att_start, ctx, false, z, keep ? &st->tri_start : nullptr);
  });
  if (inputs) st->z_in[4] = copy_of(z, zs);
  clk.run("tri_att_end", [&] {
    triangle_attention_train(w.tri_att_end, ctx, true, z, keep ? &st->tri_end : nullptr);
  });
  if (inputs) st->z_in[5] = copy_of(z, zs);
  clk.run("pair_transition", [&] {
    transition_train(w.pair_transition, ctx, z, r * r, cfg.c_z, keep ? &st->pair_trans : nullptr);
  });
}

// Backward of one block. dm, dz: dL/d block output on entry, dL/d block input on exit.
// m_out: the block's output m (read by the OPM backward). Under kNone the modules' saved states
// are consumed chunk by chunk; under kModule they are empty, so every module recomputes its
// state one chunk at a time from its saved input; under kBlock the block forward is re-run with
// kNone first. Each module input is freed after its module's backward.
void block_backward(const BlockWeights& w, BlockWeights* g, const BlockContext& ctx, BlockState* st,
                    const Tensor& m_out, float* dm, float* dz, const ModuleClock& clk) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r;
  if (st->policy == Recompute::kBlock) {
    // Recompute on the saved input: z0 in place; m0 on a copy, since the caller still holds m0
    // as the previous block's output.
    Tensor m = st->m0.clone(), z = st->z0;
    st->m0 = Tensor();
    st->z0 = Tensor();
    BlockState full;
    block_forward(w, ctx, m.f32(), z.f32(), Recompute::kNone, &full, ModuleClock{clk.out, 2});
    block_backward(w, g, ctx, &full, m, dm, dz, clk);
    return;
  }
  clk.run("pair_transition", [&] {
    transition_backward(w.pair_transition, &g->pair_transition, ctx, st->z_in[5].f32(),
                        &st->pair_trans, dz, r * r, cfg.c_z);
  });
  st->z_in[5] = Tensor();
  clk.run("tri_att_end", [&] {
    triangle_attention_backward(w.tri_att_end, &g->tri_att_end, ctx, true, st->z_in[4].f32(),
                                &st->tri_end, dz);
  });
  st->z_in[4] = Tensor();
  clk.run("tri_att_start", [&] {
    triangle_attention_backward(w.tri_att_start, &g->tri_att_start, ctx, false, st->z_in[3].f32(),
                                &st->tri_start, dz);
  });
  st->z_in[3] = Tensor();
  clk.run("tri_mul_in", [&] {
    triangle_multiplication_backward(w.tri_mul_in, &g->tri_mul_in, ctx, false, st->z_in[2].f32(),
                                     &st->tri_in, dz);
  });
  st->z_in[2] = Tensor();
  clk.run("tri_mul_out", [&] {
    triangle_multiplication_backward(w.tri_mul_out, &g->tri_mul_out, ctx, true, st->z_in[1].f32(),
                                     &st->tri_out, dz);
  });
  st->z_in[1] = Tensor();
  clk.run("outer_product_mean", [&] {
    if (st->policy == Recompute::kModule) {
      OuterProductMeanState o;
      outer_product_mean_train(w.outer_product_mean, ctx, m_out.f32(), nullptr, &o);
      outer_product_mean_backward(w.outer_product_mean, &g->outer_product_mean, ctx, m_out.f32(), o,
                                  dz, dm);
    } else {
      outer_product_mean_backward(w.outer_product_mean, &g->outer_product_mean, ctx, m_out.f32(),
                                  st->opm, dz, dm);
      st->opm = {};
    }
  });
  clk.run("msa_transition", [&] {
    transition_backward(w.msa_transition, &g->msa_transition, ctx, st->m_in[2].f32(),
                        &st->msa_trans, dm, s * r, cfg.c_m);
  });
  st->m_in[2] = Tensor();
  clk.run("msa_att_col", [&] {
    msa_column_attention_backward(w.msa_att_col, &g->msa_att_col, ctx, st->m_in[1].f32(), &st->col,
                                  dm);
  });
  st->m_in[1] = Tensor();
  clk.run("msa_att_row", [&] {
    msa_row_attention_backward(w.msa_att_row, &g->msa_att_row, ctx, st->m_in[0].f32(),
                               st->z_in[0].f32(), &st->row, dm, dz);
  });
  st->m_in[0] = Tensor();
  st->z_in[0] = Tensor();
}

// The block's input m as kept by its state (what the previous block's OPM read).
Tensor block_input_m(const BlockState& st) {
  return st.policy == Recompute::kBlock ? st.m0 : st.m_in[0];
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Status EvoformerStack::train_step(Tensor& m, Tensor& z, const Tensor& msa_mask,
                                  const Tensor& pair_mask, const Tensor& grad_out_m,
                                  const Tensor& grad_out_z, const TrainOptions& opts,
                                  TrainResult* out) const {
  const EvoformerConfig& cfg = cfg_;
  const int nb = static_cast<int>(blocks_.size());
  if (!opts.policy.empty() && opts.policy.size() != 1 && static_cast<int>(opts.policy.size()) != nb)
    return Status::InvalidArgument("recompute policy list has " +
                                   std::to_string(opts.policy.size()) + " entries for " +
                                   std::to_string(nb) + " blocks");
  StackInputs in;
  FC_RETURN_IF_ERROR(prepare_inputs(cfg, m, z, msa_mask, pair_mask, &in));
  FC_RETURN_IF_ERROR(check_input("grad.output.m", grad_out_m, m.shape()));
  FC_RETURN_IF_ERROR(check_input("grad.output.z", grad_out_z, z.shape()));
  if (opts.chunk < 0 || opts.chunk_target_bytes < 0)
    return Status::InvalidArgument(
        "chunk (" + std::to_string(opts.chunk) + ") and chunk_target_bytes (" +
        std::to_string(opts.chunk_target_bytes) + ") must be >= 0 (0 = automatic)");
  BlockContext ctx =
      make_context(cfg, in, opts.chunk,
                   opts.chunk_target_bytes > 0 ? opts.chunk_target_bytes
                                               : default_train_chunk_target_bytes(cfg, in.s, in.r));
  ctx.dropout = opts.dropout;
  // Per-block dropout keys: block b's masks depend on (seed, b) only.
  auto block_ctx = [&](int b) {
    BlockContext c = ctx;
    c.dropout_key = splitmix64(opts.seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(b + 1)));
    return c;
  };
  auto policy = [&](int b) { return policy_of(opts, b); };
  out->module_ms.clear();
  const ModuleClock fwd_clock{opts.profile ? &out->module_ms : nullptr, 0};
  const ModuleClock bwd_clock{fwd_clock.out, 1};

  MemoryScope scope;
  const int64_t live0 = scope.start_live();
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<BlockState>> states;
  for (int b = 0; b < nb; ++b) {
    states.push_back(std::make_unique<BlockState>());
    block_forward(*blocks_[b], block_ctx(b), m.f32(), z.f32(), policy(b), states.back().get(),
                  fwd_clock);
  }
  out->forward_ms = ms_since(t0);
  out->activation_bytes = mem_stats().live_bytes - live0;

  t0 = std::chrono::steady_clock::now();
  Tensor dm = grad_out_m.clone(), dz = grad_out_z.clone();
  std::vector<std::unique_ptr<BlockWeights>> grads(nb);
  Tensor m_out = m;  // output of the block being differentiated
  for (int b = nb - 1; b >= 0; --b) {
    grads[b] = std::make_unique<BlockWeights>();
    allocate_block_grads(cfg, grads[b].get());
    const Tensor m_in = block_input_m(*states[b]);
    block_backward(*blocks_[b], grads[b].get(), block_ctx(b), states[b].get(), m_out, dm.f32(),
                   dz.f32(), bwd_clock);
    states[b].reset();
    m_out = m_in;
  }
  out->backward_ms = ms_since(t0);
  out->peak_bytes = scope.peak() - live0;
  out->grad_m = dm;
  out->grad_z = dz;
  out->grad_params.clear();
  for (int b = 0; b < nb; ++b)
    for (auto& [name, t] : named_params(*grads[b], block_prefix(b)))
      out->grad_params.emplace_back(name, t);
  return Status::OK();
}

}  // namespace fc
