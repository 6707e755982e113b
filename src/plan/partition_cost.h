// Cost and memory of per-layer partitions (include/foldcube/partition.h) for the planner, and the
// search over them (docs/planner.md, "Per-layer partitioning").
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/partition.h"
#include "foldcube/planner.h"

namespace fc {

// One block over the plan's DAP group with a per-layer split list (the order of its block table:
// kExtraMsaBlock for p.extra_msa, else kEvoformerBlock), per
// rank: compute, collectives (layout changes included) and memory beyond pure DAP.
struct PartitionEstimate {
  double fwd_ms = 0, bwd_ms = 0, rec_ms = 0;  // compute; rec: the rebuild of policy module
  // Collectives: forward; backward with the layers' states kept (policy none, and block after its
  // recompute), without the parameter-gradient all-reduce; the extra of a policy-module rebuild.
  double comm_fwd_ms = 0, comm_bwd_ms = 0, comm_rec_ms = 0;
  int64_t sent_fwd_bytes = 0, sent_bwd_bytes = 0, sent_rec_bytes = 0;  // bytes a rank sends
  int calls_fwd = 0, calls_bwd = 0, calls_rec = 0;  // collectives (each pays the link latency)
  int64_t transient_bytes = 0;  // largest extra live bytes of one layer over its DAP form
  int64_t saved_bytes = 0;      // extra bytes a block keeps for its backward (policies none/module)
};
PartitionEstimate estimate_partition(const Plan& p, const DeviceProfile& dev,
                                     const std::vector<Split>& splits);

// Block b of a stack whose blocks run the lists `blocks` (one per block): inference leaves each
// block's streams in the layouts the next block starts with (partition_exit_layouts), training
// starts and ends every block at the block boundary (as estimate_partition).
PartitionEstimate estimate_partition_in_stack(const Plan& p, const DeviceProfile& dev,
                                              const std::vector<std::vector<Split>>& blocks, int b);

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
