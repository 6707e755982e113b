// Dynamic Axial Parallelism for the AF3 trunk (docs/dap.md, "The AF3 trunk under DAP"): the
// Pairformer stack and the MSA module over the N ranks of a communicator, forward and training
// step, every layer in the shard layouts its block table gives (dap_layer_layout):
//   Pairformer  s by tokens [1, n/N, c_s] (the single attention's queries; its keys and values
//               from the all-gathered LN(s)), z by rows / rows of z^T as the Evoformer's pair stack
//   MSA module  m by sequences (pair-weighted averaging, bias all-gathered as the AF2 row
//               attention's) and by residues (MSA transition, outer product mean), z as above.
// The root (rank 0) passes the inputs and gets the outputs; the other ranks pass undefined
// tensors. Every rank must hold the same stack (the same weights file, or the same seed).
#pragma once

#include <cstdint>
#include <vector>

#include "dist/comm.h"
#include "exec/dap.h"
#include "exec/dap_train.h"
#include "foldcube/af3.h"
#include "foldcube/model.h"
#include "foldcube/parallel.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

// Bytes one rank sends per block of table t in the DAP forward (the dist layer's counting
// convention, docs/dap.md), from the table: an all-to-all wherever dap_block_layouts changes a
// stream's layout (m: [s_loc, r_loc, c_m] blocks, z: [r_loc, r_loc, c_z]) and each layer's
// all-gather (row attention: its bias [r_loc*r_pad, H]; the single attention: LN(s) [r_loc, c_s];
// triangle attention: [r_loc*r_pad, H_p]; triangle multiplication: [c_t, r_loc, r_pad]; outer
// product mean: [s_pad, r_loc, c_o]). For kEvoformerBlock it is dap_block_volume.
DapBlockVolume dap_table_volume(const BlockTable& t, const EvoformerConfig& cfg,
                                const DapLayout& l);

// Inference: s [n, c_s], z [n, n, c_z] and mask [n] (undefined = ones) on the root, updated in
// place there to the stack outputs. opts.trace and opts.partitions are not supported (user error).
Status dap_forward(const PairformerStack& stack, const dist::Communicator& comm, Tensor& s,
                   Tensor& z, const Tensor& mask, const DapOptions& opts = {},
                   DapStats* stats = nullptr);
// z [n, n, c_z], emb [n, c_s], msa_feat [N, n, msa_feat], msa_mask [N, n], token_mask [n] on the
// root (masks undefined = ones); the root's z becomes the module's output.
Status dap_forward(const MsaModule& mod, const dist::Communicator& comm, Tensor& z,
                   const Tensor& emb, const Tensor& msa_feat, const Tensor& msa_mask,
                   const Tensor& token_mask, const DapOptions& opts = {},
                   DapStats* stats = nullptr);

// Training step (policies, chunking and dropout as PairformerStack::train_step: the same masks as
// one process with the same seed, AF3's per-row masks drawn by global rows). On the root: s, z
// become the outputs, out->grad_m = dL/d s, out->grad_z = dL/d z; every rank: out->grad_params
// under Boltz names, summed over the ranks.
Status dap_train_step(const PairformerStack& stack, const dist::Communicator& comm, Tensor& s,
                      Tensor& z, const Tensor& mask, const Tensor& grad_out_s,
                      const Tensor& grad_out_z, const TrainOptions& opts, DapTrainStats* stats,
                      TrainResult* out);
// As MsaModule::train_step on the root (z the output, out->grad_z, out->grad_m = dL/d the
// embedding m, *grad_emb); s_proj / msa_proj gradients only on the root.
Status dap_train_step(const MsaModule& mod, const dist::Communicator& comm, Tensor& z,
                      const Tensor& emb, const Tensor& msa_feat, const Tensor& msa_mask,
                      const Tensor& token_mask, const Tensor& grad_out_z, const TrainOptions& opts,
                      DapTrainStats* stats, TrainResult* out, Tensor* grad_emb);

// ---- Running a stack from files under DAP (`mpirun -np N foldcube run --stack pairformer|
// msa_module --dap N ...`) -----------------------------------------------------------------------
struct Af3DapRunReport {
  Af3RunReport run;  // rank 0: the outputs and gradients (golden names), time_ms
  // Per rank (index = rank), gathered on every rank: tracked peak during the stack call
  // (absolute) and above what was live at its start, the shards of the streams, the bytes sent
  // inside the blocks (forward, or the training step's forward + backward + gradient all-reduce)
  // and, training, the activations kept for the backward.
  std::vector<int64_t> rank_peak_bytes, rank_work_peak_bytes, rank_shard_bytes, rank_sent_bytes,
      rank_activation_bytes;
  int64_t blocks = 0;
  int64_t block_sent_bytes_model = 0;  // dap_table_volume per rank and block (the forward's)
  // With --memory-budget: the bound af3_dap_plan gives every rank's tracked peak during the stack
  // call (absolute, as rank_peak_bytes: rank 0's estimate, which holds the inputs), also in
  // run.planned_peak_bytes beside run.measured_peak_bytes (the largest rank_peak_bytes).
  std::vector<int64_t> rank_planned_bytes;
};
// Every rank of world builds the stack from spec.weights (or the same seeded random weights);
// rank 0 reads the inputs (and grad outputs) and gets the outputs. spec.memory_bytes > 0: the
// per-rank plan (src/plan/af3_dap_plan.h) sets the chunk target and, training without a policy,
// the least recompute that fits; a budget too small is the same error on every rank.
// spec.repeats > 1 is refused; errors on any rank end the call on every rank (Comm::agree).
Status af3_dap_run(const Af3RunSpec& spec, const Comm& world, Af3DapRunReport* rep);

}  // namespace fc
