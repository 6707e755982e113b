// Block- and stack-level training: the recompute policies and EvoformerStack::train_step.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>

#include "foldcube/extra_msa.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"
#include "kernels/backward.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"
#include "layers/swiglu_transition.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/dropout.h"
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

void layer_train(const LayerDesc& l, const void* w, const BlockContext& ctx, float* m, float* z,
                 LayerState* st) {
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return msa_row_attention_train(layer_params<MsaRowAttentionW>(l, w), ctx, m, z,
                                     st ? &st->att : nullptr);
    case LayerKind::kMsaColumnAttention:
      return msa_column_attention_train(layer_params<MsaColumnAttentionW>(l, w), ctx, m,
                                        st ? &st->att : nullptr);
    case LayerKind::kTransition:
      return transition_train(layer_params<TransitionW>(l, w), ctx, l.updates == Stream::kM ? m : z,
                              stream_rows(ctx, l.updates), stream_channels(ctx, l.updates),
                              st ? &st->trans : nullptr);
    case LayerKind::kOuterProductMean: {
      OuterProductMeanState o;  // the state is built even when it is not kept
      outer_product_mean_train(layer_params<OuterProductMeanW>(l, w), ctx, m, z, &o);
      if (st) {
        st->opm = std::move(o);
        opm_state_to_store(ctx, &st->opm);
      }
      return;
    }
    case LayerKind::kTriangleMultiplication:
      return triangle_multiplication_train(layer_params<TriangleMultiplicationW>(l, w), ctx,
                                           !l.transposed, z, st ? &st->tri : nullptr);
    case LayerKind::kTriangleAttention:
      return triangle_attention_train(layer_params<TriangleAttentionW>(l, w), ctx, l.transposed, z,
                                      st ? &st->att : nullptr);
    case LayerKind::kSwiGluTransition:
      return swiglu_transition_train(layer_params<SwiGluTransitionW>(l, w), ctx,
                                     l.updates == Stream::kM ? m : z, stream_rows(ctx, l.updates),
                                     stream_channels(ctx, l.updates), st ? &st->trans : nullptr);
    case LayerKind::kMsaColumnGlobalAttention:
      return msa_column_global_attention_train(layer_params<MsaColumnGlobalAttentionW>(l, w), ctx,
                                               m, st ? &st->global : nullptr);
    case LayerKind::kMaskedTransition:
      return transition_train(layer_params<TransitionW>(l, w), ctx, m, stream_rows(ctx, Stream::kM),
                              stream_channels(ctx, Stream::kM), st ? &st->trans : nullptr,
                              ctx.msa_mask);
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no training path");
}

void layer_backward(const LayerDesc& l, const void* w, void* g, const BlockContext& ctx,
                    const float* x_in, const float* read_in, LayerState* st, float* dm, float* dz) {
  float* dx = l.updates == Stream::kM ? dm : dz;
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return msa_row_attention_backward(layer_params<MsaRowAttentionW>(l, w),
                                        &layer_params<MsaRowAttentionW>(l, g), ctx, x_in, read_in,
                                        &st->att, dm, dz);
    case LayerKind::kMsaColumnAttention:
      return msa_column_attention_backward(layer_params<MsaColumnAttentionW>(l, w),
                                           &layer_params<MsaColumnAttentionW>(l, g), ctx, x_in,
                                           &st->att, dm);
    case LayerKind::kTransition:
      return transition_backward(layer_params<TransitionW>(l, w), &layer_params<TransitionW>(l, g),
                                 ctx, x_in, &st->trans, dx, stream_rows(ctx, l.updates),
                                 stream_channels(ctx, l.updates));
    case LayerKind::kOuterProductMean: {
      const OuterProductMeanW& wo = layer_params<OuterProductMeanW>(l, w);
      if (!st->opm.a.defined())
        outer_product_mean_train(wo, ctx, read_in, nullptr, &st->opm);
      else
        opm_state_from_store(&st->opm);
      outer_product_mean_backward(wo, &layer_params<OuterProductMeanW>(l, g), ctx, read_in, st->opm,
                                  dz, dm);
      st->opm = {};
      return;
    }
    case LayerKind::kTriangleMultiplication:
      return triangle_multiplication_backward(layer_params<TriangleMultiplicationW>(l, w),
                                              &layer_params<TriangleMultiplicationW>(l, g), ctx,
                                              !l.transposed, x_in, &st->tri, dz);
    case LayerKind::kTriangleAttention:
      return triangle_attention_backward(layer_params<TriangleAttentionW>(l, w),
                                         &layer_params<TriangleAttentionW>(l, g), ctx, l.transposed,
                                         x_in, &st->att, dz);
    case LayerKind::kSwiGluTransition:
      return swiglu_transition_backward(
          layer_params<SwiGluTransitionW>(l, w), &layer_params<SwiGluTransitionW>(l, g), ctx, x_in,
          &st->trans, dx, stream_rows(ctx, l.updates), stream_channels(ctx, l.updates));
    case LayerKind::kMsaColumnGlobalAttention:
      return msa_column_global_attention_backward(layer_params<MsaColumnGlobalAttentionW>(l, w),
                                                  &layer_params<MsaColumnGlobalAttentionW>(l, g),
                                                  ctx, x_in, &st->global, dm);
    case LayerKind::kMaskedTransition:
      return transition_backward(layer_params<TransitionW>(l, w), &layer_params<TransitionW>(l, g),
                                 ctx, x_in, &st->trans, dm, stream_rows(ctx, Stream::kM),
                                 stream_channels(ctx, Stream::kM), ctx.msa_mask);
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no training path");
}

namespace {

Tensor copy_of(const float* p, const Shape& shape) {
  Tensor t = Tensor::empty(shape);
  std::memcpy(t.f32(), p, t.nbytes());
  return t;
}
}  // namespace

Tensor kept_copy(const float* p, const Shape& shape, DType store) {
  if (store == DType::F32) return copy_of(p, shape);
  Tensor t = Tensor::empty(shape, DType::BF16);
  kern::f32_to_bf16(p, t.data<uint16_t>(), t.numel());
  return t;
}

Tensor as_f32(const Tensor& t) {
  if (!t.defined() || t.dtype() == DType::F32) return t;
  Tensor f = Tensor::empty(t.shape());
  kern::bf16_to_f32(t.data<uint16_t>(), f.f32(), t.numel());
  return f;
}

namespace {
// Everything a block keeps from its forward for its backward.
struct BlockState {
  Recompute policy = Recompute::kNone;
  // kNone and kModule, per layer: the copies of saved_inputs ([s, r, c_m] or [r, r, c_z]).
  std::vector<Tensor> in_updated, in_read;
  // kNone: the layers' saved states besides their inputs (per chunk where the layer chunks).
  std::vector<LayerState> layers;
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

// The block forward with every layer's training function, saving inputs and states as the
// policy says.
void block_forward(const BlockTable& t, const void* w, const BlockContext& ctx, float* m, float* z,
                   Recompute policy, BlockState* st, const ModuleClock& clk) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const Shape ms = {ctx.s, ctx.r, cfg.c_m}, zs = {ctx.r, ctx.r, cfg.c_z};
  auto copy = [&](Stream x) {
    return x == Stream::kM ? kept_copy(m, ms, ctx.store) : kept_copy(z, zs, ctx.store);
  };
  // BF16 storage: the streams a layer touches are rounded to bf16 values before it runs.
  auto round = [&](Stream x) {
    if (ctx.store != DType::BF16 || x == Stream::kNone) return;
    if (x == Stream::kM)
      kern::round_to_bf16(m, m, shape_numel(ms));
    else
      kern::round_to_bf16(z, z, shape_numel(zs));
  };
  st->policy = policy;
  if (policy == Recompute::kBlock) {
    st->m0 = copy(Stream::kM);
    st->z0 = copy(Stream::kZ);
  }
  const bool keep = policy == Recompute::kNone;
  st->in_updated.assign(t.count, Tensor());
  st->in_read.assign(t.count, Tensor());
  st->layers.assign(t.count, LayerState());
  for (int i = 0; i < t.count; ++i) {
    const LayerDesc& l = t.layers[i];
    round(l.updates);
    round(l.reads);
    if (policy != Recompute::kBlock) {
      const SavedInputs in = saved_inputs(t, i);
      if (in.updated) st->in_updated[i] = copy(l.updates);
      if (in.read) st->in_read[i] = copy(l.reads);
    }
    clk.run(l.name, [&] { layer_train(l, w, ctx, m, z, keep ? &st->layers[i] : nullptr); });
  }
}

// Backward of one block. dm, dz: dL/d block output on entry, dL/d block input on exit.
// m_out: the block's output m (what a layer reading m after the last m update reads). Under kNone
// the layers' saved states are consumed chunk by chunk; under kModule they are empty, so every
// layer recomputes its state one chunk at a time from its saved input; under kBlock the block
// forward is re-run with kNone first. Each layer's inputs are freed after its backward.
void block_backward(const BlockTable& t, const void* w, void* g, const BlockContext& ctx,
                    BlockState* st, const Tensor& m_out, const Tensor& z_out, float* dm, float* dz,
                    const ModuleClock& clk) {
  if (st->policy == Recompute::kBlock) {
    // Recompute on the saved input: z0 in place; m0 on a copy, since the caller still holds m0
    // as the previous block's output (z0 too when a layer reads the block's output z). Kept in
    // bf16, both are widened copies.
    const bool wide = st->m0.dtype() == DType::BF16;
    Tensor m = wide ? as_f32(st->m0) : st->m0.clone();
    Tensor z = wide ? as_f32(st->z0) : reads_block_output(t, Stream::kZ) ? st->z0.clone() : st->z0;
    st->m0 = Tensor();
    st->z0 = Tensor();
    BlockState full;
    block_forward(t, w, ctx, m.f32(), z.f32(), Recompute::kNone, &full, ModuleClock{clk.out, 2});
    block_backward(t, w, g, ctx, &full, m, z, dm, dz, clk);
    return;
  }
  for (int i = t.count - 1; i >= 0; --i) {
    const LayerDesc& l = t.layers[i];
    const Tensor& read =
        st->in_read[i].defined() ? st->in_read[i] : (l.reads == Stream::kM ? m_out : z_out);
    {
      // f32 views of the kept inputs (widened copies while the layer runs when kept in bf16)
      const Tensor x_in = as_f32(st->in_updated[i]);
      const Tensor read_in = l.reads != Stream::kNone ? as_f32(read) : Tensor();
      clk.run(l.name, [&] {
        layer_backward(l, w, g, ctx, x_in.defined() ? x_in.f32() : nullptr,
                       read_in.defined() ? read_in.f32() : nullptr, &st->layers[i], dm, dz);
      });
    }
    st->in_updated[i] = Tensor();
    st->in_read[i] = Tensor();
  }
}

// The block's input of stream x as kept by its state (the previous block's output, which a layer
// of that block reading x after its last update of x reads). Undefined when no layer keeps it.
Tensor block_input(const BlockTable& t, const BlockState& st, Stream x) {
  if (st.policy == Recompute::kBlock) return x == Stream::kM ? st.m0 : st.z0;
  const int i = block_input_layer(t, x);
  if (i < 0) return Tensor();
  return t.layers[i].updates == x ? st.in_updated[i] : st.in_read[i];
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Status check_train_options(const TrainOptions& opts, int nb) {
  if (!opts.policy.empty() && opts.policy.size() != 1 && static_cast<int>(opts.policy.size()) != nb)
    return Status::InvalidArgument("recompute policy list has " +
                                   std::to_string(opts.policy.size()) + " entries for " +
                                   std::to_string(nb) + " blocks");
  if (opts.chunk < 0 || opts.chunk_target_bytes < 0)
    return Status::InvalidArgument(
        "chunk (" + std::to_string(opts.chunk) + ") and chunk_target_bytes (" +
        std::to_string(opts.chunk_target_bytes) + ") must be >= 0 (0 = automatic)");
  if (opts.dtype != DType::F32 && opts.dtype != DType::BF16)
    return Status::InvalidArgument("training dtype must be fp32 or bf16");
  return Status::OK();
}

BlockContext train_context(const EvoformerConfig& cfg, const StackInputs& in,
                           const TrainOptions& opts) {
  BlockContext ctx =
      make_context(cfg, in, opts.chunk,
                   opts.chunk_target_bytes > 0 ? opts.chunk_target_bytes
                                               : default_train_chunk_target_bytes(cfg, in.s, in.r));
  ctx.dropout = opts.dropout;
  ctx.store = opts.dtype;
  return ctx;
}

Status train_blocks(const BlockTable& t, const std::vector<const void*>& w,
                    const std::vector<void*>& grads, const std::function<void(int)>& alloc_grads,
                    const BlockContext& ctx, const TrainOptions& opts, Tensor& m, Tensor& z,
                    const Tensor& grad_out_m, const Tensor& grad_out_z, TrainResult* out,
                    SingleHead* head) {
  const int nb = static_cast<int>(w.size());
  // Per-block dropout keys: block b's masks depend on (seed, b) only.
  auto block_ctx = [&](int b) {
    BlockContext c = ctx;
    c.dropout_key = block_dropout_key(opts.seed, b);
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
    if (cancel_requested()) return Status::Cancelled("training step interrupted (forward)");
    states.push_back(std::make_unique<BlockState>());
    block_forward(t, w[b], block_ctx(b), m.f32(), z.f32(), policy(b), states.back().get(),
                  fwd_clock);
  }
  out->forward_ms = ms_since(t0);
  out->activation_bytes = mem_stats().live_bytes - live0;

  t0 = std::chrono::steady_clock::now();
  Tensor dm = grad_out_m.clone(), dz = grad_out_z.clone();
  const int64_t r = ctx.r, cm = ctx.cfg->c_m, cs = ctx.cfg->c_s;
  if (head != nullptr && head->grad.defined())  // dm[0] += dL/ds W
    kern::linear_backward(m.f32(), cm, r, cm, head->w.f32(), cs, head->grad.f32(), cs, dm.f32(), cm,
                          nullptr, nullptr, /*accumulate=*/true);
  Tensor m_out = m, z_out = z;  // outputs of the block being differentiated
  const bool m_read = reads_block_output(t, Stream::kM), z_read = reads_block_output(t, Stream::kZ);
  for (int b = nb - 1; b >= 0; --b) {
    if (cancel_requested()) return Status::Cancelled("training step interrupted (backward)");
    alloc_grads(b);
    // The block input, kept only where the previous block's backward reads its output.
    const Tensor m_in = m_read ? block_input(t, *states[b], Stream::kM) : Tensor();
    const Tensor z_in = z_read ? block_input(t, *states[b], Stream::kZ) : Tensor();
    block_backward(t, w[b], grads[b], block_ctx(b), states[b].get(), m_out, z_out, dm.f32(),
                   dz.f32(), bwd_clock);
    states[b].reset();
    m_out = m_in;
    z_out = z_in;
  }
  m_out = Tensor();  // block 0's inputs
  z_out = Tensor();
  out->s = Tensor();
  if (head != nullptr) {
    head->gw = Tensor::zeros({cs, cm});
    head->gb = Tensor::zeros({cs});
    if (head->grad.defined())
      kern::linear_backward(m.f32(), cm, r, cm, head->w.f32(), cs, head->grad.f32(), cs, nullptr,
                            cm, head->gw.f32(), head->gb.f32());
    out->s = Tensor::empty({r, cs});
    kern::linear(m.f32(), cm, r, cm, head->w.f32(), head->b.f32(), cs, out->s.f32(), cs);
  }
  out->backward_ms = ms_since(t0);
  out->peak_bytes = scope.peak() - live0;
  out->grad_m = dm;
  out->grad_z = dz;
  return Status::OK();
}

namespace {

// A training step of an AF2 stack (EvoformerStack, ExtraMsaStack) of blocks W of table t:
// input checks, the context (global_eps for the ExtraMSA's global attention), train_blocks, and
// the gradients under OpenFold names (the head's linear.* when head->grad is defined).
template <typename W>
Status train_af2_stack(const BlockTable& t, const EvoformerConfig& cfg,
                       const std::vector<std::unique_ptr<W>>& blocks, float global_eps, Tensor& m,
                       Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                       const Tensor& grad_out_m, const Tensor& grad_out_z, SingleHead* head,
                       const TrainOptions& opts, TrainResult* out) {
  const int nb = static_cast<int>(blocks.size());
  FC_RETURN_IF_ERROR(check_train_options(opts, nb));
  StackInputs in;
  FC_RETURN_IF_ERROR(prepare_inputs(cfg, m, z, msa_mask, pair_mask, &in));
  FC_RETURN_IF_ERROR(check_input("grad.output.m", grad_out_m, m.shape()));
  FC_RETURN_IF_ERROR(check_input("grad.output.z", grad_out_z, z.shape()));
  if (head != nullptr && head->grad.defined())
    FC_RETURN_IF_ERROR(check_input("grad.output.s", head->grad, {in.r, cfg.c_s}));
  std::vector<const void*> w(nb);
  std::vector<std::unique_ptr<W>> grads(nb);
  std::vector<void*> g(nb);
  for (int b = 0; b < nb; ++b) {
    w[b] = blocks[b].get();
    grads[b] = std::make_unique<W>();
    g[b] = grads[b].get();
  }
  auto alloc = [&](int b) { allocate_block_grads(cfg, grads[b].get()); };
  BlockContext ctx = train_context(cfg, in, opts);
  ctx.global_eps = global_eps;
  FC_RETURN_IF_ERROR(
      train_blocks(t, w, g, alloc, ctx, opts, m, z, grad_out_m, grad_out_z, out, head));
  out->grad_params.clear();
  for (int b = 0; b < nb; ++b)
    for (auto& [name, p] : named_params(*grads[b], block_prefix(b)))
      out->grad_params.emplace_back(name, p);
  if (head != nullptr && head->grad.defined()) {
    out->grad_params.emplace_back("linear.weight", head->gw);
    out->grad_params.emplace_back("linear.bias", head->gb);
  }
  return Status::OK();
}

}  // namespace

Status EvoformerStack::train_step(Tensor& m, Tensor& z, const Tensor& msa_mask,
                                  const Tensor& pair_mask, const Tensor& grad_out_m,
                                  const Tensor& grad_out_z, const TrainOptions& opts,
                                  TrainResult* out) const {
  return train_step(m, z, msa_mask, pair_mask, grad_out_m, grad_out_z, Tensor(), opts, out);
}

Status EvoformerStack::train_step(Tensor& m, Tensor& z, const Tensor& msa_mask,
                                  const Tensor& pair_mask, const Tensor& grad_out_m,
                                  const Tensor& grad_out_z, const Tensor& grad_out_s,
                                  const TrainOptions& opts, TrainResult* out) const {
  SingleHead head{linear_w_, linear_b_, grad_out_s, Tensor(), Tensor()};
  return train_af2_stack(kEvoformerBlock, cfg_, blocks_, ExtraMsaStack::kDefaultGlobalEps, m, z,
                         msa_mask, pair_mask, grad_out_m, grad_out_z, &head, opts, out);
}

Status ExtraMsaStack::train_step(Tensor& m, Tensor& z, const Tensor& msa_mask,
                                 const Tensor& pair_mask, const Tensor& grad_out_m,
                                 const Tensor& grad_out_z, const TrainOptions& opts,
                                 TrainResult* out) const {
  return train_af2_stack(kExtraMsaBlock, cfg_, blocks_, eps_global_, m, z, msa_mask, pair_mask,
                         grad_out_m, grad_out_z, nullptr, opts, out);
}

}  // namespace fc
