// The whole AlphaFold2 model under Dynamic Axial Parallelism (docs/model.md, "Across ranks"):
// every rank of a communicator embeds, runs and reads only its own shards of m and z; no rank
// holds the whole MSA or pair representation during the forward.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dist/comm.h"
#include "exec/dap.h"
#include "foldcube/alphafold.h"
#include "foldcube/io.h"

namespace fc {

struct AlphaFoldDapStats {
  int64_t forward_peak_bytes = 0;  // tracked peak of this rank during the forward (absolute)
  int64_t shard_bytes = 0;         // this rank's Evoformer shards of m and z (last pass)
  dist::CommStats comm;            // this rank's collectives during the forward
};

// The outputs of a sharded forward on one rank: the small ones whole (the same on every rank)
// and this rank's rows of the pair- and MSA-sized ones.
struct AlphaFoldDapOutputs {
  std::map<std::string, Tensor> whole;
  struct Rows {
    Tensor shard;  // [loc, w, c]: rows k*loc .. of rank k (rows >= `rows` and columns >= r unused)
    int64_t rows = 0;  // real rows (r for the pair outputs, S for the MSA ones)
    Shape shape;       // the whole output's shape ([rows, r, c], or [r, r] for the PAE)
  };
  std::map<std::string, Rows> rows;
};

// AlphaFold::forward over the ranks of comm, each holding the same model and features. Layouts
// are those of docs/dap.md with s = the Evoformer's S + T rows (the extra-MSA stack: E rows):
//   input / recycling embedders  z rows [r_loc, r_pad, c_z], m sequences [s_loc, r_pad, c_m]
//   template pair stack          each template's pair rows [r_loc, r_pad, c_t] (DAP blocks);
//                                pointwise attention on the local pair positions
//   extra-MSA embedder + stack   extra rows [e_loc, r_pad, c_e] (DAP blocks)
//   Evoformer                    DAP blocks; s = linear(m[0]) broadcast from rank 0 ([r, c_s])
//   structure module             every rank on the whole single; the IPA pair bias and o_pair
//                                of its pair rows all-gathered (af2::PairRows)
//   heads                        distogram (+ its transpose by all-to-all), TM logits, PAE,
//                                masked MSA on the shards; pTM as the max over ranks
// opts.trace (set on every rank or on none) is called on the root with the one-process traces,
// the sharded ones gathered; opts.pad_to pads the features as one process does and crops the
// outputs; opts.dtype BF16 gives the stacks bf16 GEMM inputs. opts.stats receives this rank's
// per-stage entries.
Status alphafold_dap_forward(const AlphaFold& model, const dist::Communicator& comm,
                             const FeatureDict& features, AlphaFoldDapOutputs* out,
                             const AlphaFoldOptions& opts = {}, AlphaFoldDapStats* stats = nullptr);

// Collective: the root's *out receives every output whole (gathered one at a time; the pair-sized
// ones are then whole on the root); other ranks' *out is left empty.
void gather_alphafold_dap_outputs(const AlphaFoldDapOutputs& outs, const dist::Communicator& comm,
                                  std::map<std::string, Tensor>* out);

// Collective: the root writes every output as `output.<name>` to a safetensors file (the
// one-process layout) with the given metadata, receiving one rank's shard at a time, so no rank
// holds a whole pair- or MSA-sized output. Every rank returns the root's status.
Status write_alphafold_dap_outputs(const std::string& path,
                                   const std::map<std::string, std::string>& metadata,
                                   const AlphaFoldDapOutputs& outs, const dist::Communicator& comm,
                                   int64_t* peak_bytes = nullptr);

// ---- Weight sharding (src/exec/af2_dap_weights.cc) -------------------------------------------
// ZeRO-3 style, for the blocks of the three stacks (template pair, Extra-MSA, Evoformer), which
// hold nearly all of the weights: on n ranks block b of each stack is held by rank
// dap_block_owner(b, n) = b % n only. Before a block runs, its owner broadcasts the tensors its
// layers use (dist::Communicator::broadcast) into a per-stack buffer of one block on the other
// ranks (DapBlockBuffer, alive during that stack's stage), so the results are bit-identical to
// the replicated run. Everything outside the stacks stays replicated.
int dap_block_owner(int block, int n);
// Releases on rank `rank` of n the stack blocks it does not own; *model then runs only under
// alphafold_dap_forward over n ranks with this rank at `rank` (checked there; AlphaFold::forward
// refuses it). n = 1: nothing released.
Status shard_alphafold_weights(AlphaFold* model, int n, int rank);
// Loading sharded from the start, so that no rank ever holds all stack weights: the file is read
// with dap_weight_filter(n, rank) (read_weights with a BlockFilter, foldcube/io.h: only this
// rank's blocks of each stack are read), the config is inferred from every tensor's shape
// (alphafold_config_from_shapes on the read's TensorShapes), and load_alphafold_shard loads only
// this rank's blocks (the model is then as after shard_alphafold_weights).
BlockFilter dap_weight_filter(int n, int rank);
Status load_alphafold_shard(const AlphaFoldConfig& cfg, const TensorFile& weights, int n, int rank,
                            AlphaFold* out);
// load_alphafold (foldcube/alphafold.h) that way.
Status load_alphafold_sharded(const std::string& path, int n, int rank, AlphaFold* out);
// The tracked bytes shard_alphafold_weights(model of cfg, n, rank) releases.
int64_t alphafold_released_weight_bytes(const AlphaFoldConfig& cfg, int n, int rank);
// The tracked bytes of one block buffer of table t (the parameters its layers use) for cfg.
int64_t dap_block_buffer_bytes(const BlockTable& t, const EvoformerConfig& cfg);
// One block's weights of table t as received from its owner (kEvoformerBlock: `evoformer`,
// kExtraMsaBlock: `extra`, kTemplatePairBlock: the pair modules of `evoformer`).
struct DapBlockBuffer {
  BlockWeights evoformer;
  ExtraMsaBlockWeights extra;
  void* block = nullptr;  // the struct of t's block type
};
void allocate_dap_block_buffer(const BlockTable& t, const EvoformerConfig& cfg,
                               DapBlockBuffer* out);
// dap_run_blocks(t, blocks, ...), where buf == nullptr (replicated weights); otherwise blocks[b]
// is read on its owner only, and broadcast from it into *buf on the others before block b runs.
void dap_run_sharded_blocks(const BlockTable& t, const std::vector<const void*>& blocks,
                            DapBlockBuffer* buf, const DapShards& sh,
                            const dist::Communicator& comm, Tensor* m, Tensor* z);

// ---- Memory model (src/plan/af2_dap_memory.cc) ---------------------------------------------
// Tracked bytes alphafold_dap_forward allocates on rank `rank` of n, by replaying its allocations
// (fp32 or bf16, no trace, no pad_to): per stage and pass the bytes at the stage's start and at its
// peak, and the forward's peak, above what the rank held when the call started (weights and
// features), as AlphaFoldDapStats::forward_peak_bytes minus that. Exact for the tracked allocator
// (tests/dap_af2_test.cc, every stage of every rank on 2 and 4 ranks).
// sharded_weights: the model's stack blocks are sharded (shard_alphafold_weights; the rank's
// share is part of what it holds, the per-stack block buffer part of the stages).
Status alphafold_dap_forward_memory(const AlphaFoldConfig& cfg, const AlphaFoldDims& dims,
                                    const AlphaFoldOptions& opts, int threads, int n, int rank,
                                    AlphaFoldMemory* out, bool sharded_weights = false);
// The chunking that keeps every rank's tracked peak (base_bytes, the weights and features each
// rank holds, plus the forward's peak of alphafold_dap_forward_memory, the largest over the n
// ranks) within budget_bytes, as plan_alphafold does for one process (dtype: the forward's): the
// same chunk target on every rank, or OutOfMemory naming the smallest feasible budget per rank.
Status plan_alphafold_dap(const AlphaFoldConfig& cfg, const AlphaFoldDims& dims, int64_t base_bytes,
                          int64_t budget_bytes, int threads, int n, AlphaFoldPlan* out,
                          DType dtype = DType::F32, bool sharded_weights = false);
// The same with each rank's own base (bases[k]: what rank k holds; they differ when the weights
// are sharded): every rank's bases[k] + its forward peak within budget_bytes.
Status plan_alphafold_dap(const AlphaFoldConfig& cfg, const AlphaFoldDims& dims,
                          const std::vector<int64_t>& bases, int64_t budget_bytes, int threads,
                          AlphaFoldPlan* out, DType dtype, bool sharded_weights);
// The largest transient work of dap_run_blocks(t, ...) on layout l beside the shards of m and z
// and the masks of make_dap_shards (the contexts make_dap_shards gives for chunk and target): a
// layer's work on its shards, or one more stream shard while a layout changes.
int64_t dap_blocks_work_bytes(const BlockTable& t, const EvoformerConfig& cfg, const DapLayout& l,
                              int64_t chunk, int64_t target, int threads, DType dtype = DType::F32);

}  // namespace fc
