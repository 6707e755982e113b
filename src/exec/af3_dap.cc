// The AF3 trunk under DAP (src/exec/af3_dap.h): the stacks' inputs validated on the root, shared
// as padded masks and shards, then the block tables' layers through the DAP executor's block
// loops (dap_run_blocks, dap_block_forward / dap_block_backward), which take each layer's shard
// layouts from the table.
#include "exec/af3_dap.h"

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"
#include "model/af3_access.h"
#include "model/af3_weights.h"
#include "model/block_table.h"
#include "model/dropout.h"
#include "model/train.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);
// Masked keys of the single attention and the pair-weighted averaging (Boltz: -1e6), as af3.cc.
constexpr float kKeyInf = 1e6f;

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// FNV-1a over a string (the cross-rank agreement of configs and options).
uint64_t hash_string(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

Status check_options(const dist::Communicator& comm, const EvoformerConfig& cfg,
                     const DapOptions& opts) {
  if (!comm.all_equal(hash_string(cfg.to_json())))
    return Status::InvalidArgument("DAP ranks hold different model configurations");
  if (opts.trace || !opts.partitions.empty())
    return Status::InvalidArgument(
        "the AF3 stacks under DAP support neither traces nor per-layer partitions yet");
  ForwardOptions fo;
  fo.dtype = opts.dtype;
  FC_RETURN_IF_ERROR(check_forward_dtype(fo).WithContext("DAP"));
  if (!comm.all_equal(static_cast<uint64_t>(opts.dtype)))
    return Status::InvalidArgument("DAP ranks were given different dtypes");
  return Status::OK();
}

// The forward's GEMM input type (DapOptions::dtype) on every shard context.
void set_dtype(DType dtype, DapShards* sh) {
  for (BlockContext* c : {&sh->row, &sh->col, &sh->full}) c->dtype = dtype;
}

// Shares the root's validated inputs: its error (root_st) on every rank, else the layout of
// m [s, r, c_m] (the Pairformer: s [1, n, c_s]) and the padded masks msa [s_pad, r_pad], pair
// [r_pad, r_pad]. m, z, in: the root's streams and prepared inputs (masks checked).
Status share_inputs(const EvoformerConfig& cfg, const dist::Communicator& comm,
                    const Status& root_st, const Tensor& m, const Tensor& z, const StackInputs& in,
                    DapLayout* l, Tensor* msa_p, Tensor* pair_p) {
  // share_padded_masks re-checks the root's tensors, then its root_check gives root_st; a failed
  // root passes one-element stand-ins so that the message is the AF3 one.
  const bool stand_in = comm.rank() == 0 && !root_st.ok();
  if (!stand_in)
    return share_padded_masks(
        cfg, comm, m, z, in.msa_mask, in.pair_mask, [] { return Status::OK(); }, l, msa_p, pair_p);
  return share_padded_masks(
      cfg, comm, Tensor::zeros({1, 1, cfg.c_m}), Tensor::zeros({1, 1, cfg.c_z}), Tensor(), Tensor(),
      [&] { return root_st; }, l, msa_p, pair_p);
}

// The root's valid single stream s [n, c] as the one-row MSA [1, n, c] (else undefined).
Tensor single_as_msa(const Tensor& s, const Status& root_st) {
  return root_st.ok() && s.defined() ? s.reshape({1, s.dim(0), s.dim(1)}) : Tensor();
}

// The AF3 key bias (-1e6 on masked tokens, every row), replacing the Evoformer's inf * (mask - 1)
// from the MSA mask. The token mask is the pair mask's diagonal (pair = mask[i] * mask[j]).
void set_key_bias(DapShards* sh) {
  const int64_t sp = sh->l.s_pad, rp = sh->l.r_pad;
  const float* pm = sh->pair_mask.f32();  // [r_pad, r_pad]
  float* b = sh->msa_bias.f32();          // [s_pad, r_pad]
  float* bt = sh->msa_bias_t.f32();       // [r_pad, s_pad]
  for (int64_t i = 0; i < sp; ++i)
    for (int64_t j = 0; j < rp; ++j) {
      const float v = kKeyInf * (pm[j * rp + j] - 1.f);
      b[i * rp + j] = v;
      bt[j * sp + i] = v;
    }
}

// The root's validated inputs shared (share_inputs; *in is released), and this rank's shard
// contexts over the padded masks with AF3's key bias.
Status make_shards(const EvoformerConfig& cfg, const dist::Communicator& comm,
                   const Status& root_st, const Tensor& m, const Tensor& z, StackInputs* in,
                   int64_t chunk, int64_t chunk_target_bytes, DapLayout* l, DapShards* sh) {
  Tensor msa_p, pair_p;  // [s_pad, r_pad], [r_pad, r_pad]
  FC_RETURN_IF_ERROR(share_inputs(cfg, comm, root_st, m, z, *in, l, &msa_p, &pair_p));
  *in = StackInputs();
  *sh = make_dap_shards(cfg, *l, std::move(msa_p), std::move(pair_p), chunk, chunk_target_bytes,
                        num_threads());
  set_key_bias(sh);
  return Status::OK();
}

// The single stream s [n, c] of the root, padded to r_pad tokens, scattered by tokens: this rank's
// [1, r_loc, c].
Tensor scatter_tokens(const Tensor& s, const DapLayout& l, int64_t c,
                      const dist::Communicator& comm) {
  const Tensor rows = comm.rank() == 0 ? s.reshape({l.r, 1, c}) : Tensor();  // [n, 1, c]
  return scatter_rows(rows, l.r_pad, 1, c, comm).reshape({1, l.r_loc, c});
}
// Token shards [1, r_loc, c] gathered to the root: [n, c] there, undefined elsewhere.
Tensor gather_tokens(const Tensor& mine, const DapLayout& l, const dist::Communicator& comm) {
  const int64_t c = mine.dim(2);
  Tensor all = gather_rows(mine.reshape({l.r_loc, 1, c}), l.r, 1, comm);  // [n, 1, c]
  return all.defined() ? all.reshape({l.r, c}) : all;
}

void fill_forward_stats(const dist::CommStats& c0, const dist::CommStats& b0,
                        const dist::CommStats& b1, const dist::Communicator& comm,
                        const MemoryScope& scope, int64_t shard_bytes, DapStats* stats) {
  if (stats == nullptr) return;
  stats->total = comm.stats().since(c0);
  stats->blocks = b1.since(b0);
  stats->peak_bytes = scope.peak();
  stats->work_peak_bytes = scope.peak_above_start();
  stats->shard_bytes = shard_bytes;
}

// Block b's dropout on every shard context of sh: on when opts.dropout, the key of train_blocks
// (src/model/train_block.cc) for (opts.seed, b), t's rates and axes, and each context's first
// global item (m by sequences: rank * s_loc; z rows and rows of z^T: rank * r_loc).
void set_af3_dap_dropout(const BlockTable& t, const TrainOptions& opts, int b, DapShards* sh) {
  set_dap_dropout(sh, opts.dropout, block_dropout_key(opts.seed, b));
  const DapLayout& l = sh->l;
  for (BlockContext* c : {&sh->row, &sh->col, &sh->full}) c->table = &t;
  sh->row.dropout_item0 = l.rank * l.s_loc;
  sh->col.dropout_item0 = l.rank * l.r_loc;
  sh->full.dropout_item0 = l.rank * l.r_loc;
}

// Every layer's training forward, then the backward, of the blocks w (weight structs W of table
// t) on this rank's shards mr (layout dap_boundary_m(t)), zr [r_loc, r_pad, c_z]; dmr, dzr: dL/d
// outputs on entry, dL/d inputs on exit. Parameter gradients (Boltz names, summed over the
// ranks) are appended to out->grad_params in block order. Dropout (opts.dropout): block b's
// contexts take the one-process key of (opts.seed, b) and t's rates, and draw AF3's per-item
// masks by global items (set_af3_dap_dropout), so the masks are those of one process.
template <typename W>
void train_blocks_dap(const BlockTable& t, const std::vector<const void*>& w,
                      void (*alloc)(const EvoformerConfig&, W*), DapShards& sh,
                      const dist::Communicator& comm, const TrainOptions& opts, Tensor& mr,
                      Tensor& zr, Tensor& dmr, Tensor& dzr, TrainResult* out,
                      DapTrainStats* stats) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  const int nb = static_cast<int>(w.size());
  const int64_t live_start = mem_stats().live_bytes;
  const dist::CommStats c0 = comm.stats();
  // bf16 training: kept inputs and states in bf16, bf16 GEMM inputs (as one process)
  for (BlockContext* c : {&sh.row, &sh.col, &sh.full}) c->store = opts.dtype;
  std::vector<std::unique_ptr<DapBlockState>> states;
  auto t0 = Clock::now();
  for (int b = 0; b < nb; ++b) {
    states.push_back(std::make_unique<DapBlockState>());
    set_af3_dap_dropout(t, opts, b, &sh);
    dap_block_forward(t, w[b], sh, comm, mr, zr, policy_of(opts, b), {}, states.back().get());
  }
  out->forward_ms = ms_since(t0);
  out->activation_bytes = mem_stats().live_bytes - live_start;
  const dist::CommStats c1 = comm.stats();

  t0 = Clock::now();
  const bool keep_z = reads_block_output(t, Stream::kZ);
  // A block's kept input of stream x (the previous block's output), in the boundary layout.
  auto kept_input = [&](const DapBlockState& sb, Stream x) {
    if (sb.policy == Recompute::kBlock) return x == Stream::kM ? sb.m0 : sb.z0;
    const int i = block_input_layer(t, x);
    FC_CHECK_MSG(i >= 0, std::string(t.name) + ": no layer keeps the block's input");
    return t.layers[i].updates == x && saved_inputs(t, i).updated ? sb.in_updated[i]
                                                                  : sb.in_read[i];
  };
  std::vector<std::vector<std::pair<std::string, Tensor>>> grads(nb);  // this rank's parts
  Tensor m_out = mr, z_out = keep_z ? zr : Tensor();  // the output of the block differentiated
  for (int b = nb - 1; b >= 0; --b) {
    W g;
    alloc(cfg, &g);
    Tensor m_in = kept_input(*states[b], Stream::kM);
    Tensor z_in = keep_z ? kept_input(*states[b], Stream::kZ) : Tensor();
    set_af3_dap_dropout(t, opts, b, &sh);
    dap_block_backward(t, w[b], &g, sh, comm, states[b].get(), m_out, z_out, dmr, dzr);
    states[b].reset();
    m_out = m_in;
    z_out = z_in;
    for (const NamedParam& p : boltz_params(g, "layers." + std::to_string(b) + "."))
      grads[b].emplace_back(p.name, gather_named(p));
  }
  const dist::CommStats c2 = comm.stats();
  for (auto& block : grads)  // summed over the ranks
    for (auto& [name, gt] : block) {
      comm.all_reduce(gt.f32(), gt.numel());
      out->grad_params.emplace_back(name, std::move(gt));
    }
  out->backward_ms = ms_since(t0);
  if (stats != nullptr) {
    stats->forward = c1.since(c0);
    stats->backward = c2.since(c1);
    stats->grad_reduce = comm.stats().since(c2);
    stats->activation_bytes = out->activation_bytes;
  }
}

// Options every rank must share, and what the AF3 DAP step does not support.
Status check_train(const dist::Communicator& comm, const EvoformerConfig& cfg,
                   const TrainOptions& opts, int nb) {
  std::string key = cfg.to_json() + "|" + std::to_string(opts.chunk) + "|" +
                    std::to_string(opts.chunk_target_bytes) + "|" + std::to_string(opts.dropout) +
                    "|" + std::to_string(opts.seed) + "|" +
                    std::to_string(static_cast<int>(opts.dtype));
  for (Recompute p : opts.policy) key += std::string("|") + recompute_name(p);
  if (!comm.all_equal(hash_string(key)))
    return Status::InvalidArgument(
        "DAP ranks hold different model configurations or training options");
  return check_train_options(opts, nb);
}
}  // namespace

DapBlockVolume dap_table_volume(const BlockTable& t, const EvoformerConfig& cfg,
                                const DapLayout& l) {
  const int64_t n1 = l.n - 1, sl = l.s_loc, rl = l.r_loc, sp = l.s_pad, rp = l.r_pad;
  DapBlockVolume v;
  const std::vector<std::pair<Shard, Shard>> lay = dap_block_layouts(t);
  Shard m = dap_boundary_m(t), z = Shard::kPairRows;
  auto to = [&](Shard* cur, Shard want, int64_t floats) {
    if (*cur != want) v.all_to_all_bytes += n1 * floats * kF;
    *cur = want;
  };
  const int last_m = dap_last_use(t, Stream::kM), last_z = dap_last_use(t, Stream::kZ);
  for (int i = 0; i < t.count; ++i) {
    const LayerDesc& ly = t.layers[i];
    to(&m, lay[i].first, sl * rl * cfg.c_m);
    to(&z, lay[i].second, rl * rl * cfg.c_z);
    int64_t gathered = 0;  // floats this rank contributes to the layer's all-gather
    switch (ly.kind) {
      case LayerKind::kMsaRowAttention:
        gathered = ly.single ? rl * cfg.c_m : rl * rp * cfg.no_heads_msa;
        break;
      case LayerKind::kTriangleAttention:
        gathered = rl * rp * cfg.no_heads_pair;
        break;
      case LayerKind::kTriangleMultiplication:
        gathered = cfg.c_hidden_mul * rl * rp;
        break;
      case LayerKind::kOuterProductMean:
        gathered = sp * rl * cfg.c_hidden_opm;
        break;
      default:
        break;
    }
    v.all_gather_bytes += n1 * gathered * kF;
    if (i == last_m) to(&m, dap_boundary_m(t), sl * rl * cfg.c_m);
    if (i == last_z) to(&z, Shard::kPairRows, rl * rl * cfg.c_z);
  }
  return v;
}

namespace {
// A stack's streams on this rank: the layout, the shard contexts and the shards (the Pairformer's
// s by tokens [1, r_loc, c_s] or the MSA module's m by sequences [s_loc, r_pad, c_m]; z by rows
// [r_loc, r_pad, c_z]).
struct Af3Shards {
  DapLayout l;
  DapShards sh;
  Tensor m, z;
};

// The root validates s, z, mask (then root_check, if given) and scatters them; its s and z are
// released. Every rank gets the root's error.
Status pairformer_shards(const PairformerStack& stack, const dist::Communicator& comm, Tensor& s,
                         Tensor& z, const Tensor& mask, const std::function<Status()>& root_check,
                         int64_t chunk, int64_t chunk_target_bytes, Af3Shards* out) {
  const EvoformerConfig& cfg = Af3Access::trunk(stack);
  StackInputs in;
  Status root_st;
  if (comm.rank() == 0) {
    root_st = Af3Access::pairformer_inputs(stack, s, z, mask, &in);
    if (root_st.ok() && root_check) root_st = root_check();
  }
  FC_RETURN_IF_ERROR(make_shards(cfg, comm, root_st, single_as_msa(s, root_st), z, &in, chunk,
                                 chunk_target_bytes, &out->l, &out->sh));
  out->m = scatter_tokens(s, out->l, cfg.c_m, comm);
  out->z = scatter_rows(z, out->l.r_pad, out->l.r_pad, cfg.c_z, comm);
  if (comm.rank() == 0) s = z = Tensor();
  return Status::OK();
}

// The same for the MSA module: the root builds the MSA embedding m from its inputs.
Status msa_module_shards(const MsaModule& mod, const dist::Communicator& comm, Tensor& z,
                         const Tensor& emb, const Tensor& msa_feat, const Tensor& msa_mask,
                         const Tensor& token_mask, const std::function<Status()>& root_check,
                         int64_t chunk, int64_t chunk_target_bytes, Af3Shards* out) {
  const EvoformerConfig& cfg = Af3Access::trunk(mod);
  StackInputs in;
  Status root_st;
  Tensor m;  // [N, n, c_m] the MSA embedding (root)
  if (comm.rank() == 0) {
    root_st = Af3Access::msa_module_inputs(mod, z, emb, msa_feat, msa_mask, token_mask, &m, &in);
    if (root_st.ok() && root_check) root_st = root_check();
  }
  FC_RETURN_IF_ERROR(
      make_shards(cfg, comm, root_st, m, z, &in, chunk, chunk_target_bytes, &out->l, &out->sh));
  out->m = scatter_rows(m, out->l.s_pad, out->l.r_pad, cfg.c_m, comm);
  m = Tensor();
  out->z = scatter_rows(z, out->l.r_pad, out->l.r_pad, cfg.c_z, comm);
  if (comm.rank() == 0) z = Tensor();
  return Status::OK();
}
}  // namespace

Status dap_forward(const PairformerStack& stack, const dist::Communicator& comm, Tensor& s,
                   Tensor& z, const Tensor& mask, const DapOptions& opts, DapStats* stats) {
  MemoryScope scope;
  const dist::CommStats c0 = comm.stats();
  const EvoformerConfig& cfg = Af3Access::trunk(stack);
  FC_RETURN_IF_ERROR(check_options(comm, cfg, opts));
  Af3Shards a;
  FC_RETURN_IF_ERROR(
      pairformer_shards(stack, comm, s, z, mask, nullptr, opts.chunk, opts.chunk_target_bytes, &a));
  set_dtype(opts.dtype, &a.sh);
  const DapLayout& l = a.l;
  Tensor& sr = a.m;  // [1, r_loc, c_s]
  Tensor& zr = a.z;  // [r_loc, r_pad, c_z]
  const int64_t shard_bytes = (sr.numel() + zr.numel()) * kF;
  const dist::CommStats b0 = comm.stats();
  dap_run_blocks(kPairformerBlock, Af3Access::blocks(stack), a.sh, comm, &sr, &zr);
  const dist::CommStats b1 = comm.stats();
  s = gather_tokens(sr, l, comm);
  sr = Tensor();
  z = gather_rows(zr, l.r, l.r, comm);
  fill_forward_stats(c0, b0, b1, comm, scope, shard_bytes, stats);
  return Status::OK();
}

Status dap_forward(const MsaModule& mod, const dist::Communicator& comm, Tensor& z,
                   const Tensor& emb, const Tensor& msa_feat, const Tensor& msa_mask,
                   const Tensor& token_mask, const DapOptions& opts, DapStats* stats) {
  MemoryScope scope;
  const dist::CommStats c0 = comm.stats();
  const EvoformerConfig& cfg = Af3Access::trunk(mod);
  FC_RETURN_IF_ERROR(check_options(comm, cfg, opts));
  Af3Shards a;
  FC_RETURN_IF_ERROR(msa_module_shards(mod, comm, z, emb, msa_feat, msa_mask, token_mask, nullptr,
                                       opts.chunk, opts.chunk_target_bytes, &a));
  set_dtype(opts.dtype, &a.sh);
  const DapLayout& l = a.l;
  Tensor& mr = a.m;  // [s_loc, r_pad, c_m]
  Tensor& zr = a.z;  // [r_loc, r_pad, c_z]
  const int64_t shard_bytes = (mr.numel() + zr.numel()) * kF;
  const dist::CommStats b0 = comm.stats();
  dap_run_blocks(kMsaModuleBlock, Af3Access::blocks(mod), a.sh, comm, &mr, &zr);
  const dist::CommStats b1 = comm.stats();
  mr = Tensor();
  z = gather_rows(zr, l.r, l.r, comm);
  fill_forward_stats(c0, b0, b1, comm, scope, shard_bytes, stats);
  return Status::OK();
}

Status dap_train_step(const PairformerStack& stack, const dist::Communicator& comm, Tensor& s,
                      Tensor& z, const Tensor& mask, const Tensor& grad_out_s,
                      const Tensor& grad_out_z, const TrainOptions& opts, DapTrainStats* stats,
                      TrainResult* out) {
  MemoryScope scope;
  const int64_t live0 = scope.start_live();
  const EvoformerConfig& cfg = Af3Access::trunk(stack);
  const std::vector<const void*> blocks = Af3Access::blocks(stack);
  FC_RETURN_IF_ERROR(check_train(comm, cfg, opts, static_cast<int>(blocks.size())));
  Af3Shards a;
  FC_RETURN_IF_ERROR(pairformer_shards(
      stack, comm, s, z, mask,
      [&]() -> Status {
        FC_RETURN_IF_ERROR(check_input("grad.output.s", grad_out_s, s.shape()));
        return check_input("grad.output.z", grad_out_z, z.shape());
      },
      opts.chunk, opts.chunk_target_bytes, &a));
  const DapLayout& l = a.l;
  Tensor& sr = a.m;                                                        // [1, r_loc, c_s]
  Tensor& zr = a.z;                                                        // [r_loc, r_pad, c_z]
  Tensor dsr = scatter_tokens(grad_out_s, l, cfg.c_m, comm);               // [1, r_loc, c_s]
  Tensor dzr = scatter_rows(grad_out_z, l.r_pad, l.r_pad, cfg.c_z, comm);  // [r_loc, r_pad, c_z]
  out->grad_params.clear();
  train_blocks_dap<PairformerBlockWeights>(kPairformerBlock, blocks, allocate_pairformer_block,
                                           a.sh, comm, opts, sr, zr, dsr, dzr, out, stats);
  s = gather_tokens(sr, l, comm);
  sr = Tensor();
  z = gather_rows(zr, l.r, l.r, comm);
  zr = Tensor();
  out->grad_m = gather_tokens(dsr, l, comm);
  dsr = Tensor();
  out->grad_z = gather_rows(dzr, l.r, l.r, comm);
  out->peak_bytes = scope.peak() - live0;
  if (stats != nullptr) {
    stats->peak_bytes = out->peak_bytes;
    stats->shard_bytes = (l.r_loc * cfg.c_m + l.r_loc * l.r_pad * cfg.c_z) * kF;
  }
  return Status::OK();
}

Status dap_train_step(const MsaModule& mod, const dist::Communicator& comm, Tensor& z,
                      const Tensor& emb, const Tensor& msa_feat, const Tensor& msa_mask,
                      const Tensor& token_mask, const Tensor& grad_out_z, const TrainOptions& opts,
                      DapTrainStats* stats, TrainResult* out, Tensor* grad_emb) {
  MemoryScope scope;
  const int64_t live0 = scope.start_live();
  const EvoformerConfig& cfg = Af3Access::trunk(mod);
  const std::vector<const void*> blocks = Af3Access::blocks(mod);
  FC_RETURN_IF_ERROR(check_train(comm, cfg, opts, static_cast<int>(blocks.size())));
  Af3Shards a;
  FC_RETURN_IF_ERROR(msa_module_shards(
      mod, comm, z, emb, msa_feat, msa_mask, token_mask,
      [&] { return check_input("grad.output.z", grad_out_z, z.shape()); }, opts.chunk,
      opts.chunk_target_bytes, &a));
  const DapLayout& l = a.l;
  Tensor& mr = a.m;                                         // [s_loc, r_pad, c_m]
  Tensor& zr = a.z;                                         // [r_loc, r_pad, c_z]
  Tensor dmr = Tensor::zeros({l.s_loc, l.r_pad, cfg.c_m});  // the module returns only z
  Tensor dzr = scatter_rows(grad_out_z, l.r_pad, l.r_pad, cfg.c_z, comm);  // [r_loc, r_pad, c_z]
  TrainResult blocks_out;
  train_blocks_dap<MsaModuleBlockWeights>(kMsaModuleBlock, blocks, allocate_msa_module_block, a.sh,
                                          comm, opts, mr, zr, dmr, dzr, &blocks_out, stats);
  mr = Tensor();
  z = gather_rows(zr, l.r, l.r, comm);
  zr = Tensor();
  out->grad_m = gather_rows(dmr, l.s, l.r, comm);
  dmr = Tensor();
  out->grad_z = gather_rows(dzr, l.r, l.r, comm);
  dzr = Tensor();
  out->grad_params.clear();
  if (comm.rank() == 0)
    Af3Access::msa_module_embed_backward(mod, emb, msa_feat, out->grad_m, grad_emb, out);
  for (auto& named : blocks_out.grad_params) out->grad_params.push_back(std::move(named));
  out->forward_ms = blocks_out.forward_ms;
  out->backward_ms = blocks_out.backward_ms;
  out->activation_bytes = blocks_out.activation_bytes;
  out->peak_bytes = scope.peak() - live0;
  if (stats != nullptr) {
    stats->peak_bytes = out->peak_bytes;
    stats->shard_bytes = (l.s_loc * l.r_pad * cfg.c_m + l.r_loc * l.r_pad * cfg.c_z) * kF;
  }
  return Status::OK();
}

}  // namespace fc
