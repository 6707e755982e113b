// Cost and memory of per-layer partitions (include/foldcube/partition.h) for the planner, and the
// search over them (docs/planner.md, "Per-layer partitioning").
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/partition.h"
#include "foldcube/planner.h"
#include "model/block_table.h"

namespace fc {

// One layer's part of a block's estimate (ms on the most loaded rank): compute, its own
// collectives (DAP gathers and their adjoints, partial sums, LayerNorm sums), and the layout
// changes the executor makes for it (before it, and after its last use of a stream), forward,
// backward (states kept) and a policy-module rebuild's extra collectives. The backward's changes
// are charged to the layer whose forward change they reverse.
struct LayerEstimate {
  double fwd_ms = 0, bwd_ms = 0, rec_ms = 0;
  double comm_fwd_ms = 0, comm_bwd_ms = 0, comm_rec_ms = 0;
  // Of these, the CPU's copies at the DRAM rate (copy_ms): the collectives' own copies and sums,
  // the packing / reassembly of layout changes, the partial sums' passes over the stream
  // (foldcube's executor, element_bytes 0; 0 for other profiles).
  double copy_fwd_ms = 0, copy_bwd_ms = 0, copy_rec_ms = 0;
  double change_fwd_ms = 0, change_bwd_ms = 0;
};

// One block over the plan's DAP group with a per-layer split list (the order of its block table:
// kExtraMsaBlock for p.extra_msa, else kEvoformerBlock), per
// rank: compute, collectives (layout changes included) and memory beyond pure DAP.
struct PartitionEstimate {
  double fwd_ms = 0, bwd_ms = 0, rec_ms = 0;  // compute; rec: the rebuild of policy module
  // Collectives: forward; backward with the layers' states kept (policy none, and block after its
  // recompute), without the parameter-gradient all-reduce; the extra of a policy-module rebuild.
  double comm_fwd_ms = 0, comm_bwd_ms = 0, comm_rec_ms = 0;
  // Of these, the CPU's copies at the DRAM rate (copy_ms): the collectives' own copies and sums,
  // the packing / reassembly of layout changes, the partial sums' passes over the stream.
  double copy_fwd_ms = 0, copy_bwd_ms = 0, copy_rec_ms = 0;
  int64_t sent_fwd_bytes = 0, sent_bwd_bytes = 0, sent_rec_bytes = 0;  // bytes a rank sends
  int calls_fwd = 0, calls_bwd = 0, calls_rec = 0;  // collectives (each pays the link latency)
  // The extra collectives of a policy-block block's backward beyond its forward run again: the
  // kept boundary shards of a whole entry stream gathered again (for the recompute, and m for the
  // previous block's backward).
  double comm_block_rec_ms = 0, copy_block_rec_ms = 0;
  int64_t sent_block_rec_bytes = 0;
  int calls_block_rec = 0;
  int64_t transient_bytes = 0;  // largest extra live bytes of one layer over its DAP form
  int64_t saved_bytes = 0;      // extra bytes a block keeps for its backward (policies none/module)
  std::vector<LayerEstimate> layers;  // per layer of the block table (the totals above, split)
};
PartitionEstimate estimate_partition(const Plan& p, const DeviceProfile& dev,
                                     const std::vector<Split>& splits);

// Inference: the DAP shard form's forward work beyond the whole layer's x r_loc / r, per rank
// and block, ms: the triangle multiplication's products run as one [r_loc, r_loc] x r_pad block
// per rank's part and channel (batched_by_rows' rate at r_loc) instead of [r, r] x r (its rate at
// r); 0 without the table, for training, one rank, and the other layers (their shard forms are
// the one-process layer on fewer items).
double dap_shard_extra_ms(const LayerDesc& ly, const EvoformerConfig& cfg, int64_t s, int64_t r,
                          int dap, bool training, const DeviceProfile& dev);

// Pure DAP's collectives and layout changes of one block at shape (s, r) over `dap` ranks, without
// the compute terms (their copy_*_ms are what the link model of dap_block_comm leaves out; the
// search adds them to pure DAP's estimate).
PartitionEstimate dap_copy_estimate(const EvoformerConfig& cfg, int64_t s, int64_t r, int dap,
                                    bool training, bool extra_msa, const DeviceProfile& dev);

// Block b of a stack whose blocks run the lists `blocks` (one per block): each block leaves its
// streams in the layouts the next block starts with (partition_exit_layouts; inference and
// training).
PartitionEstimate estimate_partition_in_stack(const Plan& p, const DeviceProfile& dev,
                                              const std::vector<std::vector<Split>>& blocks, int b);

// Per layer of the plan's block table, its estimate summed over the blocks (the plan's lists, or
// pure DAP; dap > 1), by the phases the executor's layer timers measure (src/exec/layer_times.h):
// forward; backward (a policy-module block's rebuild included); recompute (a policy-block block's
// forward again). Each: compute, own collectives, layout changes.
struct PhaseEstimate {
  double compute_ms = 0, comm_ms = 0, change_ms = 0;
};
struct StackLayerEstimate {
  PhaseEstimate fwd, bwd, rec;
};
std::vector<StackLayerEstimate> estimate_stack_layers(const Plan& p, const DeviceProfile& dev);

// Adds the partitions' difference to pure DAP to the plan's estimates (time, comm, peak, fits);
// a plan without partitions is left as it is.
void add_partition_estimates(const DeviceProfile& dev, Plan* p);

// The fastest per-layer split list for the plan's setting (dap > 1; the same list for every
// block) whose extra memory fits under the plan's limit: every combination of the layers'
// supported splits is evaluated (5832 for the Evoformer block). Sets p->partitions (empty when
// pure DAP is fastest) and the estimates.
void choose_partition(const DeviceProfile& dev, Plan* p);

// What decides the search, in numbers: the step-time difference to pure DAP of one split list
// (the same for every block, the plan's recompute policies), in compute (work formulas and
// per-module overheads), link bandwidth (bytes) and link latency (collective calls), with the
// extra peak memory.
// (compute_ms includes the CPU's copies of the collectives and layout changes, copy_*_ms.)
struct SplitTerms {
  std::vector<Split> splits;                           // table order
  double compute_ms = 0, link_ms = 0, latency_ms = 0;  // per step, relative to pure DAP
  int64_t extra_peak_bytes = 0;
  double total_ms() const { return compute_ms + link_ms + latency_ms; }
};
// For the plan's setting (dap > 1): each layer alone on each of its non-DAP splits (the others
// dap), then the fastest whole list of all combinations regardless of memory (last entry).
std::vector<SplitTerms> explain_splits(const DeviceProfile& dev, const Plan& p);
// Pure DAP's own collectives per step (bytes and latency terms, ms) under the plan's policies.
void dap_link_terms(const DeviceProfile& dev, const Plan& p, double* link_ms, double* latency_ms);

}  // namespace fc
