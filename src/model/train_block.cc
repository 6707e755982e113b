// Block- and stack-level training: the recompute policies and EvoformerStack::train_step.
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
  // kNone: the modules' saved states.
  AttentionState row, col, tri_start, tri_end;
  TransitionState msa_trans, pair_trans;
  OuterProductMeanState opm;
  TriangleMultiplicationState tri_out, tri_in;
  // kModule: module inputs. m_in: before row attention, column attention, MSA transition;
  // z_in: before OPM (= during the MSA modules), tri_mul_out, tri_mul_in, tri_att_start,
  // tri_att_end, pair_transition. The OPM reads the block's output m, kept by the caller.
  Tensor m_in[3], z_in[6];  // [s, r, c_m], [r, r, c_z]
  // kBlock: the block input.
  Tensor m0, z0;
};

// The block forward with every module's training function, saving states as the policy says.
void block_forward(const BlockWeights& w, const BlockContext& ctx, float* m, float* z,
                   Recompute policy, BlockState* st) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r;
  const Shape ms = {s, r, cfg.c_m}, zs = {r, r, cfg.c_z};
  st->policy = policy;
  if (policy == Recompute::kBlock) {
    st->m0 = copy_of(m, ms);
    st->z0 = copy_of(z, zs);
  }
  const bool keep = policy == Recompute::kNone;
  const bool inputs = policy == Recompute::kModule;
  // Each module runs into a state that is moved into st (kNone) or dropped right away.
  {
    if (inputs) st->m_in[0] = copy_of(m, ms), st->z_in[0] = copy_of(z, zs);
    AttentionState a;
    msa_row_attention_train(w.msa_att_row, ctx, m, z, &a);
    if (keep) st->row = std::move(a);
  }
  {
    if (inputs) st->m_in[1] = copy_of(m, ms);
    AttentionState a;
    msa_column_attention_train(w.msa_att_col, ctx, m, &a);
    if (keep) st->col = std::move(a);
  }
  {
    if (inputs) st->m_in[2] = copy_of(m, ms);
    TransitionState t;
    transition_train(w.msa_transition, ctx, m, s * r, cfg.c_m, &t);
    if (keep) st->msa_trans = std::move(t);
  }
  {
    OuterProductMeanState o;
    outer_product_mean_train(w.outer_product_mean, ctx, m, z, &o);
    if (keep) st->opm = std::move(o);
  }
  {
    if (inputs) st->z_in[1] = copy_of(z, zs);
    TriangleMultiplicationState t;
    triangle_multiplication_train(w.tri_mul_out, ctx, true, z, &t);
    if (keep) st->tri_out = std::move(t);
  }
  {
    if (inputs) st->z_in[2] = copy_of(z, zs);
    TriangleMultiplicationState t;
    triangle_multiplication_train(w.tri_mul_in, ctx, false, z, &t);
    if (keep) st->tri_in = std::move(t);
  }
  {
    if (inputs) st->z_in[3] = copy_of(z, zs);
    AttentionState a;
    triangle_attention_train(w.tri_att_start, ctx, false, z, &a);
    if (keep) st->tri_start = std::move(a);
  }
  {
    if (inputs) st->z_in[4] = copy_of(z, zs);
    AttentionState a;
    triangle_attention_train(w.tri_att_end, ctx, true, z, &a);
    if (keep) st->tri_end = std::move(a);
  }
  {
    if (inputs) st->z_in[5] = copy_of(z, zs);
    TransitionState t;
    transition_train(w.pair_transition, ctx, z, r * r, cfg.c_z, &t);
    if (keep) st->pair_trans = std::move(t);
  }
}

// Backward of one block. dm, dz: dL/d block output on entry, dL/d block input on exit.
// m_out: the block's output m (read by the OPM recompute under kModule).
void block_backward(const BlockWeights& w, BlockWeights* g, const BlockContext& ctx, BlockState* st,
                    const Tensor& m_out, float* dm, float* dz) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r;
  if (st->policy == Recompute::kBlock) {
    // Recompute on the saved input: z0 in place; m0 on a copy, since the caller still holds m0
    // as the previous block's output.
    Tensor m = st->m0.clone(), z = st->z0;
    st->m0 = Tensor();
    st->z0 = Tensor();
    BlockState full;
    block_forward(w, ctx, m.f32(), z.f32(), Recompute::kNone, &full);
    block_backward(w, g, ctx, &full, m, dm, dz);
    return;
  }
  if (st->policy == Recompute::kNone) {
    transition_backward(w.pair_transition, &g->pair_transition, ctx, st->pair_trans, dz, r * r,
                        cfg.c_z);
    st->pair_trans = {};
    triangle_attention_backward(w.tri_att_end, &g->tri_att_end, ctx, true, st->tri_end, dz);
    st->tri_end = {};
    triangle_attention_backward(w.tri_att_start, &g->tri_att_start, ctx, false, st->tri_start, dz);
    st->tri_start = {};
    triangle_multiplication_backward(w.tri_mul_in, &g->tri_mul_in, ctx, false, st->tri_in, dz);
    st->tri_in = {};
    triangle_multiplication_backward(w.tri_mul_out, &g->tri_mul_out, ctx, true, st->tri_out, dz);
    st->tri_out = {};
    outer_product_mean_backward(w.outer_product_mean, &g->outer_product_mean, ctx, st->opm, dz, dm);
    st->opm = {};
    transition_backward(w.msa_transition, &g->msa_transition, ctx, st->msa_trans, dm, s * r,
                        cfg.c_m);
    st->msa_trans = {};
    msa_column_attention_backward(w.msa_att_col, &g->msa_att_col, ctx, st->col, dm);
    st->col = {};
    msa_row_attention_backward(w.msa_att_row, &g->msa_att_row, ctx, st->row, dm, dz);
    st->row = {};
    return;
  }
  // kModule: rebuild each module's state from its saved input (on a scratch copy), then backward.
  auto take = [](Tensor& t) {
    Tensor x = t.clone();
    t = Tensor();
    return x;
  };
  {
    Tensor x = take(st->z_in[5]);
    TransitionState t;
    transition_train(w.pair_transition, ctx, x.f32(), r * r, cfg.c_z, &t);
    transition_backward(w.pair_transition, &g->pair_transition, ctx, t, dz, r * r, cfg.c_z);
  }
  {
    Tensor x = take(st->z_in[4]);
    AttentionState a;
    triangle_attention_train(w.tri_att_end, ctx, true, x.f32(), &a);
    triangle_attention_backward(w.tri_att_end, &g->tri_att_end, ctx, true, a, dz);
  }
  {
    Tensor x = take(st->z_in[3]);
    AttentionState a;
    triangle_attention_train(w.tri_att_start, ctx, false, x.f32(), &a);
    triangle_attention_backward(w.tri_att_start, &g->tri_att_start, ctx, false, a, dz);
  }
  {
    Tensor x = take(st->z_in[2]);
    TriangleMultiplicationState t;
    triangle_multiplication_train(w.tri_mul_in, ctx, false, x.f32(), &t);
    triangle_multiplication_backward(w.tri_mul_in, &g->tri_mul_in, ctx, false, t, dz);
  }
  {
    Tensor x = take(st->z_in[1]);
    TriangleMultiplicationState t;
    triangle_multiplication_train(w.tri_mul_out, ctx, true, x.f32(), &t);
    triangle_multiplication_backward(w.tri_mul_out, &g->tri_mul_out, ctx, true, t, dz);
  }
  {
    Tensor x = st->z_in[0].clone();  // z_in[0] is needed again by the row attention
    OuterProductMeanState o;
    outer_product_mean_train(w.outer_product_mean, ctx, m_out.f32(), x.f32(), &o);
    outer_product_mean_backward(w.outer_product_mean, &g->outer_product_mean, ctx, o, dz, dm);
  }
  {
    Tensor x = take(st->m_in[2]);
    TransitionState t;
    transition_train(w.msa_transition, ctx, x.f32(), s * r, cfg.c_m, &t);
    transition_backward(w.msa_transition, &g->msa_transition, ctx, t, dm, s * r, cfg.c_m);
  }
  {
    Tensor x = take(st->m_in[1]);
    AttentionState a;
    msa_column_attention_train(w.msa_att_col, ctx, x.f32(), &a);
    msa_column_attention_backward(w.msa_att_col, &g->msa_att_col, ctx, a, dm);
  }
  {
    Tensor x = take(st->m_in[0]);
    Tensor zc = take(st->z_in[0]);
    AttentionState a;
    msa_row_attention_train(w.msa_att_row, ctx, x.f32(), zc.f32(), &a);
    msa_row_attention_backward(w.msa_att_row, &g->msa_att_row, ctx, a, dm, dz);
  }
}

// The block's input m as kept by its state (what the previous block's OPM read).
Tensor block_input_m(const BlockState& st) {
  switch (st.policy) {
    case Recompute::kNone:
      return st.row.x_in;
    case Recompute::kModule:
      return st.m_in[0];
    case Recompute::kBlock:
      return st.m0;
  }
  return Tensor();
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
  BlockContext ctx = make_context(cfg, in, opts.chunk);
  ctx.dropout = opts.dropout;
  // Per-block dropout keys: block b's masks depend on (seed, b) only.
  auto block_ctx = [&](int b) {
    BlockContext c = ctx;
    c.dropout_key = splitmix64(opts.seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(b + 1)));
    return c;
  };
  auto policy = [&](int b) {
    if (opts.policy.empty()) return Recompute::kNone;
    return opts.policy.size() == 1 ? opts.policy[0] : opts.policy[b];
  };

  MemoryScope scope;
  const int64_t live0 = scope.start_live();
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<BlockState>> states;
  for (int b = 0; b < nb; ++b) {
    states.push_back(std::make_unique<BlockState>());
    block_forward(*blocks_[b], block_ctx(b), m.f32(), z.f32(), policy(b), states.back().get());
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
                   dz.f32());
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
