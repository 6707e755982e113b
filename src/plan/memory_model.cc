// The training-step memory model. It replays the allocation sequence of src/model/train_*.cc
// tensor by tensor on a counter of live bytes (AllocReplay: f32 buffers at elem_bytes per element,
// the bf16-kept layer inputs of a BF16 step at 2), chunk by chunk with the chunk sizes the training
// functions pick (the *_train_chunk functions of src/model/train.h). Kernel scratch comes from the
// kernels' own *_scratch_floats functions, so the model stays exact when those change. Dropout
// masks are not modelled.
#include "plan/memory_model.h"

#include <algorithm>

#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "layers/swiglu_transition.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/param_alloc.h"
#include "model/train.h"

namespace fc {

namespace {

// The context the training step builds, as far as the model reads it.
BlockContext model_context(const EvoformerConfig& cfg, int64_t s, int64_t r, int threads,
                           int64_t chunk, int64_t chunk_target_bytes, DType store) {
  BlockContext ctx = shape_context(
      cfg, s, r, chunk,
      chunk_target_bytes > 0 ? chunk_target_bytes : default_train_chunk_target_bytes(cfg, s, r),
      threads);
  ctx.store = store;
  return ctx;
}

// A kept stream copy of n elements in the step's storage type (kept_copy in train_block.cc), and
// its release.
void alloc_kept(AllocReplay& S, const BlockContext& ctx, int64_t n) {
  ctx.store == DType::BF16 ? S.alloc_bf16(n) : S.alloc(n);
}
void free_kept(AllocReplay& S, const BlockContext& ctx, int64_t n) {
  ctx.store == DType::BF16 ? S.free_bf16(n) : S.free(n);
}

// The attention dimensions of an attention layer.
AttentionDims attn_dims(const LayerDesc& l, const BlockContext& ctx) {
  const EvoformerConfig& c = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r;
  const int64_t Hm = c.no_heads_msa, Cm = c.c_hidden_msa_att;
  const int64_t Hp = c.no_heads_pair, Cp = c.c_hidden_pair_att;
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return {s, r, c.c_m, Hm, Cm, true, false, l.bias_logits};
    case LayerKind::kMsaColumnAttention:
      return {r, s, c.c_m, Hm, Cm, false, true};
    case LayerKind::kTriangleAttention:
      return {r, r, c.c_z, Hp, Cp, true, l.transposed};
    default:
      FC_CHECK_MSG(false, std::string(l.name) + " is not an attention layer");
  }
  return {};
}

int64_t stream_elems(const BlockContext& ctx, Stream st) {
  return stream_rows(ctx, st) * stream_channels(ctx, st);
}

// The training forward of one layer (layer_train in train_block.cc).
void layer_fwd(AllocReplay& S, const BlockContext& ctx, const LayerDesc& l, bool keep) {
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
    case LayerKind::kMsaColumnAttention:
    case LayerKind::kTriangleAttention:
      return attention_train_replay(S, ctx, attn_dims(l, ctx), keep);
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      const int64_t c = stream_channels(ctx, l.updates);
      return transition_train_replay(S, ctx, stream_rows(ctx, l.updates), c,
                                     ctx.cfg->transition_n * c, keep,
                                     l.kind == LayerKind::kMaskedTransition);
    }
    case LayerKind::kOuterProductMean:
      opm_train_replay(S, ctx, true, keep);
      if (keep) opm_state_to_store_replay(S, ctx);
      return;
    case LayerKind::kTriangleMultiplication:
      return tri_mul_train_replay(S, ctx, keep);
    case LayerKind::kSwiGluTransition: {
      const int64_t c = stream_channels(ctx, l.updates);
      return swiglu_train_replay(S, ctx, stream_rows(ctx, l.updates), c, ctx.cfg->transition_n * c,
                                 keep);
    }
    case LayerKind::kMsaColumnGlobalAttention:
      return global_attention_train_replay(S, ctx, keep);
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no training path");
}

// The backward of one layer (layer_backward); kept: its state from the forward is live.
void layer_bwd(AllocReplay& S, const BlockContext& ctx, const LayerDesc& l, bool kept) {
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
    case LayerKind::kMsaColumnAttention:
    case LayerKind::kTriangleAttention:
      return attention_backward_replay(S, ctx, attn_dims(l, ctx), kept);
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      const int64_t c = stream_channels(ctx, l.updates);
      return transition_backward_replay(S, ctx, stream_rows(ctx, l.updates), c,
                                        ctx.cfg->transition_n * c, kept,
                                        l.kind == LayerKind::kMaskedTransition);
    }
    case LayerKind::kOuterProductMean:
      if (!kept) opm_train_replay(S, ctx, false, true);
      if (kept) opm_state_from_store_replay(S, ctx);
      opm_backward_replay(S, ctx);
      S.free(opm_state_floats(ctx));
      return;
    case LayerKind::kTriangleMultiplication:
      return tri_mul_backward_replay(S, ctx, kept);
    case LayerKind::kSwiGluTransition: {
      const int64_t c = stream_channels(ctx, l.updates);
      return swiglu_backward_replay(S, ctx, stream_rows(ctx, l.updates), c,
                                    ctx.cfg->transition_n * c, kept);
    }
    case LayerKind::kMsaColumnGlobalAttention:
      return global_attention_backward_replay(S, ctx, kept);
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no training path");
}

// block_forward (train_block.cc): layer inputs copied under none and module, states kept under
// none, the block input copied under block.
void block_fwd(AllocReplay& S, const BlockTable& t, const BlockContext& ctx, Recompute policy) {
  if (policy == Recompute::kBlock)
    alloc_kept(S, ctx, stream_elems(ctx, Stream::kM) + stream_elems(ctx, Stream::kZ));
  for (int i = 0; i < t.count; ++i) {
    const LayerDesc& l = t.layers[i];
    if (policy != Recompute::kBlock) {
      const SavedInputs in = saved_inputs(t, i);
      if (in.updated) alloc_kept(S, ctx, stream_elems(ctx, l.updates));
      if (in.read) alloc_kept(S, ctx, stream_elems(ctx, l.reads));
    }
    layer_fwd(S, ctx, l, policy == Recompute::kNone);
  }
}

// block_backward. input_held: the block's inputs that a layer of the previous block reads as
// its output (reads_block_output: m for the Evoformer's OPM, z for the Pairformer's attention)
// stay alive after the backward (the driver holds them as the previous block's outputs), else they
// are freed with the state. output_f32: the block's outputs are f32 (the stack's last block, a
// recomputed block), else they are the next block's kept inputs (bf16 under BF16 storage).
void block_bwd(AllocReplay& S, const BlockTable& t, const BlockContext& ctx, Recompute policy,
               bool input_held, bool output_f32) {
  const int64_t m = stream_elems(ctx, Stream::kM), z = stream_elems(ctx, Stream::kZ);
  const bool hold_m = input_held && reads_block_output(t, Stream::kM);
  const bool hold_z = input_held && reads_block_output(t, Stream::kZ);
  const bool bf16 = ctx.store == DType::BF16;
  if (policy == Recompute::kBlock && bf16) {
    S.alloc(m + z);  // m0 and z0 widened
    S.free_bf16((hold_m ? 0 : m) + (hold_z ? 0 : z));
    block_fwd(S, t, ctx, Recompute::kNone);
    block_bwd(S, t, ctx, Recompute::kNone, false, true);
    S.free(m + z);
    return;
  }
  if (policy == Recompute::kBlock) {
    const bool z_copy = reads_block_output(t, Stream::kZ);
    S.alloc(m + (z_copy ? z : 0));  // the clone of m0 (and of z0; else z0 is reused in place)
    // m0 (z0 when copied) dies with the state's reference unless the driver holds it.
    S.free((hold_m ? 0 : m) + (z_copy && !hold_z ? z : 0));
    block_fwd(S, t, ctx, Recompute::kNone);
    block_bwd(S, t, ctx, Recompute::kNone, false, true);
    S.free(m + z);
    return;
  }
  const int held_m = hold_m ? block_input_layer(t, Stream::kM) : -1;
  const int held_z = hold_z ? block_input_layer(t, Stream::kZ) : -1;
  for (int i = t.count - 1; i >= 0; --i) {
    const LayerDesc& l = t.layers[i];
    const SavedInputs in = saved_inputs(t, i);
    // BF16: the f32 views of the kept inputs the layer's backward reads (as_f32 in train_block.cc)
    const int64_t wide = !bf16 ? 0
                               : (in.updated ? stream_elems(ctx, l.updates) : 0) +
                                     (l.reads != Stream::kNone && (in.read || !output_f32)
                                          ? stream_elems(ctx, l.reads)
                                          : 0);
    S.alloc(wide);
    layer_bwd(S, ctx, l, policy == Recompute::kNone);
    S.free(wide);
    auto held = [&](Stream st) {
      return (i == held_m && st == Stream::kM) || (i == held_z && st == Stream::kZ);
    };
    if (in.updated && !held(l.updates)) free_kept(S, ctx, stream_elems(ctx, l.updates));
    if (in.read && !held(l.reads)) free_kept(S, ctx, stream_elems(ctx, l.reads));
  }
}

// The gradient structs (allocate_block_grads, allocate_pairformer_block, ...): the layers'
// parameter descriptions (model/param_alloc.h) in counting mode.
void alloc_block_grads(AllocReplay& S, const EvoformerConfig& c, const BlockTable& t) {
  S.alloc(table_param_elems(c, t));
}

const BlockTable& stack_table(bool extra_msa) {
  return extra_msa ? kExtraMsaBlock : kEvoformerBlock;
}

Recompute policy_of(const std::vector<Recompute>& policy, int64_t b) {
  if (policy.empty()) return Recompute::kNone;
  FC_CHECK_MSG(policy.size() == 1 || b < static_cast<int64_t>(policy.size()),
               "recompute policy list shorter than the stack");
  return policy.size() == 1 ? policy[0] : policy[b];
}

}  // namespace

int64_t block_param_elems(const EvoformerConfig& cfg, const BlockTable& t) {
  return table_param_elems(cfg, t);
}

int64_t block_activation_bytes(const BlockTable& t, const EvoformerConfig& cfg, int64_t s,
                               int64_t r, Recompute policy, int64_t elem_bytes, int64_t chunk,
                               int64_t chunk_target_bytes, DType store) {
  AllocReplay S;
  S.elem = elem_bytes;
  block_fwd(S, t, model_context(cfg, s, r, 1, chunk, chunk_target_bytes, store), policy);
  return S.live;
}

int64_t block_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, Recompute policy,
                               int64_t elem_bytes, int64_t chunk, int64_t chunk_target_bytes,
                               bool extra_msa, DType store) {
  return block_activation_bytes(stack_table(extra_msa), cfg, s, r, policy, elem_bytes, chunk,
                                chunk_target_bytes, store);
}

int64_t stack_activation_bytes(const BlockTable& t, const EvoformerConfig& cfg, int64_t s,
                               int64_t r, int64_t blocks, const std::vector<Recompute>& policy,
                               int64_t elem_bytes, int64_t chunk, int64_t chunk_target_bytes,
                               DType store) {
  int64_t total = 0;
  for (int64_t b = 0; b < blocks; ++b)
    total += block_activation_bytes(t, cfg, s, r, policy_of(policy, b), elem_bytes, chunk,
                                    chunk_target_bytes, store);
  return total;
}

int64_t stack_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                               const std::vector<Recompute>& policy, int64_t elem_bytes,
                               int64_t chunk, int64_t chunk_target_bytes, bool extra_msa,
                               DType store) {
  return stack_activation_bytes(stack_table(extra_msa), cfg, s, r, blocks, policy, elem_bytes,
                                chunk, chunk_target_bytes, store);
}

int64_t stack_step_peak_bytes(const BlockTable& t, const EvoformerConfig& cfg, int64_t s, int64_t r,
                              int64_t blocks, const std::vector<Recompute>& policy, int threads,
                              int64_t elem_bytes, int64_t chunk, int64_t chunk_target_bytes,
                              DType store) {
  const BlockContext ctx = model_context(cfg, s, r, threads, chunk, chunk_target_bytes, store);
  const int64_t m = s * r * cfg.c_m, z = r * r * cfg.c_z;
  AllocReplay S;
  S.elem = elem_bytes;
  // Forward: the blocks' kept memory piles up.
  for (int64_t b = 0; b < blocks; ++b) block_fwd(S, t, ctx, policy_of(policy, b));
  // Backward (train_blocks in train_block.cc): the dm, dz copies; per block, from the last, its
  // parameter-gradient struct (alive until the end of the step), then its backward. The driver
  // holds block b's inputs that the previous block reads as outputs until block b - 1 is done,
  // block 0's until the end of the loop.
  S.alloc(m + z);
  const int64_t held =
      (reads_block_output(t, Stream::kM) ? m : 0) + (reads_block_output(t, Stream::kZ) ? z : 0);
  for (int64_t b = blocks - 1; b >= 0; --b) {
    alloc_block_grads(S, cfg, t);
    block_bwd(S, t, ctx, policy_of(policy, b), true, b + 1 == blocks);
    if (b + 1 < blocks) free_kept(S, ctx, held);
  }
  free_kept(S, ctx, held);
  // The Evoformer's single projection after the blocks: its parameter gradients and output.s.
  if (&t == &kEvoformerBlock) S.alloc(cfg.c_s * cfg.c_m + cfg.c_s + r * cfg.c_s);
  return S.peak;
}

int64_t stack_step_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                              const std::vector<Recompute>& policy, int threads, int64_t elem_bytes,
                              int64_t chunk, int64_t chunk_target_bytes, bool extra_msa,
                              DType store) {
  return stack_step_peak_bytes(stack_table(extra_msa), cfg, s, r, blocks, policy, threads,
                               elem_bytes, chunk, chunk_target_bytes, store);
}

int64_t block_backward_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                  Recompute policy, int threads, int64_t elem_bytes, int64_t chunk,
                                  int64_t chunk_target_bytes, bool extra_msa, DType store,
                                  bool last) {
  const BlockTable& t = stack_table(extra_msa);
  const BlockContext ctx = model_context(cfg, s, r, threads, chunk, chunk_target_bytes, store);
  AllocReplay S;
  S.elem = elem_bytes;
  block_fwd(S, t, ctx, policy);
  S.peak = S.live;  // the forward's transients are not the backward's
  const int64_t kept = S.live;
  alloc_block_grads(S, cfg, t);
  const int64_t grads = S.live - kept;
  block_bwd(S, t, ctx, policy, true, last);
  return S.peak - grads;
}

// ---- Checked public entries (include/foldcube/plan.h) ------------------------------------------

Status MemoryQuery::validate() const {
  FC_RETURN_IF_ERROR(cfg.validate());
  if (s < 1 || r < 1) return Status::InvalidArgument("memory model: s and r must be >= 1");
  if (blocks < 1) return Status::InvalidArgument("memory model: blocks must be >= 1");
  if (!policy.empty() && policy.size() != 1 && static_cast<int64_t>(policy.size()) != blocks)
    return Status::InvalidArgument("memory model: " + std::to_string(policy.size()) +
                                   " recompute policies for " + std::to_string(blocks) +
                                   " blocks (give 0, 1 or one per block)");
  for (Recompute p : policy)
    if (p != Recompute::kNone && p != Recompute::kModule && p != Recompute::kBlock)
      return Status::InvalidArgument("memory model: unknown recompute policy");
  if (threads < 1) return Status::InvalidArgument("memory model: threads must be >= 1");
  if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8)
    return Status::InvalidArgument("memory model: elem_bytes must be 1, 2, 4 or 8");
  if (chunk < 0 || chunk_target_bytes < 0)
    return Status::InvalidArgument("memory model: chunk and chunk_target_bytes must be >= 0");
  if (dtype != DType::F32 && dtype != DType::BF16)
    return Status::InvalidArgument("memory model: training dtype must be F32 or BF16");
  // Every count below stays far from int64 overflow: the largest buffer (elements) times the
  // element size, the blocks and a small factor must fit.
  const double widest =
      std::max<double>({static_cast<double>(cfg.c_m), double(cfg.c_z),
                        double(cfg.c_hidden_opm) * cfg.c_hidden_opm, double(cfg.c_hidden_mul) * 4,
                        double(cfg.transition_n) * cfg.c_m, double(cfg.transition_n) * cfg.c_z});
  const double elems = (double(s) * r + double(r) * r) * widest;
  if (elems * elem_bytes * blocks * 64 > 9e18)
    return Status::InvalidArgument("memory model: shape (s=" + std::to_string(s) +
                                   ", r=" + std::to_string(r) + ") too large to count in bytes");
  return Status::OK();
}

Status block_activation_bytes(const MemoryQuery& q, int64_t block, int64_t* out) {
  FC_RETURN_IF_ERROR(q.validate());
  if (block < 0 || block >= q.blocks)
    return Status::InvalidArgument("memory model: block " + std::to_string(block) +
                                   " outside [0, " + std::to_string(q.blocks) + ")");
  *out = block_activation_bytes(q.cfg, q.s, q.r, policy_of(q.policy, block), q.elem_bytes, q.chunk,
                                q.chunk_target_bytes, q.extra_msa, q.dtype);
  return Status::OK();
}

Status stack_activation_bytes(const MemoryQuery& q, int64_t* out) {
  FC_RETURN_IF_ERROR(q.validate());
  *out = stack_activation_bytes(q.cfg, q.s, q.r, q.blocks, q.policy, q.elem_bytes, q.chunk,
                                q.chunk_target_bytes, q.extra_msa, q.dtype);
  return Status::OK();
}

Status stack_step_peak_bytes(const MemoryQuery& q, int64_t* out) {
  FC_RETURN_IF_ERROR(q.validate());
  *out = stack_step_peak_bytes(q.cfg, q.s, q.r, q.blocks, q.policy, q.threads, q.elem_bytes,
                               q.chunk, q.chunk_target_bytes, q.extra_msa, q.dtype);
  return Status::OK();
}

Status forward_peak_bytes(const MemoryQuery& q, bool masks_given, int64_t* out) {
  FC_RETURN_IF_ERROR(q.validate());
  *out = forward_peak_bytes(q.cfg, q.s, q.r, masks_given, q.chunk, q.chunk_target_bytes, q.threads);
  return Status::OK();
}

Status forward_chunking(const MemoryQuery& q, bool extra_msa, std::vector<ModuleChunk>* out) {
  FC_RETURN_IF_ERROR(q.validate());
  *out = forward_chunking(q.cfg, q.s, q.r, q.chunk, q.chunk_target_bytes, q.threads, extra_msa);
  return Status::OK();
}

LayerReplayBytes layer_train_replay_bytes(const BlockContext& ctx, const LayerDesc& l, bool keep) {
  AllocReplay S;
  layer_fwd(S, ctx, l, keep);
  return {S.peak, S.live};
}

LayerReplayBytes layer_backward_replay_bytes(const BlockContext& ctx, const LayerDesc& l,
                                             bool kept) {
  AllocReplay S;
  layer_bwd(S, ctx, l, kept);
  return {S.peak, S.live};
}

}  // namespace fc
