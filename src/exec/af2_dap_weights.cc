// Weight sharding of the AlphaFold2 stacks under DAP (src/exec/af2_dap.h): which rank holds which
// block, releasing the others, the one-block buffer, and the per-block broadcast before a block
// runs. The only communication is the dist layer's broadcast.
#include <string>
#include <vector>

#include "exec/af2_dap.h"
#include "foldcube/io.h"
#include "model/af2/alphafold_impl.h"
#include "model/block_table.h"

namespace fc {
namespace {

constexpr int64_t kF = sizeof(float);

// The tensors of block `block` (the struct of t's block type) that t's layers read, in layer
// order; biases a layer does not have are left out.
std::vector<Tensor*> layer_tensors(const BlockTable& t, void* block) {
  std::vector<Tensor*> v;
  auto ln = [&](LayerNormW& w) { v.insert(v.end(), {&w.w, &w.b}); };
  auto lin = [&](LinearW& w) {
    v.push_back(&w.w);
    if (w.b.defined()) v.push_back(&w.b);
  };
  auto mha = [&](GatedAttentionW& w) {
    v.insert(v.end(), {&w.w_qkvg, &w.b_qkvg});
    lin(w.o);
  };
  for (const LayerDesc& ly : t) {
    switch (ly.kind) {
      case LayerKind::kMsaRowAttention: {
        auto& w = layer_params<MsaRowAttentionW>(ly, block);
        ln(w.ln_m), ln(w.ln_z), lin(w.lin_z), mha(w.mha);
        break;
      }
      case LayerKind::kMsaColumnAttention: {
        auto& w = layer_params<MsaColumnAttentionW>(ly, block);
        ln(w.ln_m), mha(w.mha);
        break;
      }
      case LayerKind::kMsaColumnGlobalAttention: {
        auto& w = layer_params<MsaColumnGlobalAttentionW>(ly, block);
        ln(w.ln_m), lin(w.q), lin(w.kvg), lin(w.o);
        break;
      }
      case LayerKind::kTransition:
      case LayerKind::kMaskedTransition: {
        auto& w = layer_params<TransitionW>(ly, block);
        ln(w.ln), lin(w.l1), lin(w.l2);
        break;
      }
      case LayerKind::kOuterProductMean: {
        auto& w = layer_params<OuterProductMeanW>(ly, block);
        ln(w.ln), lin(w.l12), lin(w.out);
        break;
      }
      case LayerKind::kTriangleMultiplication: {
        auto& w = layer_params<TriangleMultiplicationW>(ly, block);
        ln(w.ln_in), lin(w.ab), ln(w.ln_out), lin(w.lin_z), lin(w.lin_g);
        break;
      }
      case LayerKind::kTriangleAttention: {
        auto& w = layer_params<TriangleAttentionW>(ly, block);
        ln(w.ln), lin(w.lin), mha(w.mha);
        break;
      }
      default:
        FC_CHECK_MSG(false, std::string("layer ") + ly.name + " has no AF2 weight sharding");
    }
  }
  return v;
}

}  // namespace

int dap_block_owner(int block, int n) { return block % n; }

int64_t dap_block_buffer_bytes(const BlockTable& t, const EvoformerConfig& c) {
  const int64_t cm = c.c_m, cz = c.c_z, tn = c.transition_n, co = c.c_hidden_opm;
  const int64_t Hm = c.no_heads_msa, Cm = c.c_hidden_msa_att, ct = c.c_hidden_mul;
  const int64_t Hp = c.no_heads_pair, Cp = c.c_hidden_pair_att;
  // Floats of allocate_block's helpers: LayerNorm, gated attention (q|k|v|g with bias, o).
  auto ln = [](int64_t x) { return 2 * x; };
  auto mha = [](int64_t H, int64_t C, int64_t cin) {
    return 4 * H * C * cin + 4 * H * C + cin * H * C + cin;
  };
  int64_t n = 0;
  for (const LayerDesc& ly : t) {
    switch (ly.kind) {
      case LayerKind::kMsaRowAttention:
        n += ln(cm) + ln(cz) + Hm * cz + mha(Hm, Cm, cm);
        break;
      case LayerKind::kMsaColumnAttention:
        n += ln(cm) + mha(Hm, Cm, cm);
        break;
      case LayerKind::kMsaColumnGlobalAttention:  // q (no bias), k|v|g with bias, o
        n += ln(cm) + Hm * Cm * cm + (2 * Cm + Hm * Cm) * (cm + 1) + cm * Hm * Cm + cm;
        break;
      case LayerKind::kTransition:
      case LayerKind::kMaskedTransition: {
        const int64_t x = ly.updates == Stream::kZ ? cz : cm;
        n += ln(x) + 2 * tn * x * x + tn * x + x;
        break;
      }
      case LayerKind::kOuterProductMean:
        n += ln(cm) + 2 * co * (cm + 1) + cz * co * co + cz;
        break;
      case LayerKind::kTriangleMultiplication:
        n += ln(cz) + 4 * ct * (cz + 1) + ln(ct) + cz * (ct + 1) + cz * (cz + 1);
        break;
      case LayerKind::kTriangleAttention:
        n += ln(cz) + Hp * cz + mha(Hp, Cp, cz);
        break;
      default:
        FC_CHECK_MSG(false, std::string("layer ") + ly.name + " has no AF2 weight sharding");
    }
  }
  return n * kF;
}

int64_t alphafold_released_weight_bytes(const AlphaFoldConfig& cfg, int n, int rank) {
  if (n <= 1) return 0;
  auto released = [&](int blocks) {  // blocks of a stack this rank does not own
    int k = 0;
    for (int b = 0; b < blocks; ++b) k += dap_block_owner(b, n) != rank;
    return static_cast<int64_t>(k);
  };
  // The loaded template blocks hold their pair modules only (allocate_pair_layers).
  int64_t bytes =
      released(cfg.evoformer.no_blocks) * dap_block_buffer_bytes(kEvoformerBlock, cfg.evoformer) +
      released(cfg.extra_msa.no_blocks) * dap_block_buffer_bytes(kExtraMsaBlock, cfg.extra_msa);
  if (cfg.templates)
    bytes += released(cfg.template_pair.no_blocks) *
             dap_block_buffer_bytes(kTemplatePairBlock, cfg.template_pair);
  return bytes;
}

Status shard_alphafold_weights(AlphaFold* model, int n, int rank) {
  if (n < 1 || rank < 0 || rank >= n)
    return Status::InvalidArgument("shard_alphafold_weights: need 0 <= rank < n, got rank " +
                                   std::to_string(rank) + " of " + std::to_string(n));
  AlphaFold::Impl& M = AlphaFoldAccess::impl(*model);
  if (M.weight_ranks > 1)
    return Status::InvalidArgument("shard_alphafold_weights: the weights are already sharded");
  if (n == 1) return Status::OK();
  for (int b = 0; b < M.cfg.evoformer.no_blocks; ++b)
    if (dap_block_owner(b, n) != rank) StackAccess::block(M.evoformer, b) = BlockWeights{};
  for (int b = 0; b < M.cfg.extra_msa.no_blocks; ++b)
    if (dap_block_owner(b, n) != rank) StackAccess::block(M.extra, b) = ExtraMsaBlockWeights{};
  for (size_t b = 0; b < M.tmpl_blocks.size(); ++b)
    if (dap_block_owner(static_cast<int>(b), n) != rank) M.tmpl_blocks[b].w = BlockWeights{};
  M.weight_ranks = n;
  M.weight_rank = rank;
  return Status::OK();
}

BlockFilter dap_weight_filter(int n, int rank) {
  return [n, rank](const std::string&, int64_t b, int64_t) {
    return dap_block_owner(static_cast<int>(b), n) == rank;
  };
}

Status load_alphafold_shard(const AlphaFoldConfig& cfg, const TensorFile& weights, int n, int rank,
                            AlphaFold* out) {
  if (n < 1 || rank < 0 || rank >= n)
    return Status::InvalidArgument("load_alphafold_shard: need 0 <= rank < n, got rank " +
                                   std::to_string(rank) + " of " + std::to_string(n));
  AlphaFold model;  // a default-constructed model has its (empty) implementation
  AlphaFold::Impl& M = AlphaFoldAccess::impl(model);
  M.cfg = cfg;
  M.weight_ranks = n;
  M.weight_rank = rank;
  FC_RETURN_IF_ERROR(M.load(weights));
  *out = std::move(model);
  return Status::OK();
}

Status load_alphafold_sharded(const std::string& path, int n, int rank, AlphaFold* out) {
  if (n < 1 || rank < 0 || rank >= n)
    return Status::InvalidArgument("load_alphafold_sharded: need 0 <= rank < n, got rank " +
                                   std::to_string(rank) + " of " + std::to_string(n));
  TensorFile w;
  TensorShapes shapes;  // every tensor's, the blocks left out included: the whole config
  FC_RETURN_IF_ERROR(read_weights(path, &w, dap_weight_filter(n, rank), &shapes));
  AlphaFoldConfig cfg;
  FC_RETURN_IF_ERROR(alphafold_config_from_shapes(shapes, &cfg).WithContext(path));
  return load_alphafold_shard(cfg, w, n, rank, out).WithContext(path);
}

void allocate_dap_block_buffer(const BlockTable& t, const EvoformerConfig& cfg,
                               DapBlockBuffer* out) {
  if (&t == &kEvoformerBlock) {
    allocate_block(cfg, &out->evoformer);
    out->block = &out->evoformer;
  } else if (&t == &kExtraMsaBlock) {
    allocate_extra_msa_block(cfg, &out->extra);
    out->block = &out->extra;
  } else {
    FC_CHECK_MSG(&t == &kTemplatePairBlock, std::string("no DAP block buffer for ") + t.name);
    allocate_pair_layers(cfg, &out->evoformer);
    out->block = &out->evoformer;
  }
}

void dap_run_sharded_blocks(const BlockTable& t, const std::vector<const void*>& blocks,
                            DapBlockBuffer* buf, const DapShards& sh,
                            const dist::Communicator& comm, Tensor* m, Tensor* z) {
  if (buf == nullptr) return dap_run_blocks(t, blocks, sh, comm, m, z);
  const int n = comm.size(), me = comm.rank();
  for (size_t b = 0; b < blocks.size(); ++b) {
    const int owner = dap_block_owner(static_cast<int>(b), n);
    // The owner sends from its own block (read only); the others receive into the buffer.
    void* w = owner == me ? const_cast<void*>(blocks[b]) : buf->block;
    for (Tensor* x : layer_tensors(t, w)) comm.broadcast(x->f32(), x->numel(), owner);
    dap_run_blocks(t, {w}, sh, comm, m, z);
  }
}

}  // namespace fc
